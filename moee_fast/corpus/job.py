"""The sharded, resumable corpus job: rows are read in order and cut into shards of
`shard_size`; each shard is encoded in one call (tokenized and sorted by length there, so memory
is bounded by the shard, not the corpus), written atomically, and recorded with its size and
SHA-256 in `_manifest.json`, which is itself replaced atomically after every shard. One job holds
a directory at a time (an flock'ed `_lock`). A rerun checks every recorded shard, re-encodes a
missing or damaged one and skips the rest.

The names start with "_" so that pandas, pyarrow and Spark read a parquet job's directory as one
dataset of its shards."""

from __future__ import annotations

import hashlib
import os
import re
import time
import warnings
from dataclasses import dataclass, field

from ..checks import check_pooling, check_positive_int, check_rw_source
from ..files import check_writable_dir, write_json_atomic
from ..prompts import resolve_prompt
from . import readers
from .integrity import LOCK, DirectoryLock, describe_weights_change, shard_problem, weights_fingerprint
from .store import SHARD_FORMATS, shard_name, write_shard

DEFAULT_SHARD_SIZE = 10_000
MANIFEST = "_manifest.json"
OLD_MANIFEST = "manifest.json"  # jobs written before 2026-12 (read, never resumed)
FORMAT = "moee-fast-corpus/1"
RAY_FOLDERS = ("data", "checkpoint")
# After a kill mid-write: our temp files (.part-00003.safetensors.XXXX.tmp) or safetensors' own
# (it writes through a ".tmp" + 6 characters file beside the target, then renames).
_LEFTOVER = re.compile(r"^(\.(_?manifest\.json|part-\d{5,}\.\w+)\..*\.tmp|\.tmp[A-Za-z0-9]{6})$")
_SHARD = re.compile(r"^part-\d{5,}\.(safetensors|parquet)$")


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
    input_sha256: str = ""  # of the rows' ids and texts, as read


@dataclass
class ShardResult:
    index: int
    entry: dict | None = None  # the manifest's record of the shard
    tokens: int = 0
    shape: list[int] | None = None
    error: str | None = None
    error_type: str = "RuntimeError"


# Texts per encode call within a shard: the progress bar moves this often, and the rows are
# length-sorted and batched within each such step (fixed, so a resume stays bit for bit).
PROGRESS_STEP = 256


def encode_shard(encoder, shard: Shard, options: dict, output_dir: str, fmt: str, on_rows=None) -> ShardResult:
    """Encode one shard, PROGRESS_STEP texts at a time (`on_rows(n)` after each step), and write
    it atomically; an error names the row's file:line."""
    import torch

    parts, tokens = [], 0
    for begin in range(0, max(len(shard.texts), 1), PROGRESS_STEP):
        texts = shard.texts[begin : begin + PROGRESS_STEP]
        try:
            out = encoder.encode(
                texts, batch_size=options["batch_size"], prompt=options["prompt"],
                max_length=options["max_length"], rw_source=options["rw_source"], show_progress_bar=False,
                rw_pooling=options.get("rw_pooling", "last"), hs_pooling=options.get("hs_pooling", "last"),
            )
        except ValueError as exc:
            raise ValueError(name_rows(str(exc), shard.wheres[begin:])) from None
        parts.append(out)
        tokens += int(out.metadata.get("tokens", 0))
        if on_rows is not None:
            on_rows(len(texts))
    hs, rw = torch.cat([p.hs for p in parts]), torch.cat([p.rw for p in parts])
    name = shard_name(shard.index, fmt)
    record = write_shard(os.path.join(output_dir, name), shard.ids, hs, rw)
    entry = {"file": name, "start": shard.start, "input_rows": shard.input_rows, "rows": len(shard.ids),
             "shape": [len(shard.ids), hs.shape[1], *rw.shape[1:]], "dtype": "float32", **record,
             "input_sha256": shard.input_sha256}
    if shard.skipped:
        entry["skipped"] = shard.skipped
    return ShardResult(shard.index, entry, tokens, [hs.shape[1], *rw.shape[1:]])


def name_rows(message: str, wheres: list[str]) -> str:
    """An encoder message names texts[i] of the shard; name the input's file:line instead."""
    return re.sub(r"texts\[(\d+)\]", lambda m: wheres[int(m.group(1))] if int(m.group(1)) < len(wheres) else m.group(0), message)


# --------------------------------------------------------------------------------------------
def model_identity(model, full_hashes: bool = False) -> dict:
    """The model's name, the SHA-256 of its config.json and a fingerprint of its checkpoint
    files (see integrity.weights_fingerprint), for a checkpoint name or a loaded MoEEncoder."""
    name = model if isinstance(model, str) else getattr(model, "name", "")
    if not name and not isinstance(model, str):
        config = hashlib.sha256(model.model.config.to_json_string().encode()).hexdigest()
        return {"model": "", "config_sha256": config, "weights": "an encoder without a checkpoint path: not fingerprinted"}
    name = os.path.expanduser(name)
    if os.path.isdir(name):
        path = os.path.join(name, "config.json")
    else:
        from transformers.utils import cached_file

        path = cached_file(name, "config.json")
    if not path or not os.path.isfile(path):
        raise FileNotFoundError(f"no config.json for the model {name!r}")
    with open(path, "rb") as f:
        config = hashlib.sha256(f.read()).hexdigest()
    return {"model": name, "config_sha256": config, "weights": weights_fingerprint(os.path.dirname(path), full_hashes)}


def _bit_options(model, devices) -> dict:
    """The encoder settings that change a result's bits besides dtype: its token budget (which
    texts share a forward) and the fast-path parts applied."""
    if isinstance(model, str):
        from ..encoder import DEFAULT_TOKEN_BUDGET
        from ..fastpath import resolve_parts

        kind = (devices[0] if devices else "cuda" if _cuda() else "cpu").split(":")[0]
        return {"token_budget": DEFAULT_TOKEN_BUDGET.get(kind, 8192), "fast_path": list(resolve_parts("all"))}
    return {"token_budget": model.token_budget, "fast_path": list(getattr(model.fast_path, "parts", model.fast_path))}


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


class CorpusJob:
    """Everything checked before a model loads: inputs, output directory, options, and whether
    an existing manifest can be resumed. Holds the directory's lock until `close()`."""

    def __init__(self, model, inputs, output_dir, *, dtype: str, prompt=None, shard_size=DEFAULT_SHARD_SIZE,
                 text_field="text", id_field=None, overwrite=False, format="safetensors", batch_size=None,
                 max_length=None, rw_source="scores", skip_empty=False, engine="local", devices=None,
                 full_hashes=False, quoting="csv", duplicate_ids="warn", rw_pooling="last", hs_pooling="last"):
        if format not in SHARD_FORMATS:
            raise ValueError(f"format must be one of {', '.join(SHARD_FORMATS)}, got {format!r}")
        if prompt is not None and not isinstance(prompt, str):
            raise TypeError(f"prompt must be None, a preset name or a template string, got {type(prompt).__name__}")
        resolve_prompt(prompt)
        readers.check_read_options(quoting, duplicate_ids)
        self.paths = readers.expand_inputs(inputs)
        self.output_dir = os.fspath(output_dir)
        if not self.output_dir:
            raise ValueError("the output directory is an empty name; give a directory to write the job into")
        self.format = format
        self.encode_options = {
            "prompt": prompt, "batch_size": check_positive_int("batch_size", batch_size, allow_none=True),
            "max_length": check_positive_int("max_length", max_length, allow_none=True),
            "rw_source": check_rw_source(rw_source),
            "rw_pooling": check_pooling("rw_pooling", rw_pooling), "hs_pooling": check_pooling("hs_pooling", hs_pooling),
        }
        pooling = {name: value for name, value in (("rw_pooling", rw_pooling), ("hs_pooling", hs_pooling)) if value != "last"}
        identity = model_identity(model, full_hashes)
        self.spec = {
            "format": FORMAT, **identity, "dtype": str(dtype),
            "prompt": "" if prompt is None else prompt, "rw_source": rw_source,
            "options": {"shard_size": check_positive_int("shard_size", shard_size), "text_field": text_field,
                        "id_field": id_field, "max_length": max_length, "batch_size": batch_size,
                        **_bit_options(model, devices), "progress_step": PROGRESS_STEP, "skip_empty": bool(skip_empty),
                        "format": format, "engine": engine, "quoting": quoting, "duplicate_ids": duplicate_ids, **pooling},
            "inputs": [readers.fingerprint(p) for p in self.paths],
        }
        self.lock = None
        self.manifest = self._check_output(overwrite)

    @property
    def shard_size(self) -> int:
        return self.spec["options"]["shard_size"]

    def close(self) -> None:
        """Release the directory's lock."""
        if self.lock is not None:
            self.lock.close()
            self.lock = None

    def _check_output(self, overwrite: bool) -> dict:
        out = self.output_dir
        if os.path.lexists(out) and (os.path.islink(out) or not os.path.isdir(out)):
            kind = "a symbolic link" if os.path.islink(out) else "not a directory"
            raise ValueError(f"{out}: output exists and is {kind}; a corpus job writes into a real directory")
        for path in self.paths:
            if path != readers.STDIN and os.path.realpath(path).startswith(os.path.realpath(out) + os.sep):
                raise ValueError(f"{path}: an input lies inside the output directory {out}")
        created = False
        if not os.path.isdir(out):
            check_writable_dir(os.path.dirname(os.path.abspath(out)), out)
            try:
                os.makedirs(out)
                created = True
            except FileExistsError:  # another job made it just now; the lock decides
                pass
        check_writable_dir(out, out)
        self.lock = DirectoryLock(out)
        try:
            return self._claim(overwrite)
        except BaseException:
            if created and os.listdir(out) == [LOCK]:  # removed while still held: no job can have it
                os.unlink(os.path.join(out, LOCK))
                os.rmdir(out)
            self.close()
            raise

    def _claim(self, overwrite: bool) -> dict:
        """With the lock held: refuse any file a job did not write, then start over (overwrite),
        resume, or start."""
        out = self.output_dir
        manifest_name = next((n for n in (MANIFEST, OLD_MANIFEST) if os.path.isfile(os.path.join(out, n))), None)
        engine = None
        if manifest_name:
            manifest = load_manifest(out)
            engine = (manifest.get("options") or {}).get("engine")
        ours, foreign = job_files(out, has_manifest=manifest_name is not None, ray=engine == "ray")
        if foreign:
            raise ValueError(f"{out}: holds {foreign[0]!r}, which no corpus job wrote; nothing was removed: "
                             "move it away, or use an empty or new directory")
        leftovers = [n for n in ours if _LEFTOVER.match(os.path.basename(n))]
        if overwrite or manifest_name == OLD_MANIFEST:
            if manifest_name == OLD_MANIFEST and not overwrite:
                raise ValueError(f"{out}: a job of an earlier moee-fast version (its {OLD_MANIFEST}); load_corpus "
                                 "reads it, and --overwrite (overwrite=True) starts it over")
            remove_files(out, [n for n in ours if n != LOCK])
            return self._fresh_manifest()
        remove_files(out, leftovers)  # left by a job killed while writing
        if not manifest_name:
            return self._fresh_manifest()
        return self._resumable(manifest)

    def _fresh_manifest(self) -> dict:
        return {**self.spec, "total_rows": None, "shape": None, "shards": [], "complete": False}

    def _resumable(self, manifest: dict) -> dict:
        old = {**{k: manifest.get(k) for k in self.spec if k != "options"}, **(manifest.get("options") or {})}
        new = {**{k: v for k, v in self.spec.items() if k != "options"}, **self.spec["options"]}
        if readers.STDIN in self.paths:
            new["inputs"] = old["inputs"] = "stdin, compared shard by shard"
        for key in ("rw_pooling", "hs_pooling"):  # recorded only where not "last": absent on either side is "last"
            old.setdefault(key, "last")
            new.setdefault(key, "last")
        for key in new:
            if old.get(key) != new[key]:
                what = describe_weights_change(old.get(key), new[key]) if key == "weights" else (
                    f"{_short(old.get(key))}, now {_short(new[key])}")
                raise ValueError(
                    f"{os.path.join(self.output_dir, MANIFEST)} was made with a different {key} "
                    f"({what}); rerun with --overwrite (overwrite=True) to start over, or write to another directory"
                )
        if self.spec["options"]["engine"] == "local":
            self._drop_damaged(manifest)
        return manifest

    def _drop_damaged(self, manifest: dict) -> None:
        """Forget (and remove) every recorded shard whose file is missing or not the file that
        was written, so this run encodes it again."""
        kept = []
        for entry in manifest["shards"]:
            problem = shard_problem(self.output_dir, entry)
            if problem is None:
                kept.append(entry)
                continue
            warnings.warn(f"{os.path.join(self.output_dir, entry['file'])}: {problem}; encoding its rows again", stacklevel=2)
            remove_files(self.output_dir, [entry["file"]])
            manifest["complete"] = False
        manifest["shards"] = kept

    # ----------------------------------------------------------------------------------------
    def shards(self):
        """The shards not yet recorded, cut from the rows as they are read. Each shard's input
        rows are hashed (ids and texts), and a recorded shard whose rows now hash differently
        stops the job: that is how a resumed stdin job knows it reads the same stream."""
        done = {entry["start"]: entry for entry in self.manifest["shards"]}
        options = self.spec["options"]
        rows = readers.read_rows(self.paths, options["text_field"], options["id_field"], options["quoting"],
                                 options["duplicate_ids"], self.spec["inputs"])
        shard, digest = Shard(0, 0, 0), hashlib.sha256()
        for number, row in enumerate(rows):
            if shard.input_rows == self.shard_size:
                yield from self._finished(shard, digest, done)
                shard, digest = Shard(shard.index + 1, number, 0), hashlib.sha256()
            shard.input_rows += 1
            digest.update(f"{len(row.id)}:{row.id}{len(row.text)}:{row.text}".encode("utf-8", "surrogatepass"))
            if shard.start in done:
                continue
            if options["skip_empty"] and row.text == "":
                shard.skipped.append(row.id)
                continue
            shard.ids.append(row.id)
            shard.texts.append(row.text)
            shard.wheres.append(row.where)
        if shard.input_rows:
            yield from self._finished(shard, digest, done)

    def _finished(self, shard: Shard, digest, done: dict):
        shard.input_sha256 = digest.hexdigest()
        entry = done.get(shard.start)
        if entry is None:
            yield shard
        elif entry.get("input_sha256", shard.input_sha256) != shard.input_sha256 or entry["input_rows"] != shard.input_rows:
            where = "stdin" if readers.STDIN in self.paths else "the inputs"
            raise ValueError(f"rows {shard.start + 1}-{shard.start + shard.input_rows} of {where} differ from those "
                             f"{entry['file']} was encoded from; rerun with --overwrite (overwrite=True) to start over")

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
        this run's {rows, tokens, seconds}. The bar moves every PROGRESS_STEP texts, with texts/s
        and, where the inputs' rows can be counted up front, an ETA."""
        from tqdm.auto import tqdm

        try:
            self.manifest["total_rows"] = total = readers.count_rows(self.paths)
            self.save_manifest()
            done, start, tokens = self.done_rows(), time.perf_counter(), 0
            skipped_before = sum(len(e.get("skipped", ())) for e in self.manifest["shards"])
            show = progress if progress is not None else _stderr_is_tty()
            bar = tqdm(total=total, initial=done, unit="text", desc="encode", disable=not show, dynamic_ncols=True)
            shown: dict[int, int] = {}  # rows of each unfinished shard already on the bar

            def on_rows(index: int, count: int) -> None:
                shown[index] = shown.get(index, 0) + count
                bar.update(count)

            executor.on_rows = on_rows
            try:
                for result in _results(executor, self.shards()):
                    self.record(result)
                    tokens += result.tokens
                    bar.update(result.entry["input_rows"] - shown.pop(result.index, 0))
                    bar.set_postfix_str(f"{tokens / (time.perf_counter() - start):.0f} tokens/s", refresh=False)
            except KeyboardInterrupt:
                of = f" of {total}" if total is not None else ""
                raise CorpusInterrupted(f"interrupted after {self.done_rows()}{of} rows; run the same command again to resume") from None
            finally:
                bar.close()
                executor.close()
            self.manifest["total_rows"] = self.done_rows()
            self.manifest["shape"] = self.manifest["shape"] or _model_shape(getattr(executor, "encoder", None))
            self.manifest["complete"] = True
            skipped = sum(len(e.get("skipped", ())) for e in self.manifest["shards"])
            self.manifest["last_run"] = {"rows": self.done_rows() - done, "skipped": skipped - skipped_before, "tokens": tokens,
                                         "seconds": round(time.perf_counter() - start, 3)}
            self.save_manifest()
            return self.manifest["last_run"]
        finally:
            self.close()


def job_files(directory: str, has_manifest: bool, ray: bool) -> tuple[list[str], list[str]]:
    """(ours, foreign): the paths under `directory` (relative, files only) a corpus job writes
    (manifest, lock, temp files, and, next to a manifest, shards and a Ray job's data/ and
    checkpoint/ parquet files) and every other path, which no job may remove."""
    ours, foreign = [], []
    for name in sorted(os.listdir(directory)):
        path = os.path.join(directory, name)
        if os.path.isdir(path) and not os.path.islink(path):
            if ray and name in RAY_FOLDERS:
                for root, dirs, files in os.walk(path):
                    dirs.sort()
                    for file in sorted(files):
                        relative = os.path.relpath(os.path.join(root, file), directory)
                        written = file.endswith(".parquet") or _LEFTOVER.match(file) or file.startswith(".")
                        (ours if written and not os.path.islink(os.path.join(root, file)) else foreign).append(relative)
                continue
            foreign.append(name + os.sep)
        elif os.path.islink(path):
            foreign.append(name)
        elif name in (MANIFEST, OLD_MANIFEST, LOCK) or _LEFTOVER.match(name) or (has_manifest and _SHARD.match(name)):
            ours.append(name)
        else:
            foreign.append(name)
    return ours, foreign


def remove_files(directory: str, names: list[str]) -> None:
    """Remove the named files (relative to `directory`), then any folder they leave empty."""
    folders = set()
    for name in names:
        try:
            os.unlink(os.path.join(directory, name))
        except FileNotFoundError:
            pass
        parent = os.path.dirname(name)
        while parent:
            folders.add(parent)
            parent = os.path.dirname(parent)
    for folder in sorted(folders, key=len, reverse=True):
        try:
            os.rmdir(os.path.join(directory, folder))
        except OSError:
            pass  # not empty: it holds something else


def _model_shape(encoder) -> list[int] | None:
    """[H, L, E] of a loaded encoder, so a job with no rows still loads as [0, H] and [0, L, E]."""
    try:
        return [int(encoder.model.config.hidden_size), int(encoder.num_moe_layers), int(encoder.num_experts)]
    except (AttributeError, TypeError):
        return None


def _results(executor, shards):
    for shard in shards:
        yield from executor.submit(shard)
    yield from executor.finish()


def load_manifest(directory: str) -> dict:
    import json

    path = os.path.join(directory, MANIFEST)
    if not os.path.isfile(path):
        path = os.path.join(directory, OLD_MANIFEST)
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
