"""Corpus jobs: read any number of inputs as a stream, encode them in shards (resumable, on one
or several devices) and read the result back memory-mapped."""

from __future__ import annotations

import os

from .job import DEFAULT_SHARD_SIZE, CorpusInterrupted, CorpusJob
from .integrity import JobLocked
from .load import Corpus, load_corpus, verify_corpus
from .workers import InProcess, WorkerPool, parse_devices

__all__ = ["Corpus", "CorpusInterrupted", "DEFAULT_SHARD_SIZE", "JobLocked", "encode_corpus", "load_corpus",
           "plan_corpus_job", "verify_corpus"]


def plan_corpus_job(encoder, inputs, output_dir, *, devices=None, dtype=None, **options) -> tuple[CorpusJob, list[str] | None]:
    """Check everything (inputs, output directory, options, an existing manifest) before any
    model loads; returns the job and the parsed devices."""
    from ..loading.placement import resolve_dtype

    import torch

    devices = parse_devices(devices) if devices is not None else None
    if isinstance(encoder, (str, os.PathLike)):
        encoder = os.fspath(encoder)
        device = torch.device(devices[0] if devices else ("cuda" if torch.cuda.is_available() else "cpu"))
        resolved = resolve_dtype(dtype, device)
    else:
        resolved = next(encoder.model.parameters()).dtype
    return CorpusJob(encoder, inputs, output_dir, dtype=resolved, devices=devices, **options), devices


def encode_corpus(encoder, inputs, output_dir, *, prompt=None, shard_size=DEFAULT_SHARD_SIZE, text_field="text",
                  id_field=None, devices=None, overwrite=False, format="safetensors", batch_size=None,
                  max_length=None, rw_source="scores", skip_empty=False, dtype=None, progress=None, quoting="csv",
                  duplicate_ids="warn", full_hashes=False, rw_pooling="last", hs_pooling="last") -> Corpus:
    """Encode the rows of `inputs` (paths, globs or "-") into `output_dir` as shards and a
    manifest, resuming a previous run of the same job; returns the result as `load_corpus` does.
    Another job running on `output_dir` is refused (JobLocked) naming its process.

    encoder: a MoEEncoder, or a checkpoint name loaded after every check passed (in this process,
    or once per worker with `devices`, e.g. "cuda:0,cuda:1", "all" or ["cpu", "cpu"]).
    quoting: "csv" (the csv module's rules) or "none" (raw fields) for .csv/.tsv inputs.
    duplicate_ids: "warn" or "error" when an `id_field` value repeats.
    full_hashes: fingerprint the model by a SHA-256 of every file (default: names, sizes,
    safetensors headers and small files' hashes).
    rw_pooling, hs_pooling: as `MoEEncoder.encode` takes them (recorded in the manifest's options).
    """
    job, devices = plan_corpus_job(
        encoder, inputs, output_dir, devices=devices, dtype=dtype, prompt=prompt, shard_size=shard_size,
        text_field=text_field, id_field=id_field, overwrite=overwrite, format=format, batch_size=batch_size,
        max_length=max_length, rw_source=rw_source, skip_empty=skip_empty, quoting=quoting,
        duplicate_ids=duplicate_ids, full_hashes=full_hashes, rw_pooling=rw_pooling, hs_pooling=hs_pooling,
    )
    run_corpus_job(job, encoder, devices, progress)
    return load_corpus(output_dir)


def run_corpus_job(job: CorpusJob, encoder, devices: list[str] | None, progress=None) -> dict:
    """Run a planned job in this process or on a worker per device; returns this run's stats."""
    try:
        return _run(job, encoder, devices, progress)
    finally:
        job.close()


def _run(job: CorpusJob, encoder, devices: list[str] | None, progress) -> dict:
    dtype = job.spec["dtype"].replace("torch.", "")
    if devices and len(devices) > 1:
        model = encoder if isinstance(encoder, str) else encoder.name
        executor = WorkerPool(model, devices, dtype, job.encode_options, job.output_dir, job.format)
    else:
        if isinstance(encoder, str):
            from ..encoder import MoEEncoder

            encoder = MoEEncoder.from_pretrained(encoder, device=devices[0] if devices else None, dtype=dtype)
        executor = InProcess(encoder, job.encode_options, job.output_dir, job.format)
    return job.run(executor, progress)
