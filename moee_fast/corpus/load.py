"""Reading a corpus job's output back: ids, hs and rw in input order, memory-mapped."""

from __future__ import annotations

import os
from collections.abc import Iterator

import numpy as np
import torch

from ..embeddings import MoEEmbeddings
from .job import load_manifest
from .store import read_shard


class Corpus:
    """The embeddings of a finished corpus job.

    `ids` (list of str), `hs` float32 [N, H] and `rw` float32 [N, L, E] follow the input order.
    Each shard's arrays are memory-mapped; `hs`/`rw` of a corpus of several shards join them
    into one tensor on first use, while iterating (`for ids, emb in corpus`) reads one shard at
    a time.
    """

    def __init__(self, directory: str, allow_incomplete: bool = False):
        self.directory = os.fspath(directory)
        self.manifest = load_manifest(self.directory)
        if not self.manifest.get("complete") and not allow_incomplete:
            done = sum(e["input_rows"] for e in self.manifest["shards"])
            raise ValueError(
                f"{self.directory}: the job is not finished ({done} of {self.manifest.get('total_rows')} rows); "
                "run the same command again to finish it, or pass allow_incomplete=True"
            )
        self.shape = tuple(self.manifest.get("shape") or (0, 0, 0))
        self._shards = [read_shard(os.path.join(self.directory, e["file"]), self.shape) for e in self.manifest["shards"]]
        if self.manifest.get("sort_by_row"):
            self._shards = [_in_input_order(self.directory, self.manifest["shards"], self._shards)]
        self.ids = [row_id for shard in self._shards for row_id in shard[0]]
        self._joined: dict[str, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self.ids)

    def __repr__(self) -> str:
        return f"Corpus({self.directory!r}, n={len(self)}, shards={len(self._shards)})"

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
            parts = [torch.from_numpy(shard[position]) for shard in self._shards]
            if len(parts) == 1:
                self._joined[position] = parts[0]
            else:
                hidden, layers, experts = self.shape
                empty = torch.empty((0, hidden) if position == 1 else (0, layers, experts))
                self._joined[position] = torch.cat(parts) if parts else empty
        return self._joined[position]

    def __iter__(self) -> Iterator[tuple[list[str], MoEEmbeddings]]:
        for ids, hs, rw in self._shards:
            yield ids, MoEEmbeddings(torch.from_numpy(np.asarray(hs)), torch.from_numpy(np.asarray(rw)), self.metadata)

    def to_embeddings(self) -> MoEEmbeddings:
        return MoEEmbeddings(self.hs, self.rw, self.metadata)


def _in_input_order(directory: str, entries: list[dict], shards: list) -> tuple:
    """Rows joined and sorted by their input position (a resumed Ray job writes them out of order)."""
    import pyarrow.parquet as pq

    keys = np.concatenate([pq.read_table(os.path.join(directory, e["file"]), columns=["row"]).column("row").to_numpy() for e in entries])
    order = np.argsort(keys, kind="stable")
    ids = [row_id for shard in shards for row_id in shard[0]]
    hs, rw = (np.concatenate([shard[i] for shard in shards])[order] for i in (1, 2))
    return [ids[i] for i in order], hs, rw


def load_corpus(directory: str | os.PathLike, allow_incomplete: bool = False) -> Corpus:
    """Open the output directory of `encode_corpus` / `moee encode --output DIR`."""
    return Corpus(directory, allow_incomplete)
