"""The sharded, resumable corpus job: rows are read in order and cut into shards of
`shard_size`; each shard is encoded in one call (tokenized and sorted by length there, so memory
is bounded by the shard, not the corpus), written atomically, and recorded in `manifest.json`,
which is itself replaced atomically after every shard. A rerun skips the recorded shards."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import time
from dataclasses import dataclass, field

from ..checks import check_pooling, check_positive_int, check_rw_source
from ..files import check_writable_dir, write_json_atomic
from ..prompts import resolve_prompt
from . import readers
from .store import SHARD_FORMATS, shard_name, write_shard

DEFAULT_SHARD_SIZE = 10_000
MANIFEST = "manifest.json"
FORMAT = "moee-fast-corpus/1"
# What a job leaves in its directory: the manifest, shards, Ray's data and checkpoint folders, and,
# after a kill mid-write, our temp files (.part-00003.safetensors.XXXX.tmp) or safetensors' own
# (it writes through a ".tmp" + 6 characters file beside the target, then renames).
_LEFTOVER = re.compile(r"^(\.(manifest\.json|part-\d{5}\.\w+)\..*\.tmp|\.tmp[A-Za-z0-9]{6})$")
_OURS = re.compile(r"^(manifest\.json|part-\d{5}\.(safetensors|parquet)|data|checkpoint)$")


class CorpusInterrupted(KeyboardInterrupt):
    """Ctrl-C during a corpus job: its message says how far it got and how to resume."""


@dataclass
class Shard:
    """One shard's rows, as a worker encodes them."""

    index: int
    start: int  # first input row
    input_rows: int
    ids: list[str] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    wheres: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


@dataclass
class ShardResult:
    index: int
    entry: dict | None = None  # the manifest's record of the shard
    tokens: int = 0
    shape: list[int] | None = None
    error: str | None = None
    error_type: str = "RuntimeError"


def encode_shard(encoder, shard: Shard, options: dict, output_dir: str, fmt: str) -> ShardResult:
    """Encode one shard and write it atomically; an error names the row's file:line."""
    try:
        out = encoder.encode(
            shard.texts, batch_size=options["batch_size"], prompt=options["prompt"],
            max_length=options["max_length"], rw_source=options["rw_source"], show_progress_bar=False,
            rw_pooling=options.get("rw_pooling", "last"), hs_pooling=options.get("hs_pooling", "last"),
        )
    except ValueError as exc:
        raise ValueError(name_rows(str(exc), shard.wheres)) from None
    name = shard_name(shard.index, fmt)
    write_shard(os.path.join(output_dir, name), shard.ids, out.hs, out.rw)
    entry = {"file": name, "start": shard.start, "input_rows": shard.input_rows, "rows": len(shard.ids)}
    if shard.skipped:
        entry["skipped"] = shard.skipped
    return ShardResult(shard.index, entry, int(out.metadata.get("tokens", 0)), [out.hs.shape[1], *out.rw.shape[1:]])


def name_rows(message: str, wheres: list[str]) -> str:
    """An encoder message names texts[i] of the shard; name the input's file:line instead."""
    return re.sub(r"texts\[(\d+)\]", lambda m: wheres[int(m.group(1))] if int(m.group(1)) < len(wheres) else m.group(0), message)


# --------------------------------------------------------------------------------------------
def model_identity(model) -> tuple[str, str]:
    """(name, SHA-256 of its config.json) of a checkpoint name or a loaded MoEEncoder."""
    name = model if isinstance(model, str) else getattr(model, "name", "")
    if not name and not isinstance(model, str):
        return "", hashlib.sha256(model.model.config.to_json_string().encode()).hexdigest()
    name = os.path.expanduser(name)
    if os.path.isdir(name):
        path = os.path.join(name, "config.json")
    else:
        from transformers.utils import cached_file

        path = cached_file(name, "config.json")
    if not path or not os.path.isfile(path):
        raise FileNotFoundError(f"no config.json for the model {name!r}")
    with open(path, "rb") as f:
        return name, hashlib.sha256(f.read()).hexdigest()


class CorpusJob:
    """Everything checked before a model loads: inputs, output directory, options, and whether
    an existing manifest can be resumed."""

    def __init__(self, model, inputs, output_dir, *, dtype: str, prompt=None, shard_size=DEFAULT_SHARD_SIZE,
                 text_field="text", id_field=None, overwrite=False, format="safetensors", batch_size=None,
                 max_length=None, rw_source="scores", skip_empty=False, engine="local", rw_pooling="last",
                 hs_pooling="last"):
        if format not in SHARD_FORMATS:
            raise ValueError(f"format must be one of {', '.join(SHARD_FORMATS)}, got {format!r}")
        if prompt is not None and not isinstance(prompt, str):
            raise TypeError(f"prompt must be None, a preset name or a template string, got {type(prompt).__name__}")
        resolve_prompt(prompt)
        self.paths = readers.expand_inputs(inputs)
        self.output_dir = os.fspath(output_dir)
        self.format = format
        self.encode_options = {
            "prompt": prompt, "batch_size": check_positive_int("batch_size", batch_size, allow_none=True),
            "max_length": check_positive_int("max_length", max_length, allow_none=True),
            "rw_source": check_rw_source(rw_source),
            "rw_pooling": check_pooling("rw_pooling", rw_pooling), "hs_pooling": check_pooling("hs_pooling", hs_pooling),
        }
        pooling = {name: value for name, value in (("rw_pooling", rw_pooling), ("hs_pooling", hs_pooling)) if value != "last"}
        if pooling and engine != "local":
            raise ValueError(f"{', '.join(pooling)}: the {engine} engine encodes the last token only")
        name, config_hash = model_identity(model)
        self.spec = {
            "format": FORMAT, "model": name, "config_sha256": config_hash, "dtype": str(dtype),
            "prompt": "" if prompt is None else prompt, "rw_source": rw_source,
            "options": {"shard_size": check_positive_int("shard_size", shard_size), "text_field": text_field,
                        "id_field": id_field, "max_length": max_length, "skip_empty": bool(skip_empty), "format": format,
                        "engine": engine, **pooling},
            "inputs": [readers.fingerprint(p) for p in self.paths],
        }
        self.manifest = self._check_output(overwrite)

    @property
    def shard_size(self) -> int:
        return self.spec["options"]["shard_size"]

    def _check_output(self, overwrite: bool) -> dict:
        out = self.output_dir
        if os.path.lexists(out) and (os.path.islink(out) or not os.path.isdir(out)):
            raise ValueError(f"{out}: output exists and is not a directory; a corpus job writes a directory")
        for path in self.paths:
            if path != readers.STDIN and os.path.realpath(path).startswith(os.path.realpath(out) + os.sep):
                raise ValueError(f"{path}: an input lies inside the output directory {out}")
        if not os.path.isdir(out):
            check_writable_dir(os.path.dirname(os.path.abspath(out)), out)
            return self._fresh_manifest()
        check_writable_dir(out, out)
        names = sorted(os.listdir(out))
        foreign = [n for n in names if not (_OURS.match(n) or _LEFTOVER.match(n))]
        if foreign:
            raise ValueError(f"{out}: holds {foreign[0]!r}, which no corpus job wrote; use an empty or new directory")
        if overwrite:
            for n in names:
                path = os.path.join(out, n)
                shutil.rmtree(path) if os.path.isdir(path) and not os.path.islink(path) else os.unlink(path)
            return self._fresh_manifest()
        for n in names:  # left by a job killed while writing
            if _LEFTOVER.match(n):
                os.unlink(os.path.join(out, n))
        names = [n for n in names if not _LEFTOVER.match(n)]
        if MANIFEST not in names:
            if any(n.startswith("part-") for n in names):
                raise ValueError(f"{out}: holds shards but no {MANIFEST}; rerun with --overwrite (overwrite=True) to start over")
            return self._fresh_manifest()
        return self._resumable(load_manifest(out))

    def _fresh_manifest(self) -> dict:
        return {**self.spec, "total_rows": None, "shape": None, "shards": [], "complete": False}

    def _resumable(self, manifest: dict) -> dict:
        old = {**{k: manifest.get(k) for k in self.spec if k != "options"}, **(manifest.get("options") or {})}
        new = {**{k: v for k, v in self.spec.items() if k != "options"}, **self.spec["options"]}
        if readers.STDIN in self.paths:
            new["inputs"] = "stdin, whose contents cannot be compared"
        for key in new:
            if old.get(key) != new[key]:
                raise ValueError(
                    f"{os.path.join(self.output_dir, MANIFEST)} was made with a different {key} "
                    f"({_short(old.get(key))}, now {_short(new[key])}); rerun with --overwrite (overwrite=True) "
                    "to start over, or write to another directory"
                )
        return manifest

    # ----------------------------------------------------------------------------------------
    def shards(self):
        """The shards not yet recorded, cut from the rows as they are read."""
        done = {entry["start"] for entry in self.manifest["shards"]}
        skip_empty = self.spec["options"]["skip_empty"]
        rows = readers.read_rows(self.paths, self.spec["options"]["text_field"], self.spec["options"]["id_field"])
        shard = Shard(0, 0, 0)
        for number, row in enumerate(rows):
            if shard.input_rows == self.shard_size:
                if shard.start not in done:
                    yield shard
                shard = Shard(shard.index + 1, number, 0)
            shard.input_rows += 1
            if shard.start in done:
                continue
            if skip_empty and row.text == "":
                shard.skipped.append(row.id)
                continue
            shard.ids.append(row.id)
            shard.texts.append(row.text)
            shard.wheres.append(row.where)
        if shard.input_rows and shard.start not in done:
            yield shard

    def done_rows(self) -> int:
        return sum(entry["input_rows"] for entry in self.manifest["shards"])

    def record(self, result: ShardResult) -> None:
        """Add a finished shard to the manifest and replace the manifest atomically."""
        self.manifest["shards"] = sorted(self.manifest["shards"] + [result.entry], key=lambda e: e["start"])
        self.manifest["shape"] = self.manifest["shape"] or result.shape
        self.save_manifest()

    def save_manifest(self) -> None:
        os.makedirs(self.output_dir, exist_ok=True)
        write_json_atomic(os.path.join(self.output_dir, MANIFEST), self.manifest)

    def run(self, executor, progress: bool | None = None) -> dict:
        """Encode every pending shard through `executor` (in-process or worker pool); returns
        this run's {rows, tokens, seconds}."""
        from tqdm.auto import tqdm

        self.manifest["total_rows"] = total = readers.count_rows(self.paths)
        self.save_manifest()
        done, start, tokens = self.done_rows(), time.perf_counter(), 0
        show = progress if progress is not None else _stderr_is_tty()
        bar = tqdm(total=total, initial=done, unit="text", desc="encode", disable=not show, dynamic_ncols=True)
        try:
            for result in _results(executor, self.shards()):
                self.record(result)
                tokens += result.tokens
                bar.update(result.entry["input_rows"])
                bar.set_postfix_str(f"{tokens / (time.perf_counter() - start):.0f} tokens/s", refresh=False)
        except KeyboardInterrupt:
            of = f" of {total}" if total is not None else ""
            raise CorpusInterrupted(f"interrupted after {self.done_rows()}{of} rows; run the same command again to resume") from None
        finally:
            bar.close()
            executor.close()
        self.manifest["total_rows"] = self.done_rows()
        self.manifest["complete"] = True
        self.manifest["last_run"] = {"rows": self.done_rows() - done, "tokens": tokens, "seconds": round(time.perf_counter() - start, 3)}
        self.save_manifest()
        return self.manifest["last_run"]


def _results(executor, shards):
    for shard in shards:
        yield from executor.submit(shard)
    yield from executor.finish()


def load_manifest(directory: str) -> dict:
    import json

    path = os.path.join(directory, MANIFEST)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{directory}: no {MANIFEST}; not a moee-fast corpus directory")
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: not a readable manifest ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ValueError(f"{path}: not a moee-fast corpus manifest (format {FORMAT})")
    return manifest


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 120 else text[:117] + "..."


def _stderr_is_tty() -> bool:
    import sys

    return hasattr(sys.stderr, "isatty") and sys.stderr.isatty()
