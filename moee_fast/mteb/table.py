"""The paper's table for one model: every variant (HS, RW, MoEE concat, MoEE sum with alpha tuned
per task, as the paper tuned it at test time) x pooling, on a list of MTEB tasks, grouped by task
type, written as markdown and CSV.

Each text is encoded once per pooling (and prompt): HS and RW are kept, and every variant and alpha
is combined from them. The paper's reported figures, where `PAPER_FIGURES` holds them for the
model, prompt (none or PromptEOL) and task, stand beside ours in columns marked as the paper's.
"""

from __future__ import annotations

import csv
import os
import tempfile
from collections.abc import Sequence
from typing import Any

import mteb
import torch

from ..checks import check_alpha, check_pooling
from ..embeddings import MoEEmbeddings
from ..encoder import MoEEncoder
from .data import DEFAULT_PROMPT, PAPER_FIGURES
from .model import MoEEModel
from .naming import mteb_model_name

# alpha candidates for MoEE(sum); per task the best main score among them is reported, with its alpha.
ALPHA_GRID = (0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)
COLUMNS = ("HS", "RW", "MoEE(concat)", "MoEE(sum)")


class _SharedEncodes(MoEEModel):
    """A MoEEModel that encodes each (prompt, text) once per pooling and serves every later
    variant and alpha from the rows kept in `store`."""

    def __init__(self, encoder: MoEEncoder, store: dict, **settings):
        super().__init__(encoder, **settings)
        self.store = store

    def embed(self, texts, task_name="", prompt_type=None, show_progress_bar=None, batch_size=None) -> MoEEmbeddings:
        prompt = self.prompt_for(task_name, prompt_type)
        key = (self.rw_pooling, self.hs_pooling, None if prompt is None else prompt.format("\0"))
        rows = self.store.setdefault(key, {})
        missing = list(dict.fromkeys(text for text in texts if text not in rows))
        if missing:
            out = super().embed(missing, task_name, prompt_type, show_progress_bar, batch_size)
            rows.update(zip(missing, zip(out.hs, out.rw)))
            self.store.setdefault("metadata", out.metadata)
        hs = torch.stack([rows[text][0] for text in texts])
        rw = torch.stack([rows[text][1] for text in texts])
        return MoEEmbeddings(hs, rw, dict(self.store["metadata"]))


def paper_table(
    encoder: MoEEncoder, tasks: Sequence, poolings: Sequence[str] = ("last", "mean"), alphas: Sequence[float] = ALPHA_GRID,
    output_dir: str | os.PathLike | None = None, **settings: Any,
) -> list[dict[str, Any]]:
    """One row per task (MTEB task objects): its type, main score name, and per pooling each
    column's main score (x100) and the tuned alpha of MoEE(sum). A pooling applies to both HS and
    RW ("mean": over every token the model sees, prompt and special tokens included). mteb's result
    files go under `output_dir` (a temporary folder when None). settings: MoEEModel's (prompt,
    instructions, batch_size, ...)."""
    poolings = [check_pooling("pooling", pooling) for pooling in poolings]
    alphas = [check_alpha(alpha) for alpha in alphas]
    if not poolings or not alphas:
        raise ValueError("paper_table needs at least one pooling and one alpha")
    store: dict = {}
    with tempfile.TemporaryDirectory() as scratch:
        cache = mteb.ResultCache(output_dir if output_dir is not None else scratch)

        def scores(variant: str, pooling: str, alpha: float = 1.0) -> dict[str, float]:
            model = _SharedEncodes(encoder, store, variant=variant, alpha=alpha, rw_pooling=pooling, hs_pooling=pooling, **settings)
            result = mteb.evaluate(model, list(tasks), cache=cache, overwrite_strategy="always", show_progress_bar=False)
            return {r.task_name: 100 * r.get_score() for r in result.task_results}

        table = {task.metadata.name: {"task": task.metadata.name, "type": task.metadata.type, "main_score": task.metadata.main_score}
                 for task in tasks}
        for pooling in poolings:
            for variant, column in zip(("hs", "rw", "concat"), COLUMNS):
                for name, score in scores(variant, pooling).items():
                    table[name][f"{column} {pooling}"] = score
            by_alpha = {alpha: scores("sum", pooling, alpha) for alpha in alphas}
            for name, row in table.items():
                best = max(alphas, key=lambda alpha: by_alpha[alpha][name])  # the first of equals: the smallest listed
                row[f"MoEE(sum) {pooling}"], row[f"alpha {pooling}"] = by_alpha[best][name], best
    figures = PAPER_FIGURES.get(mteb_model_name(encoder.name), {}).get(_paper_prompt(settings.get("prompt", DEFAULT_PROMPT)), {})
    for name, row in table.items():
        for column, value in figures.get(name, {}).items():
            row[f"paper {column}"] = value
    return sorted(table.values(), key=lambda row: (row["type"], row["task"]))


def _paper_prompt(prompt) -> str | None:
    """The paper's prompt setting this table's prompt matches: "none", "prompteol" or None (another prompt)."""
    return {None: "none", "none": "none", "prompteol": "prompteol"}.get(prompt)


def columns_of(rows: list[dict[str, Any]]) -> list[str]:
    """The table's columns in order: task, type, main score, ours per pooling, then the paper's."""
    seen = list(dict.fromkeys(key for row in rows for key in row))
    ours = [key for key in seen if key not in ("task", "type", "main_score") and not key.startswith("paper ")]
    return ["task", "type", "main_score", *ours, *[key for key in seen if key.startswith("paper ")]]


def with_type_averages(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows, each task type followed by its average row (over the tasks that have the column)."""
    out: list[dict[str, Any]] = []
    for task_type in dict.fromkeys(row["type"] for row in rows):
        group = [row for row in rows if row["type"] == task_type]
        out += group
        average = {"task": f"average ({len(group)})", "type": task_type, "main_score": ""}
        for column in columns_of(group)[3:]:
            if not column.startswith("alpha"):
                values = [row[column] for row in group if isinstance(row.get(column), (int, float))]
                if values:
                    average[column] = sum(values) / len(values)
        out.append(average)
    return out


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.2f}" if abs(value) >= 0.01 or value == 0 else f"{value:.3g}"
    return "" if value is None else str(value)


def write_table(rows: list[dict[str, Any]], path: str | os.PathLike, model_name: str = "") -> list[str]:
    """Write `<path>.md` and `<path>.csv` (path without suffix) with the type averages; returns both paths."""
    rows = with_type_averages(rows)
    columns = columns_of(rows)
    base = os.fspath(path)
    base = base[: -len(".md")] if base.endswith(".md") else base[: -len(".csv")] if base.endswith(".csv") else base
    with open(base + ".csv", "w", newline="", encoding="utf-8") as file:
        writer = csv.writer(file)
        writer.writerow(columns)
        writer.writerows([[_cell(row.get(column)) for column in columns] for row in rows])
    lines = [
        f"# MoEE variants x pooling{': ' + model_name if model_name else ''}",
        "",
        "Main score of each task x 100. last: the last token's HS and RW (the paper's MoEE); mean: the mean over every",
        "token the model sees for a text (prompt and special tokens included). MoEE(sum): the best alpha of the grid",
        "per task (the alpha column), as the paper tuned alpha at test time. Columns headed `paper` are the figures",
        "reported in Li & Zhou, \"Your Mixture-of-Experts LLM Is Secretly an Embedding Model for Free\" (ICLR 2025), not ours.",
        "",
        "| " + " | ".join(columns) + " |",
        "|" + "|".join("---" for _ in columns) + "|",
    ]
    lines += ["| " + " | ".join(_cell(row.get(column)) for column in columns) + " |" for row in rows]
    with open(base + ".md", "w", encoding="utf-8") as file:
        file.write("\n".join(lines) + "\n")
    return [base + ".md", base + ".csv"]
