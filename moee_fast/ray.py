"""MoEE on Ray Data (`pip install moee-fast[ray]`): a callable class for `Dataset.map_batches`
that adds `hs` and `rw` columns, and the corpus job run as read -> map_batches -> write_parquet.

    ds.map_batches(MoEEBatchEncoder, fn_constructor_kwargs={"model": "allenai/OLMoE-1B-7B-0924"},
                   batch_size=1024, batch_format="pyarrow", num_gpus=1, concurrency=4)

Each actor loads the model once. Rows keep their order and ids; the output reads back with
`moee_fast.load_corpus`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re

from .corpus import readers
from .corpus.integrity import shard_record
from .corpus.job import CorpusJob, job_files, name_rows, remove_files
from .corpus.store import embedding_table

# Orders rows across files: file index in the high bits, row number below.
_ROW_BITS = 40
DATA_DIR, CHECKPOINT_DIR = "data", "checkpoint"
# Reading and writing are light next to the model; a whole CPU each could find none left once
# the encoder actors and, on a resumed run, Ray's checkpoint-filter actor (1 CPU) hold them all.
_IO_TASK_ARGS = {"num_cpus": 0.25}
logger = logging.getLogger(__name__)


class MoEEBatchEncoder:
    """Adds `hs` (fixed-size list of H float32) and `rw` (L*E float32, [L, E] in the schema
    metadata) to each batch; a pyarrow Table, a pandas DataFrame or a dict of numpy arrays in,
    a pyarrow Table out."""

    def __init__(self, model: str, prompt=None, text_column: str = "text", device=None, dtype=None,
                 batch_size=None, max_length=None, rw_source: str = "scores", threads: int | None = None,
                 rw_pooling: str = "last", hs_pooling: str = "last"):
        import torch

        from .encoder import MoEEncoder

        if threads:
            torch.set_num_threads(threads)
        self.encoder = MoEEncoder.from_pretrained(model, device=device, dtype=dtype)
        self.text_column = text_column
        self.options = dict(prompt=prompt, batch_size=batch_size, max_length=max_length, rw_source=rw_source,
                            rw_pooling=rw_pooling, hs_pooling=hs_pooling)

    def __call__(self, batch):
        import pyarrow as pa

        table = batch if isinstance(batch, pa.Table) else (
            pa.Table.from_pandas(batch, preserve_index=False) if hasattr(batch, "iloc") else pa.table(dict(batch))
        )
        if self.text_column not in table.column_names:
            raise ValueError(f"the batch has no column {self.text_column!r} (it has {', '.join(table.column_names)})")
        texts = table.column(self.text_column).to_pylist()
        try:
            out = self.encoder.encode(texts, show_progress_bar=False, **self.options)
        except (ValueError, TypeError) as exc:
            wheres = table.column("id").to_pylist() if "id" in table.column_names else []
            raise type(exc)(name_rows(str(exc), [str(w) for w in wheres])) from None
        return embedding_table(table, out.hs, out.rw)


def _rows_datasource(paths: list[str], text_field: str, id_field: str | None, quoting: str, fingerprints: list[dict]):
    from ray.data import Datasource

    class Rows(Datasource):
        def get_read_tasks(self, parallelism, per_task_row_limit=None, data_context=None):
            return _read_tasks(paths, text_field, id_field, quoting, fingerprints)

        def estimate_inmemory_data_size(self):
            return None

    return Rows()


def _written_shards(output_dir: str) -> dict:
    """The parquet files Ray wrote, ordered by their first row; whether their rows, joined in
    that order, follow the input (a resumed run may interleave them). Reads only the row keys."""
    import pyarrow.parquet as pq

    files = []
    for name in _data_files(output_dir):
        keys = pq.read_table(os.path.join(output_dir, name), columns=["row"]).column("row").to_pylist()
        if keys:
            files.append((keys[0], keys, name))
    files.sort(key=lambda f: f[0])
    keys = [key for f in files for key in f[1]]
    if len(set(keys)) != len(keys):  # never expected: refuse rather than return a row twice
        raise RuntimeError(f"{output_dir}: rows written twice under {DATA_DIR}/; rerun with --overwrite (overwrite=True)")
    shape = None
    if files:
        schema = pq.read_schema(os.path.join(output_dir, files[0][2]))
        layers, experts = json.loads(schema.metadata[b"moee_rw_shape"])
        shape = [schema.field("hs").type.list_size, layers, experts]
    shards = [{"file": f[2], "start": None, "input_rows": len(f[1]), "rows": len(f[1]), "dtype": "float32",
               **shard_record(os.path.join(output_dir, f[2]))} for f in files]
    return {"shards": shards, "shape": shape, "sort_by_row": keys != sorted(keys), "total_rows": len(keys)}


def _read_tasks(paths: list[str], text_field: str, id_field: str | None, quoting: str, fingerprints: list[dict]):
    """One Ray read task per input file, each reading it with moee-fast's own reader (same rows
    and ids as the local job; a file that changed since the job started is refused), in blocks
    of 4,096 rows."""
    from ray.data import ReadTask
    from ray.data.block import BlockMetadata

    def read(file_index: int, path: str):
        import pyarrow as pa

        block: dict[str, list] = {"id": [], "text": [], "row": []}
        rows = readers.read_rows([path], text_field, id_field, quoting, fingerprints=[fingerprints[file_index]])
        for number, row in enumerate(rows):
            block["id"].append(row.id)
            block["text"].append(row.text)
            block["row"].append((file_index << _ROW_BITS) | number)
            if len(block["id"]) == 4096:
                yield pa.table(block)
                block = {"id": [], "text": [], "row": []}
        if block["id"]:
            yield pa.table(block)

    return [
        ReadTask(lambda i=i, p=p: read(i, p), BlockMetadata(num_rows=None, size_bytes=None, exec_stats=None, input_files=(p,)))
        for i, p in enumerate(paths)
    ]


def encode_corpus_ray(model: str, inputs, output_dir: str, *, prompt=None, shard_size: int = 10_000,
                      text_field="text", id_field=None, overwrite=False, batch_size=None, max_length=None,
                      rw_source="scores", dtype=None, ray_address=None, concurrency: int = 1,
                      num_gpus: float = 0, num_cpus: float | None = None, quoting="csv", duplicate_ids="warn",
                      full_hashes=False, rw_pooling="last", hs_pooling="last") -> dict:
    """The corpus job on Ray Data: our readers -> map_batches(MoEEBatchEncoder) -> write_parquet
    into `output_dir`, resumable through Ray Data's checkpointing where the installed Ray has it,
    then a manifest for `load_corpus`. Returns the run's {rows, tokens, seconds}. rw_pooling and
    hs_pooling are `encode`'s; a choice other than "last" is recorded in the manifest as the local
    job records it.

    num_cpus: CPUs per encoder actor; None asks for 1 where the cluster keeps one more free for
    the checkpoint filter of a resumed run, else what is left (a 2-CPU machine: 0.5). An error
    inside Ray is raised as the original exception's one line."""
    if readers.STDIN in readers.expand_inputs(inputs):
        raise ValueError("--engine ray reads files: stdin (-) is not one")
    job = CorpusJob(model, inputs, output_dir, dtype=dtype or "auto", prompt=prompt, shard_size=shard_size,
                    text_field=text_field, id_field=id_field, overwrite=overwrite, format="parquet",
                    batch_size=batch_size, max_length=max_length, rw_source=rw_source, engine="ray",
                    quoting=quoting, duplicate_ids=duplicate_ids, full_hashes=full_hashes,
                    rw_pooling=rw_pooling, hs_pooling=hs_pooling)
    try:
        if job.manifest["complete"]:
            _remove_folder(output_dir, CHECKPOINT_DIR)  # left if a finished run stopped just before
            return {"rows": 0, "tokens": 0, "seconds": 0.0}
        return _run_on_ray(job, model, ray_address, concurrency, num_gpus, num_cpus)
    except Exception as exc:
        raise _plain_error(exc) from None
    finally:
        job.close()


def _actor_cpus(concurrency: int, num_cpus: float | None) -> float:
    import ray

    if num_cpus is not None:
        return num_cpus
    spare = ray.cluster_resources().get("CPU", 1) - 1 - _IO_TASK_ARGS["num_cpus"]  # the filter, a read/write task
    return max(0.25, min(1.0, spare / max(concurrency, 1)))


def _plain_error(exc: BaseException) -> BaseException:
    """The exception a Ray task raised, as its own one line: Ray wraps it (RayTaskError,
    UserCodeException) with the worker's coloured traceback in the text, the original last."""
    texts = []
    while exc is not None and len(texts) < 8:
        texts.append(re.sub(r"\x1b\[[0-9;]*m", "", str(exc)))
        if not isinstance(exc, _ray_errors()):
            break
        exc = getattr(exc, "cause", None) or exc.__cause__
    raised = [m for text in texts for m in _RAISED.finditer(text) if m.group(1) not in _WRAPPERS]
    if raised:
        kind, message = raised[-1].group(1), raised[-1].group(2).strip()
        return ValueError(message) if kind in ("ValueError", "TypeError") else RuntimeError(f"{kind}: {message}")
    if exc is not None and not isinstance(exc, _ray_errors()):
        return exc
    lines = [line.strip() for line in texts[-1].splitlines() if line.strip()]
    return RuntimeError(lines[0] if lines else "the Ray job failed")


# "ValueError: in.txt:2 is empty ..." as a traceback's last line shows it.
_RAISED = re.compile(r"^(?:[\w.]+\.)?(\w+(?:Error|Exception)): (.+)$", re.MULTILINE)
_WRAPPERS = ("RayTaskError", "UserCodeException", "RayError", "RayActorError")


def _ray_errors() -> tuple[type, ...]:
    import ray.exceptions

    return (ray.exceptions.RayError,)


def _run_on_ray(job: CorpusJob, model: str, ray_address, concurrency: int, num_gpus: float, num_cpus) -> dict:
    import time

    import ray

    output_dir, options, encode = job.output_dir, job.spec["options"], job.encode_options
    text_field, id_field, shard_size = options["text_field"], options["id_field"], job.shard_size
    dtype = None if job.spec["dtype"] == "auto" else job.spec["dtype"]
    if not ray.is_initialized():
        ray.init(address=ray_address, log_to_driver=False)
    num_cpus = _actor_cpus(concurrency, num_cpus)
    start = time.perf_counter()
    with _job_context(output_dir) as ray_data:
        job.save_manifest()
        earlier = set(_data_files(output_dir))
        rows = _rows_datasource(job.paths, text_field, id_field, options["quoting"], job.spec["inputs"])
        ds = ray_data.read_datasource(rows, ray_remote_args=_IO_TASK_ARGS)
        ds = ds.map_batches(
            MoEEBatchEncoder, batch_size=shard_size, batch_format="pyarrow", concurrency=concurrency,
            num_gpus=num_gpus or None, num_cpus=num_cpus,
            fn_constructor_kwargs=dict(model=model, dtype=dtype, **encode),
        )
        ds.drop_columns(["text"]).write_parquet(os.path.join(output_dir, DATA_DIR), ray_remote_args=_IO_TASK_ARGS)
    job.manifest.update(_written_shards(output_dir), complete=True)
    rows = sum(entry["rows"] for entry in job.manifest["shards"] if entry["file"] not in earlier)
    job.manifest["last_run"] = {"rows": rows, "tokens": 0, "seconds": round(time.perf_counter() - start, 3)}
    job.save_manifest()
    _remove_folder(output_dir, CHECKPOINT_DIR)  # only now: a rerun before this point skips every row
    return job.manifest["last_run"]


@contextlib.contextmanager
def _job_context(output_dir: str):
    """Ray Data set for this job (rows kept in order, checkpointing on), its previous settings
    restored afterwards; yields the ray.data module."""
    import ray.data

    context = ray.data.DataContext.get_current()
    saved = context.execution_options.preserve_order, getattr(context, "checkpoint_config", None)
    context.execution_options.preserve_order = True
    try:
        _drop_unresumable_output(output_dir, checkpointing=_enable_checkpointing(context, output_dir))
        yield ray.data
    finally:
        context.execution_options.preserve_order, context.checkpoint_config = saved


def _enable_checkpointing(context, output_dir: str) -> bool:
    """Ask Ray Data to checkpoint the job, keyed by the `row` column (unique and stable for the
    same inputs, unlike a user's --id-field); False where the installed Ray cannot."""
    try:
        from ray.data.checkpoint import CheckpointConfig
    except ImportError:
        logger.warning("this Ray has no Data checkpointing (ray.data.checkpoint): an interrupted job starts over")
        return False
    context.checkpoint_config = CheckpointConfig(
        id_column="row", checkpoint_path=os.path.abspath(os.path.join(output_dir, CHECKPOINT_DIR)),
        delete_checkpoint_on_success=False,
    )
    return True


def _drop_unresumable_output(output_dir: str, checkpointing: bool) -> None:
    """Ray writes a row's checkpoint before its data file, so data files without a checkpoint
    folder (or without checkpointing) are from a run that cannot be resumed: remove them, or
    the rerun would write their rows twice."""
    if not checkpointing or not os.path.isdir(os.path.join(output_dir, CHECKPOINT_DIR)):
        _remove_folder(output_dir, DATA_DIR)
        _remove_folder(output_dir, CHECKPOINT_DIR)


def _data_files(output_dir: str) -> list[str]:
    folder = os.path.join(output_dir, DATA_DIR)
    return [os.path.join(DATA_DIR, name) for name in sorted(os.listdir(folder))] if os.path.isdir(folder) else []


def _remove_folder(output_dir: str, folder: str) -> None:
    """Remove the files the job wrote under `folder` (its parquet files); anything else there
    was refused when the job started, and stays."""
    ours, _ = job_files(output_dir, has_manifest=True, ray=True)
    remove_files(output_dir, [name for name in ours if name.startswith(folder + os.sep)])
