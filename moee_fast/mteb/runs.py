"""Evaluation runs: MTEB tasks by name, `evaluate` writing mteb's own result files, and the folder
they land in."""

from __future__ import annotations

import os
from typing import Any

import mteb
from mteb.types import OutputDType

from .model import MoEEModel

# Most texts per forward when `moee mteb` is given no --batch-size: above what any token budget
# fills with real texts, so the budget decides (mteb's own default would be 32).
MTEB_BATCH_SIZE = 4096


def get_tasks(task_names: list[str]) -> list:
    """MTEB's task objects for these names."""
    return list(mteb.get_tasks(tasks=list(task_names)))


def evaluate(model: MoEEModel, tasks: list, output_dir: str | os.PathLike | None = None, overwrite: bool = False,
             encode_kwargs: dict[str, Any] | None = None):
    """Run MTEB tasks (names or task objects) with `model`, writing MTEB's result files under
    `output_dir` (see `results_folder`; mteb's default cache when None). encode_kwargs: mteb's
    (batch_size defaults to the model's, else MTEB_BATCH_SIZE: the token budget decides).
    Returns mteb's ModelResult."""
    tasks = [get_tasks([task])[0] if isinstance(task, str) else task for task in tasks]
    cache = mteb.ResultCache(output_dir) if output_dir is not None else mteb.ResultCache()
    encode_kwargs = {"batch_size": model.batch_size or MTEB_BATCH_SIZE, **(encode_kwargs or {})}
    return mteb.evaluate(
        model, tasks, cache=cache, encode_kwargs=encode_kwargs, overwrite_strategy="always" if overwrite else "only-missing"
    )


def results_folder(model: MoEEModel, output_dir: str | os.PathLike | None = None, precision: str | None = None):
    """The folder where `evaluate(model, ..., output_dir)` writes its task files:
    `<output_dir>/results/<name with / as __>/<revision>/`, then `experiments/<options>/` when
    the model has reproduction options (`MoEEModel.experiment_kwargs`) or a `precision` is asked
    (mteb adds it as `output_dtypes`)."""
    cache = mteb.ResultCache(output_dir) if output_dir is not None else mteb.ResultCache()
    meta = model.mteb_model_meta
    if precision is not None:
        options = {**(meta.experiment_kwargs or {}), "output_dtypes": OutputDType.from_str(precision).value}
        meta = meta.model_copy(update={"experiment_kwargs": options})
    return cache.get_task_result_path("task", meta).parent

