"""Reading a corpus job's output back: ids, hs and rw in input order, each shard proved against
the manifest (size, SHA-256, rows, shape, dtype) and opened only while it is read."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator

import numpy as np
import torch

from ..embeddings import MoEEmbeddings
from .integrity import shard_problem
from .job import load_manifest
from .store import read_shard, read_shard_ids

_INDEX = re.compile(r"^part-(\d+)\.")


class Corpus:
    """The embeddings of a finished corpus job.

    `ids` (list of str), `hs` float32 [N, H] and `rw` float32 [N, L, E] follow the input order.
    No shard file stays open: `hs`/`rw` fill one tensor shard by shard on first use, and
    iterating (`for ids, emb in corpus`) reads one shard at a time (safetensors memory-mapped).
    With `verify` (the default) every shard's SHA-256 is checked against the manifest when the
    corpus opens; structure (rows, shape, dtype, file sizes, shard order) is always checked.
    """

    def __init__(self, directory: str, allow_incomplete: bool = False, verify: bool = True):
        self.directory = os.fspath(directory)
        self.manifest = load_manifest(self.directory)
        if not self.manifest.get("complete") and not allow_incomplete:
            done = sum(e["input_rows"] for e in self.manifest["shards"])
            of = f" of {self.manifest['total_rows']}" if self.manifest.get("total_rows") is not None else ""
            raise ValueError(
                f"{self.directory}: the job is not finished ({done}{of} rows); "
                "run the same command again to finish it, or pass allow_incomplete=True"
            )
        self.shape = tuple(self.manifest.get("shape") or self.manifest.get("model_shape") or (0, 0, 0))
        self._entries = self.manifest["shards"]
        check_entries(self.directory, self.manifest)
        for entry in self._entries:
            problem = shard_problem(self.directory, entry, hashes=verify)
            if problem:
                raise ValueError(f"{os.path.join(self.directory, entry['file'])}: {problem}; "
                                 "run the job's command again to encode its rows again")
        self._order = _input_order(self.directory, self._entries) if self.manifest.get("sort_by_row") else None
        ids = [row_id for entry in self._entries for row_id in read_shard_ids(self._path(entry), entry["rows"])]
        self.ids = ids if self._order is None else [ids[i] for i in self._order]
        self._joined: dict[int, torch.Tensor] = {}

    def _path(self, entry: dict) -> str:
        return os.path.join(self.directory, entry["file"])

    def __len__(self) -> int:
        return len(self.ids)

    def __repr__(self) -> str:
        return f"Corpus({self.directory!r}, n={len(self)}, shards={len(self._entries)})"

    @property
    def metadata(self) -> dict[str, str]:
        m = self.manifest
        return {"model": m["model"], "prompt": m["prompt"], "rw": m["rw_source"], "dtype": m["dtype"]}

    @property
    def hs(self) -> torch.Tensor:
        return self._column(1)

    @property
    def rw(self) -> torch.Tensor:
        return self._column(2)

    def _column(self, position: int) -> torch.Tensor:
        if position not in self._joined:
            hidden, layers, experts = self.shape
            column = torch.empty((len(self.ids), hidden) if position == 1 else (len(self.ids), layers, experts))
            row = 0
            for entry in self._entries:
                part = self._read(entry)[position]
                column[row : row + len(part)].numpy()[...] = part  # numpy copies from the read-only map
                row += len(part)
            self._joined[position] = column if self._order is None else column[torch.from_numpy(self._order)]
        return self._joined[position]

    def _read(self, entry: dict):
        return read_shard(self._path(entry), self.shape, entry["rows"])

    def __iter__(self) -> Iterator[tuple[list[str], MoEEmbeddings]]:
        if self._order is not None:  # rows of a resumed Ray job lie out of order across files
            yield self.ids, self.to_embeddings()
            return
        for entry in self._entries:
            ids, hs, rw = self._read(entry)
            yield ids, MoEEmbeddings(torch.from_numpy(np.asarray(hs)), torch.from_numpy(np.asarray(rw)), self.metadata)

    def to_embeddings(self) -> MoEEmbeddings:
        return MoEEmbeddings(self.hs, self.rw, self.metadata)


def check_entries(directory: str, manifest: dict) -> None:
    """The manifest's shard list is one the job could have written: shards in input order, each
    starting where the last ended, named by its number, and (when complete) covering every row."""
    entries, shard_size = manifest["shards"], (manifest.get("options") or {}).get("shard_size")
    where = os.path.join(directory, "_manifest.json")
    if (manifest.get("options") or {}).get("engine") == "ray":
        return  # Ray names its files; their row keys were checked when the job recorded them
    position = 0
    for number, entry in enumerate(entries):
        match = _INDEX.match(str(entry.get("file")))
        if not match:
            raise ValueError(f"{where}: shard entry {number} names {entry.get('file')!r}, not a shard file")
        if not (0 <= entry["rows"] <= entry["input_rows"]) or (shard_size and entry["input_rows"] > shard_size):
            raise ValueError(f"{where}: shard entry {number} ({entry['file']}) records impossible row counts")
        if shard_size and entry["start"] != int(match.group(1)) * shard_size:
            raise ValueError(f"{where}: shard entry {number} ({entry['file']}) does not start at its own rows")
        if manifest.get("complete") and entry["start"] != position:
            raise ValueError(f"{where}: shard entry {number} ({entry['file']}) starts at row {entry['start']}, "
                             f"where the shards before it end at {position}: entries are missing or out of order")
        if entry["start"] < position:
            raise ValueError(f"{where}: shard entry {number} ({entry['file']}) overlaps the one before it")
        position = entry["start"] + entry["input_rows"]
    if manifest.get("complete") and manifest.get("total_rows") not in (None, position):
        raise ValueError(f"{where}: its shards hold {position} rows where it records {manifest['total_rows']}")


def _input_order(directory: str, entries: list[dict]) -> np.ndarray:
    """The permutation putting a resumed Ray job's rows back in input order (by their row keys)."""
    import pyarrow.parquet as pq

    keys = np.concatenate([pq.read_table(os.path.join(directory, e["file"]), columns=["row"]).column("row").to_numpy()
                           for e in entries]) if entries else np.empty(0, np.int64)
    return np.argsort(keys, kind="stable")


def load_corpus(directory: str | os.PathLike, allow_incomplete: bool = False, verify: bool = True) -> Corpus:
    """Open the output directory of `encode_corpus` / `moee encode --output DIR`; `verify=False`
    skips hashing the shards (structure, sizes and shapes are still checked)."""
    return Corpus(directory, allow_incomplete, verify)


def verify_corpus(directory: str | os.PathLike) -> list[str]:
    """Every problem found in a corpus directory (manifest, shard list, each shard's size,
    SHA-256, rows, shape and dtype), one line each; empty when all is well."""
    directory = os.fspath(directory)
    try:
        manifest = load_manifest(directory)
        check_entries(directory, manifest)
    except (OSError, ValueError) as exc:
        return [str(exc)]
    problems = [] if manifest.get("complete") else [f"{directory}: the job is not finished"]
    shape = tuple(manifest.get("shape") or (0, 0, 0))
    for entry in manifest["shards"]:
        path = os.path.join(directory, entry["file"])
        problem = shard_problem(directory, entry)
        if problem:
            problems.append(f"{path}: {problem}")
            continue
        try:
            read_shard(path, shape, entry["rows"])
        except (OSError, ValueError) as exc:
            problems.append(str(exc))
    return problems
