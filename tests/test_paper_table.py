"""The paper-table runner on mteb's mock tasks, offline: every variant x pooling, alpha tuned per
task, one encode per text per pooling, one table grouped by task type."""

import csv
import math

import pytest
import torch

mteb = pytest.importorskip("mteb")

from mteb.mocks.mock_tasks import MockClassificationTask, MockRetrievalTask, MockSTSTask  # noqa: E402

from moee_fast import MoEEncoder  # noqa: E402
from moee_fast.cli import main  # noqa: E402
from moee_fast.demo import build_demo_checkpoint  # noqa: E402
from moee_fast.mteb import MoEEModel, data, table  # noqa: E402

TASKS = [MockSTSTask(), MockClassificationTask(), MockRetrievalTask()]


@pytest.fixture(scope="module")
def demo_path(tmp_path_factory):
    return build_demo_checkpoint(str(tmp_path_factory.mktemp("demo")))


@pytest.fixture(scope="module")
def encoder(demo_path):
    torch.set_num_threads(1)
    return MoEEncoder.from_pretrained(demo_path)


def test_table_matches_each_variant_run_alone_and_encodes_each_text_once_per_pooling(encoder, tmp_path, monkeypatch):
    encoded = []
    real = encoder.encode

    def counting(texts, **kwargs):
        encoded.extend((kwargs["rw_pooling"], kwargs["hs_pooling"], text) for text in texts)
        return real(texts, **kwargs)

    monkeypatch.setattr(encoder, "encode", counting)
    monkeypatch.setitem(data.PAPER_FIGURES, "moee-fast/" + encoder.name.rstrip("/").split("/")[-1],
                        {"prompteol": {"MockSTSTask": {"MoEE(sum)": 12.5}}, "none": {"MockSTSTask": {"MoEE(sum)": 99.0}}})
    rows = table.paper_table(encoder, TASKS, alphas=(0.5, 2.0), output_dir=tmp_path / "results", instructions=False)
    assert [row["type"] for row in rows] == sorted(row["type"] for row in rows)
    assert len(encoded) == len(set(encoded))  # no text encoded twice for one pooling
    assert {pooling for pooling, _, _ in encoded} == {"last", "mean"}
    monkeypatch.setattr(encoder, "encode", real)

    by_task = {row["task"]: row for row in rows}
    for task in TASKS:
        row = by_task[task.metadata.name]
        for pooling in ("last", "mean"):
            for variant, column in (("hs", "HS"), ("rw", "RW"), ("concat", "MoEE(concat)")):
                alone = MoEEModel(encoder, variant=variant, rw_pooling=pooling, hs_pooling=pooling, instructions=False)
                result = mteb.evaluate(alone, [task], cache=mteb.ResultCache(tmp_path / "alone"), show_progress_bar=False)
                assert row[f"{column} {pooling}"] == pytest.approx(100 * result.task_results[0].get_score(), abs=1e-6)
            sums = []
            for alpha in (0.5, 2.0):
                alone = MoEEModel(encoder, alpha=alpha, rw_pooling=pooling, hs_pooling=pooling, instructions=False)
                result = mteb.evaluate(alone, [task], cache=mteb.ResultCache(tmp_path / "alone"), show_progress_bar=False)
                sums.append(100 * result.task_results[0].get_score())
            assert row[f"MoEE(sum) {pooling}"] == pytest.approx(max(sums), abs=1e-6)
            assert row[f"alpha {pooling}"] == (0.5, 2.0)[sums.index(max(sums))]
    assert by_task["MockSTSTask"]["paper MoEE(sum)"] == 12.5 and "paper MoEE(sum)" not in by_task["MockRetrievalTask"]

    md, path_csv = table.write_table(rows, tmp_path / "table.md", "demo")
    text = open(md).read()
    assert "paper MoEE(sum)" in text and "Li & Zhou" in text and "average (1)" in text
    with open(path_csv) as file:
        written = list(csv.DictReader(file))
    assert len(written) == len(rows) + len({row["type"] for row in rows})
    assert all(math.isfinite(float(r["HS last"])) for r in written)


def test_mean_pooling_names_a_different_model(encoder):
    names = {MoEEModel(encoder, variant=v, rw_pooling=r, hs_pooling=h).mteb_model_meta.name
             for v in ("sum", "concat") for r in ("last", "mean") for h in ("last", "mean")}
    assert len(names) == 8
    assert MoEEModel(encoder, variant="hs", rw_pooling="mean").mteb_model_meta.name == MoEEModel(encoder, variant="hs").mteb_model_meta.name
    meta = MoEEModel(encoder, variant="rw", rw_pooling="mean").mteb_model_meta
    assert meta.name.endswith("-MoEE-rw-rwmean") and meta.loader_kwargs["rw_pooling"] == "mean"
    loaded = meta.load_model()
    assert (loaded.rw_pooling, loaded.mteb_model_meta.name) == ("mean", meta.name)
    with pytest.raises(ValueError, match="hs_pooling must be one of last, mean"):
        MoEEModel(encoder, hs_pooling="max")


def test_cli_writes_the_table(demo_path, tmp_path, monkeypatch, capsys):
    real_get_tasks = mteb.get_tasks
    monkeypatch.setattr(mteb, "get_tasks", lambda tasks: [MockSTSTask()] if tasks == ["MockSTSTask"] else real_get_tasks(tasks=tasks))
    out = tmp_path / "paper"
    assert main(["paper-table", "--model", demo_path, "--tasks", "MockSTSTask", "--alphas", "1,3",
                 "--poolings", "last,mean", "--no-instructions", "--output", str(out)]) == 0
    text = (tmp_path / "paper.md").read_text()
    assert "MockSTSTask" in text and "MoEE(sum) mean" in text and "alpha last" in text
    assert str(tmp_path / "paper.md") in capsys.readouterr().out
    with pytest.raises(SystemExit, match="pooling"):
        main(["paper-table", "--model", demo_path, "--tasks", "MockSTSTask", "--poolings", "first", "--output", str(out)])


def test_paper_figures_are_the_papers_tables():
    """Each type average of the paper's Tables 3-4 is the mean of its Appendix A rows for that type:
    a figure mistyped in either table breaks the equality (one mismatch is in the paper itself)."""
    from moee_fast.mteb.paper_figures import COLUMNS, PAPER_TYPE_AVERAGES, PROMPTS, _TASKS

    assert set(data.PAPER_FIGURES) == set(PAPER_TYPE_AVERAGES) == {
        "deepseek-ai/deepseek-moe-16b-base", "Qwen/Qwen1.5-MoE-A2.7B", "allenai/OLMoE-1B-7B-0924"}
    assert all(task in data.PAPER_TASKS for tasks in _TASKS.values() for task in tasks)
    mismatches = []
    for checkpoint, prompts in data.PAPER_FIGURES.items():
        assert set(prompts) == set(PROMPTS)
        for prompt, figures in prompts.items():
            types = PAPER_TYPE_AVERAGES[checkpoint][prompt]
            for column in COLUMNS:
                for task_type, tasks in _TASKS.items():
                    mean = sum(figures[task][column] for task in tasks) / len(tasks)
                    if abs(mean - types[task_type][column]) > 0.006:
                        mismatches.append((checkpoint, prompt, task_type, column))
                six = [types[t][column] for t in ("Classification", "Clustering", "PairClassification", "Reranking", "STS", "Summarization")]
                assert sum(six) / 6 == pytest.approx(types["average"][column], abs=0.006)
    assert mismatches == [("deepseek-ai/deepseek-moe-16b-base", "none", "Reranking", "HS")]
    assert data.PAPER_FIGURES["allenai/OLMoE-1B-7B-0924"]["prompteol"]["STSBenchmark"]["MoEE(sum)"] == 75.58
    assert PAPER_TYPE_AVERAGES["allenai/OLMoE-1B-7B-0924"]["prompteol"]["average"]["MoEE(sum)"] == 55.16
