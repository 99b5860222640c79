import importlib
import json
import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

mteb = pytest.importorskip("mteb")

from mteb.mocks.mock_tasks import (  # noqa: E402
    MockClassificationTask,
    MockPairClassificationTask,
    MockRerankingTask,
    MockRetrievalTask,
    MockSTSTask,
    MockSummarizationTask,
)
from mteb.mocks.mock_tasks.clustering import MockClusteringTask  # noqa: E402
from mteb.models import CompressionWrapper  # noqa: E402
from mteb.models.model_meta import ModelMeta  # noqa: E402
from mteb.types import OutputDType, PromptType  # noqa: E402

import moee_fast  # noqa: E402
from moee_fast import MoEEncoder, similarity, similarity_pairwise  # noqa: E402
from moee_fast.cli import main  # noqa: E402
from moee_fast.demo import build_demo_checkpoint  # noqa: E402
from moee_fast.embeddings import VARIANTS  # noqa: E402
from moee_fast.mteb import (  # noqa: E402
    E5_INSTRUCTIONS, PAPER_TASKS, MoEEModel, load_moee_model, moee_model_name, register_paper_models,
)
from moee_fast.prompts import build_prompt  # noqa: E402

TEXTS = ["A man plays a guitar.", "Someone plays an instrument", 'Stocks "fell" sharply', "", "A cat sleeps in the sun."]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The demo model's matmuls are too small to gain from threads; on a busy machine waiting
    threads cost these tests several times their work."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def demo_path(tmp_path_factory):
    return build_demo_checkpoint(str(tmp_path_factory.mktemp("demo")))


@pytest.fixture(scope="module")
def encoder(demo_path):
    return MoEEncoder.from_pretrained(demo_path)


@pytest.fixture(scope="module")
def raw(encoder):
    """TEXTS under the prompteol preset, with no instruction."""
    return encoder.encode(TEXTS, prompt="prompteol")


def encode_with(model, texts, task=MockSTSTask(), **encode_kwargs):
    loader = [{"text": texts[:2]}, {"text": texts[2:]}]  # what matters of mteb's DataLoader: batches with "text"
    return model.encode(loader, task_metadata=task.metadata, hf_split="test", hf_subset="default", **encode_kwargs)


def test_importing_moee_fast_leaves_mteb_alone():
    code = "import sys, moee_fast; assert 'mteb' not in sys.modules and 'moee_fast.mteb' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_importing_moee_fast_mteb_registers_nothing_until_asked():
    code = (
        "import mteb, moee_fast.mteb as m\n"
        "from mteb.models.model_implementations import MODEL_REGISTRY\n"
        "name = 'allenai/OLMoE-1B-7B-0924-MoEE-sum-alpha1'\n"
        "assert name not in MODEL_REGISTRY\n"
        "assert name in m.register_paper_models() and MODEL_REGISTRY[name].loader is m.load_moee_model\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_missing_mteb_says_how_to_install(monkeypatch):
    monkeypatch.delitem(sys.modules, "moee_fast.mteb")
    monkeypatch.setitem(sys.modules, "mteb", None)
    with pytest.raises(ImportError, match=r"pip install moee-fast\[mteb\]"):
        importlib.import_module("moee_fast.mteb")


@pytest.mark.parametrize("alpha", [0.0, 0.4, 3.0])
def test_sum_similarity_of_encoded_vectors_is_the_moee_sum_score(encoder, raw, alpha):
    model = MoEEModel(encoder, variant="sum", alpha=alpha, instructions=False)
    vectors = encode_with(model, TEXTS)
    expected = similarity(raw, raw, "sum", alpha)
    assert isinstance(vectors, np.ndarray) and vectors.shape == (5, model.embed_dim)
    torch.testing.assert_close(torch.as_tensor(model.similarity(vectors, vectors)), expected, rtol=1e-5, atol=1e-5)
    pairs = model.similarity_pairwise(vectors[:4], vectors[1:])
    torch.testing.assert_close(torch.as_tensor(pairs), similarity_pairwise(raw[:4], raw[1:], "sum", alpha), rtol=1e-5, atol=1e-5)
    # MTEB's generic cosine of the same vectors is the sum score over (1 + alpha).
    cosine = mteb.similarity_functions.cos_sim(vectors, vectors)
    torch.testing.assert_close((1 + alpha) * torch.as_tensor(cosine), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("variant", ["hs", "rw", "concat"])
def test_other_variants_score_by_cosine(encoder, raw, variant):
    model = MoEEModel(encoder, variant=variant, instructions=False)
    vectors = encode_with(model, TEXTS)
    np.testing.assert_allclose(vectors, raw.vectors(variant).numpy(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(torch.as_tensor(model.similarity(vectors, vectors[1])), similarity(raw, raw[1], variant), rtol=1e-5, atol=1e-5)


def test_instructions_per_task(encoder):
    model = MoEEModel(encoder)
    sts_instruction = "Retrieve semantically similar text."
    assert model.instruction_for("STSBenchmark") == sts_instruction
    assert model.instruction_for("SummEvalSummarization.v2") == E5_INSTRUCTIONS["SummEval"]
    assert model.instruction_for("MockSTSTask") is None
    assert model.prompt_for("STS12").format("x") == build_prompt("prompteol", instruction=sts_instruction).format("x")
    assert MoEEModel(encoder, instructions=False).instruction_for("STS12") is None
    assert MoEEModel(encoder, prompt=None, instructions=False).prompt_for("STS12") is None

    custom = MoEEModel(encoder, instructions={"MockSTSTask": "Compare meaning", "MockRetrievalTask": {"query": "Find it"}})
    assert custom.instruction_for("MockRetrievalTask", mteb.types.PromptType.query) == "Find it"
    assert custom.instruction_for("MockRetrievalTask", mteb.types.PromptType.document) == ""
    expected = encoder.encode(TEXTS, prompt=build_prompt("prompteol", instruction="Compare meaning")).vectors("sum")
    np.testing.assert_allclose(encode_with(custom, TEXTS), expected.numpy(), rtol=1e-6, atol=1e-6)
    exact = MoEEModel(encoder, instructions={"MockSTSTask": "Compare meaning"}, reference_exact=True, rw_source="logits")
    expected = encoder.encode(TEXTS, prompt=build_prompt("prompteol", "Compare meaning", reference_exact=True), rw_source="logits")
    np.testing.assert_allclose(encode_with(exact, TEXTS), expected.vectors("sum").numpy(), rtol=1e-6, atol=1e-6)
    assert set(PAPER_TASKS) == set(E5_INSTRUCTIONS) and len(PAPER_TASKS) == 19


def test_per_batch_standardization_option(encoder, raw):
    model = MoEEModel(encoder, variant="concat", standardize="per_batch", standardize_batch_size=2, instructions=False)
    expected = raw.standardized_per_batch(2).vectors("concat")
    np.testing.assert_allclose(encode_with(model, TEXTS), expected.numpy(), rtol=1e-5, atol=1e-5)
    stats = raw.fit_standardizer()
    fitted = MoEEModel(encoder, variant="hs", standardize=stats, instructions=False)
    assert abs(encode_with(fitted, TEXTS).mean(0)).max() < 1e-4


def test_bad_settings(encoder):
    with pytest.raises(ValueError, match="hs, rw, concat, sum"):
        MoEEModel(encoder, variant="mean")
    with pytest.raises(ValueError, match="alpha"):
        MoEEModel(encoder, alpha=-0.5)
    with pytest.raises(ValueError, match="prompteol"):
        MoEEModel(encoder, prompt="no placeholder here")
    with pytest.raises(ValueError, match="rw_source"):
        MoEEModel(encoder, rw_source="probs")
    with pytest.raises(ValueError, match="standardize"):
        MoEEModel(encoder, standardize="global")


def main_scores(model, tasks, tmp_path):
    result = mteb.evaluate(model, tasks, cache=mteb.ResultCache(tmp_path), show_progress_bar=False)
    return {r.task_name: r.get_score() for r in result.task_results}


@pytest.mark.parametrize("variant", [v for v in VARIANTS if v != "sum"])  # "sum" runs every task type below
def test_mteb_sts_runs_for_every_variant(encoder, variant, tmp_path):
    scores = main_scores(MoEEModel(encoder, variant=variant, alpha=0.5), [MockSTSTask()], tmp_path)
    assert list(scores) == ["MockSTSTask"] and math.isfinite(scores["MockSTSTask"])


def test_mteb_runs_every_task_type(encoder, tmp_path):
    tasks = [
        MockSTSTask(), MockClassificationTask(), MockClusteringTask(), MockPairClassificationTask(),
        MockRerankingTask(), MockRetrievalTask(), MockSummarizationTask(),
    ]
    model = MoEEModel(encoder, variant="sum", standardize="per_batch", reference_exact=True)
    scores = main_scores(model, tasks, tmp_path)
    assert set(scores) == {task.metadata.name for task in tasks}
    assert all(math.isfinite(score) for score in scores.values()), scores
    written = sorted(p.name for p in tmp_path.rglob("*.json"))
    assert "MockRetrievalTask.json" in written and "model_meta.json" in written


def test_cli_runs_tasks_and_prints_main_scores(demo_path, tmp_path, monkeypatch, capsys):
    real_get_tasks = mteb.get_tasks
    monkeypatch.setattr(mteb, "get_tasks", lambda tasks: [MockSTSTask()] if tasks == ["MockSTSTask"] else real_get_tasks(tasks=tasks))
    argv = ["mteb", "--model", demo_path, "--tasks", "MockSTSTask", "--variant", "concat",
            "--prompt", "none", "--rw-source", "logits", "--output-dir", str(tmp_path)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "MockSTSTask" in printed and "cosine_spearman" in printed and "average" in printed
    assert len(list(tmp_path.rglob("MockSTSTask.json"))) == 1
    folder = next(tmp_path.rglob("MockSTSTask.json")).parent
    # The name carries the variant and prompt; the authors' raw-logits RW is an experiment of it.
    assert folder.name == "rw_source_logits" and folder.parent.name == "experiments"
    assert folder.parents[2].name.endswith("-MoEE-concat-none")
    assert str(folder) in printed and "load_experiments='match_name'" in printed
    assert main(argv[:-4] + ["--precision", "int8", "--output-dir", str(tmp_path / "int8")]) == 0
    folder = next((tmp_path / "int8").rglob("MockSTSTask.json")).parent
    assert folder.name == "output_dtypes_int8" and str(folder) in capsys.readouterr().out
    with pytest.raises(SystemExit, match="--tasks .* or --paper"):
        main(["mteb", "--paper", "--tasks", "STS12"])
    with pytest.raises(SystemExit, match="alpha"):
        main(["mteb", "--model", demo_path, "--tasks", "MockSTSTask", "--alpha", "-1"])
    with pytest.raises(SystemExit, match="STSBenchmarkk"):
        main(["mteb", "--tasks", "STSBenchmarkk"])


def test_package_exports():
    assert moee_fast.similarity is similarity and callable(moee_fast.search)


# ------------------------------------------------------------------ results where mteb looks
def result_folders(root):
    return sorted(path.parent.relative_to(root).as_posix() for path in root.rglob("MockSTSTask.json"))


@pytest.mark.parametrize("variant", VARIANTS)
def test_default_settings_file_standard_results_that_mteb_loads_by_default(encoder, variant, tmp_path, monkeypatch):
    model = MoEEModel(encoder, variant=variant)
    result = mteb.evaluate(model, [MockSTSTask()], cache=mteb.ResultCache(tmp_path), show_progress_bar=False)
    score = result.task_results[0].get_score()
    name = model.mteb_model_meta.name
    assert name.endswith(f"-MoEE-{variant}" + ("-alpha1" if variant == "sum" else ""))
    folder = f"results/{name.replace('/', '__')}/no_revision_available"
    assert result_folders(tmp_path) == [folder]  # the model's revision folder, no experiments/
    assert {p.name for p in (tmp_path / folder).iterdir()} == {"MockSTSTask.json", "model_meta.json", "run_settings.jsonl"}

    loaded = mteb.ResultCache(tmp_path).load_results()  # every default argument
    assert [(r.model_name, r.model_revision) for r in loaded.model_results] == [(name, "no_revision_available")]
    assert loaded.model_results[0].task_results[0].get_score() == pytest.approx(score, abs=1e-9)

    monkeypatch.setenv("MTEB_CACHE", str(tmp_path))
    assert [r.model_name for r in mteb.load_results(download_latest=False).model_results] == [name]
    # mteb validates each result against its task; a mock task is not in mteb's registry, so it is passed in.
    by_task = mteb.load_results(download_latest=False, tasks=[MockSTSTask()], models=[name])
    assert by_task.model_results[0].task_results[0].get_score() == pytest.approx(score, abs=1e-9)


def test_names_carry_variant_alpha_prompt_instructions(encoder):
    names = {
        MoEEModel(encoder, **settings).mteb_model_meta.name
        for settings in (
            {}, {"alpha": 0.5}, {"variant": "hs"}, {"variant": "hs", "alpha": 0.5}, {"prompt": "style"},
            {"prompt": None}, {"prompt": "Q: {text} A:"}, {"instructions": False}, {"instructions": {"STS12": "x"}},
        )
    }
    assert len(names) == 8  # alpha names only the sum variant
    base = moee_model_name("org/ckpt", "sum", 0.5, "Q: {text}", {})
    assert base.startswith("org/ckpt-MoEE-sum-alpha0.5-template-") and base.endswith("-noinstructions")
    assert moee_model_name("org/ckpt", "rw", 1.0, "prompteol", E5_INSTRUCTIONS) == "org/ckpt-MoEE-rw"
    # The reproduction options are not in the name: they are experiments of it.
    exact = MoEEModel(encoder, reference_exact=True, rw_source="logits", standardize="per_batch", max_length=64)
    assert exact.mteb_model_meta.name == MoEEModel(encoder).mteb_model_meta.name
    assert exact.mteb_model_meta.experiment_kwargs == {
        "reference_exact": True, "rw_source": "logits", "standardize": "per_batch", "standardize_batch_size": 128, "max_length": 64,
    }
    assert MoEEModel(encoder).mteb_model_meta.experiment_kwargs is None


def test_reproduction_options_are_experiments_loaded_by_their_meta(encoder, tmp_path):
    model = MoEEModel(encoder, variant="hs", rw_source="logits", reference_exact=True)
    mteb.evaluate(model, [MockSTSTask()], cache=mteb.ResultCache(tmp_path), show_progress_bar=False)
    name = model.mteb_model_meta.name.replace("/", "__")
    assert result_folders(tmp_path) == [f"results/{name}/no_revision_available/experiments/reference_exact_True__rw_source_logits"]
    cache = mteb.ResultCache(tmp_path)
    assert cache.load_results().model_results == []  # an experiment is not the model's standard result
    found = cache.load_results(models=[model.mteb_model_meta])
    assert [len(r.task_results) for r in found.model_results] == [1]


# ------------------------------------------------------------- mteb's wrappers and encode kwargs
# Binary keeps signs only: RW scores are probabilities, all positive, so "rw" binarizes to ones.
@pytest.mark.parametrize(
    "variant, dtype", [(v, OutputDType.INT8) for v in VARIANTS] + [(v, OutputDType.BINARY) for v in VARIANTS if v != "rw"]
)
def test_compression_wrapper_evaluates_every_variant(encoder, variant, dtype, tmp_path):
    model = MoEEModel(encoder, variant=variant, instructions=False)
    wrapped = CompressionWrapper(model, dtype)  # assigns model.mteb_model_meta
    assert model.mteb_model_meta.experiment_kwargs == {"output_dtypes": dtype.value}
    result = mteb.evaluate(wrapped, [MockSTSTask()], cache=mteb.ResultCache(tmp_path), show_progress_bar=False)
    assert math.isfinite(result.task_results[0].get_score())
    name = model.mteb_model_meta.name.replace("/", "__")
    assert result_folders(tmp_path) == [f"results/{name}/no_revision_available/experiments/output_dtypes_{dtype.value}"]


def test_mteb_model_meta_is_assignable(encoder):
    model = MoEEModel(encoder, variant="rw")
    replaced = model.mteb_model_meta.model_copy(update={"name": "someone/else"})
    model.mteb_model_meta = replaced
    assert model.mteb_model_meta is replaced


def reference_quantization(vectors: np.ndarray, dtype: str) -> np.ndarray:
    """mteb's documented schemes, written out: int8 maps each dimension's [min, max] onto
    256 steps centred on 0, in float32 as mteb computes it; binary keeps the sign."""
    if dtype == "binary":
        return (vectors > 0).astype(np.float32)
    x = vectors.astype(np.float32)
    low, high = x.min(0), x.max(0)
    return np.floor((x - low) / ((high - low) / np.float32(255))) - 128


@pytest.mark.parametrize("dtype", ["int8", "binary"])
def test_precision_encode_kwarg_quantizes_as_mteb(encoder, dtype):
    model = MoEEModel(encoder, variant="concat", instructions=False)
    full = encode_with(model, TEXTS)
    quantized = encode_with(model, TEXTS, precision=dtype)
    assert not np.isnan(quantized).any()
    np.testing.assert_array_equal(quantized, reference_quantization(full, dtype))
    np.testing.assert_array_equal(encode_with(model, TEXTS, precision="float32"), full)


def test_unusable_encode_kwargs_are_refused_by_name(encoder):
    model = MoEEModel(encoder, instructions=False)
    with pytest.raises(ValueError, match="'int3' is not a valid OutputDType.*int8"):
        encode_with(model, TEXTS, precision="int3")
    with pytest.raises(TypeError, match="normalize_embeddings.*batch_size, show_progress_bar, precision"):
        encode_with(model, TEXTS, normalize_embeddings=True)
    for bad in (0, 1.5, "2"):
        with pytest.raises(ValueError, match="encode_kwargs batch_size must be an integer >= 1"):
            encode_with(model, TEXTS, batch_size=bad)
    with pytest.raises(ValueError, match="binary.*probabilities"):
        encode_with(MoEEModel(encoder, variant="rw"), TEXTS, precision="binary")


def test_encode_kwargs_reach_the_encoder(encoder, tmp_path, monkeypatch):
    calls = []
    real_encode = encoder.encode

    def recording_encode(texts, **kwargs):
        calls.append((len(texts), kwargs["batch_size"], kwargs["show_progress_bar"]))
        return real_encode(texts, **kwargs)

    monkeypatch.setattr(encoder, "encode", recording_encode)
    model = MoEEModel(encoder, variant="hs", batch_size=7)
    mteb.evaluate(model, [MockSTSTask()], cache=mteb.ResultCache(tmp_path), encode_kwargs={"batch_size": 1, "show_progress_bar": False})
    assert calls and all(call[1:] == (1, False) for call in calls)
    calls.clear()
    encode_with(model, TEXTS)  # no encode kwarg: the model's own batch size
    assert calls == [(len(TEXTS), 7, None)]
    # A batch size of 1 changes nothing in the vectors (each text is encoded as if alone).
    np.testing.assert_allclose(encode_with(model, TEXTS, batch_size=1), encode_with(model, TEXTS), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------- the ModelMeta
def expected_active_parameters(model, config, encoder) -> int:
    """Everything but the input embedding, less the routed experts a token does not run: each
    routed expert is a gated MLP of 3 x hidden x expert width."""
    width = getattr(config, "moe_intermediate_size", None) or config.intermediate_size
    experts, top_k = encoder.num_experts, config.num_experts_per_tok
    idle = encoder.num_moe_layers * (experts - top_k) * 3 * config.hidden_size * width
    return sum(p.numel() for p in model.parameters()) - config.vocab_size * config.hidden_size - idle


@pytest.mark.parametrize("family", ["olmoe", "mixtral", "qwen2_moe", "deepseek_v2"])
def test_parameter_counts_from_the_config(checkpoint, family):
    encoder = MoEEncoder.from_pretrained(checkpoint(family))
    meta = MoEEModel(encoder).mteb_model_meta
    config = encoder.model.config
    assert meta.n_parameters == sum(p.numel() for p in encoder.model.parameters())  # the loaded model, LM head not run
    assert meta.n_embedding_parameters == config.vocab_size * config.hidden_size
    assert meta.n_active_parameters == expected_active_parameters(encoder.model, config, encoder)
    assert meta.n_active_parameters < meta.n_parameters - meta.n_embedding_parameters


def with_card(demo_path, tmp_path, card: str) -> str:
    path = tmp_path / "carded"
    shutil.copytree(demo_path, path)
    (path / "README.md").write_text(card)
    return str(path)


def test_model_meta_is_complete_and_passes_mteb_validation(demo_path, tmp_path):
    card = "---\nlicense: apache-2.0\nlanguage:\n- en\n- de\nrelease_date: 2024-09-03\n---\n# a card\n"
    encoder = MoEEncoder.from_pretrained(with_card(demo_path, tmp_path, card))
    config = encoder.model.config
    for variant, dim in {"hs": 64, "rw": encoder.num_moe_layers * encoder.num_experts, "concat": 64 + 64, "sum": 128}.items():
        assert MoEEModel(encoder, variant=variant).mteb_model_meta.embed_dim == dim
    meta = MoEEModel(encoder).mteb_model_meta
    assert (meta.license, meta.languages, meta.release_date) == ("apache-2.0", ["deu-Latn", "eng-Latn"], "2024-09-03")
    assert meta.max_tokens == config.max_position_embeddings
    weights = os.path.getsize(os.path.join(encoder.name, "model.safetensors")) / 2**20
    assert meta.memory_usage_mb == pytest.approx(weights, abs=0.05)
    assert meta.similarity_fn_name.value == "cosine" and meta.use_instructions and meta.open_weights
    assert meta.citation and "Li" in meta.citation
    # mteb's checks on a new model: a name with an organization, a revision, embedding parameters,
    # training datasets that can be derived, and a meta that survives its JSON round trip.
    assert "/" in meta.name and meta.revision and meta.n_embedding_parameters is not None
    assert meta.name != meta.adapted_from
    meta.get_training_datasets()
    assert ModelMeta.model_validate(meta.model_dump()) == meta
    reloaded = ModelMeta.model_validate_json_resolved(json.dumps(meta.to_dict(), default=str))
    assert reloaded.name == meta.name and reloaded.loader is load_moee_model
    bare = MoEEModel(MoEEncoder.from_pretrained(demo_path)).mteb_model_meta  # the demo's card has no front matter
    assert (bare.license, bare.languages, bare.release_date) == (None, None, None)


def test_load_model_rebuilds_the_model(encoder, monkeypatch):
    model = MoEEModel(encoder, variant="concat", alpha=0.5, prompt="style", rw_source="logits")
    loaded = model.mteb_model_meta.load_model()
    assert isinstance(loaded, MoEEModel) and loaded is not model
    assert (loaded.variant, loaded.alpha, loaded.prompt, loaded.rw_source) == ("concat", 0.5, "style", "logits")
    assert loaded.mteb_model_meta.name == model.mteb_model_meta.name
    np.testing.assert_allclose(encode_with(loaded, TEXTS), encode_with(model, TEXTS), rtol=1e-5, atol=1e-6)
    # By name, as mteb's CLI does, once the name is known to mteb's registry.
    registry = importlib.import_module("mteb.models.get_model_meta").MODEL_REGISTRY
    monkeypatch.setitem(registry, model.mteb_model_meta.name, model.mteb_model_meta)
    by_name = mteb.get_model(model.mteb_model_meta.name, standardize="per_batch")
    assert (by_name.variant, by_name.rw_source, by_name.standardize) == ("concat", "logits", "per_batch")
    with pytest.raises(ValueError, match="concat variant has .* not 3"):
        load_moee_model(model.mteb_model_meta.name, checkpoint=encoder.name, variant="concat", embed_dim=3)


def test_reference_exact_marks_a_corpus_without_instruction(encoder):
    model = MoEEModel(encoder, instructions={"MockRetrievalTask": {"query": "Find it"}}, reference_exact=True)
    document = model.prompt_for("MockRetrievalTask", PromptType.document)
    assert document.format("A doc") == 'This sentence : "<|embed|>\nA doc." means in one word:"'
    assert model.prompt_for("MockSTSTask") is not None and "<|embed|>" not in model.prompt_for("MockSTSTask").format("x")
    plain = MoEEModel(encoder, instructions={"MockRetrievalTask": {"query": "Find it"}})
    assert plain.prompt_for("MockRetrievalTask", PromptType.document).format("A doc") == 'This sentence : "A doc." means in one word:"'


# The published configs' fields that size each paper checkpoint.
PUBLISHED_CONFIGS = {
    "allenai/OLMoE-1B-7B-0924": ("OlmoeConfig", dict(
        vocab_size=50304, hidden_size=2048, intermediate_size=1024, num_hidden_layers=16, num_attention_heads=16,
        num_key_value_heads=16, num_experts=64, num_experts_per_tok=8)),
    "Qwen/Qwen1.5-MoE-A2.7B": ("Qwen2MoeConfig", dict(
        vocab_size=151936, hidden_size=2048, intermediate_size=5632, moe_intermediate_size=1408,
        shared_expert_intermediate_size=5632, num_hidden_layers=24, num_attention_heads=16, num_key_value_heads=16,
        num_experts=60, num_experts_per_tok=4, decoder_sparse_step=1)),
    "deepseek-ai/deepseek-moe-16b-base": ("DeepseekConfig", dict(
        vocab_size=102400, hidden_size=2048, intermediate_size=10944, moe_intermediate_size=1408, num_hidden_layers=28,
        num_attention_heads=16, num_key_value_heads=16, n_routed_experts=64, n_shared_experts=2, num_experts_per_tok=6,
        first_k_dense_replace=1, moe_layer_freq=1)),
    "mistralai/Mixtral-8x7B-v0.1": ("MixtralConfig", dict(
        vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2)),
}


@pytest.mark.parametrize("checkpoint_name", list(PUBLISHED_CONFIGS))
def test_paper_checkpoints_are_known_to_mteb(checkpoint_name):
    import transformers

    from moee_fast.loading.models import deepseek
    from moee_fast.mteb import PAPER_CHECKPOINTS, parameter_counts

    class_name, fields = PUBLISHED_CONFIGS[checkpoint_name]
    config = getattr(transformers, class_name, None) or getattr(deepseek, class_name)
    config = config(**fields)
    model_class = deepseek.DeepseekModel if class_name == "DeepseekConfig" else transformers.MODEL_MAPPING[type(config)]
    known = PAPER_CHECKPOINTS[checkpoint_name]
    register_paper_models()
    assert parameter_counts(model_class, config) == known["counts"]
    with torch.device("meta"):
        moe_layers = sum(name.endswith(".experts") for name, _ in model_class._from_config(config).named_modules())
    assert known["shape"] == (fields["hidden_size"], moe_layers, fields.get("num_experts") or fields.get("n_routed_experts") or fields["num_local_experts"])
    for variant in VARIANTS:
        meta = mteb.get_model_meta(moee_model_name(checkpoint_name, variant, 1.0, "prompteol", E5_INSTRUCTIONS))
        assert meta.loader is load_moee_model and meta.revision == known["revision"] and len(meta.revision) == 40
        assert meta.loader_kwargs == {"checkpoint": checkpoint_name, "variant": variant, "alpha": 1.0, "prompt": "prompteol", "instructions": True}
        assert meta.n_embedding_parameters == fields["vocab_size"] * fields["hidden_size"]


def test_submission_copies_the_standard_results_with_their_run_settings(encoder, tmp_path):
    """What mteb's submit_results copies into the results repository (offline: the copy step alone)."""
    from mteb.cache.result_cache import CopyResultsAction

    model = MoEEModel(encoder, variant="concat")
    cache = mteb.ResultCache(tmp_path / "cache")
    mteb.evaluate(model, [MockSTSTask()], cache=cache, show_progress_bar=False)
    unsubmitted = cache._get_unsubmitted_results([model.mteb_model_meta])
    CopyResultsAction(unsubmitted, tmp_path / "repository").do()
    copied = tmp_path / "repository" / model.mteb_model_meta.name.replace("/", "__") / "no_revision_available"
    assert {p.name for p in copied.iterdir()} == {"MockSTSTask.json", "model_meta.json", "run_settings.jsonl"}
