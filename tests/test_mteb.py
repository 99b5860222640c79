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
from moee_fast.mteb import E5_INSTRUCTIONS, PAPER_TASKS, MoEEModel, load_moee_model, moee_model_name  # noqa: E402
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


def encode_with(model, texts, task=MockSTSTask()):
    loader = [{"text": texts[:2]}, {"text": texts[2:]}]  # what matters of mteb's DataLoader: batches with "text"
    return model.encode(loader, task_metadata=task.metadata, hf_split="test", hf_subset="default")


def test_importing_moee_fast_leaves_mteb_alone():
    code = "import sys, moee_fast; assert 'mteb' not in sys.modules and 'moee_fast.mteb' not in sys.modules"
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
    assert str(folder) in printed
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
