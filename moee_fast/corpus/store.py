"""Shard files of a corpus job: `part-00000.safetensors` (hs, rw and the rows' ids) or
`part-00000.parquet` (id, hs, rw columns as fixed-size lists of float32), each written
atomically, and read back memory-mapped."""

from __future__ import annotations

import json

import numpy as np
import torch

from ..files import atomic_path, read_safetensors

SHARD_FORMATS = ("safetensors", "parquet")


def shard_name(index: int, fmt: str) -> str:
    return f"part-{index:05d}.{fmt}"


def write_shard(path: str, ids: list[str], hs: torch.Tensor, rw: torch.Tensor) -> None:
    """Write one shard atomically (temporary file, fsync, rename)."""
    with atomic_path(path) as tmp:
        if path.endswith(".parquet"):
            _write_parquet(tmp, ids, hs, rw)
        else:
            from safetensors.torch import save_file

            id_bytes = torch.frombuffer(bytearray(json.dumps(ids).encode("utf-8")), dtype=torch.uint8)
            save_file({"hs": hs.contiguous(), "rw": rw.contiguous(), "ids": id_bytes}, tmp, {"format": "moee-fast-shard/1"})


def read_shard(path: str, shape: tuple[int, int, int]) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(ids, hs [n, H], rw [n, L, E]) of one shard; safetensors arrays are memory-mapped."""
    if path.endswith(".parquet"):
        return _read_parquet(path, shape)
    arrays, _ = read_safetensors(path, ("hs", "rw", "ids"))
    try:
        ids = json.loads(bytes(arrays["ids"]).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ValueError(f"{path}: its ids are not readable (corrupt shard)") from None
    hs, rw = arrays["hs"], arrays["rw"]
    if len(ids) != hs.shape[0] or hs.shape[0] != rw.shape[0] or (hs.shape[1], *rw.shape[1:]) != tuple(shape):
        raise ValueError(f"{path}: shapes hs {hs.shape}, rw {rw.shape}, {len(ids)} ids do not match the manifest's {shape}")
    return ids, hs, rw


def _write_parquet(path: str, ids: list[str], hs: torch.Tensor, rw: torch.Tensor) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(embedding_table(pa.table({"id": pa.array(ids, pa.string())}), hs, rw), path)


def embedding_table(table, hs: torch.Tensor, rw: torch.Tensor):
    """`table` (pyarrow) with hs and rw appended as fixed-size lists of float32 (rw flattened
    to L*E values, its [L, E] in the schema metadata)."""
    import pyarrow as pa

    def fixed_lists(x: torch.Tensor) -> pa.Array:
        flat = x.reshape(x.shape[0], -1)
        return pa.FixedSizeListArray.from_arrays(pa.array(flat.numpy().reshape(-1), pa.float32()), flat.shape[1])

    table = table.append_column("hs", fixed_lists(hs)).append_column("rw", fixed_lists(rw))
    return table.replace_schema_metadata({**(table.schema.metadata or {}), b"moee_rw_shape": json.dumps(list(rw.shape[1:])).encode()})


def _read_parquet(path: str, shape: tuple[int, int, int]):
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path, memory_map=True)
    except Exception as exc:  # pyarrow raises several types for a damaged file
        raise ValueError(f"{path}: not a readable parquet shard ({exc})") from None
    hidden, layers, experts = shape

    def column(name: str, width: int) -> np.ndarray:
        values = table.column(name).combine_chunks().flatten().to_numpy()
        return values.reshape(-1, width)

    hs = column("hs", hidden)
    rw = column("rw", layers * experts).reshape(-1, layers, experts)
    return table.column("id").to_pylist(), hs, rw
