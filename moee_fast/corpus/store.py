"""Shard files of a corpus job: `part-00000.safetensors` (hs, rw and the rows' ids) or
`part-00000.parquet` (id, hs, rw columns as fixed-size lists of float32), each written
atomically and proved by its size and SHA-256, and read back one shard at a time (safetensors
memory-mapped, parquet column by column) so no more than one shard's files are open."""

from __future__ import annotations

import json
import os

import numpy as np
import torch

from ..files import atomic_path, read_safetensors
from .integrity import shard_record

SHARD_FORMATS = ("safetensors", "parquet")


def shard_name(index: int, fmt: str) -> str:
    """part-00000 ... part-99999, then as many digits as the number needs."""
    return f"part-{index:05d}.{fmt}"


def write_shard(path: str, ids: list, hs: torch.Tensor, rw: torch.Tensor) -> dict:
    """Write one shard atomically (temporary file, fsync, rename); returns its size and SHA-256,
    taken from the file as written."""
    with atomic_path(path) as tmp:
        if path.endswith(".parquet"):
            _write_parquet(tmp, ids, hs, rw)
        else:
            from safetensors.torch import save_file

            id_bytes = torch.frombuffer(bytearray(json.dumps(ids).encode("utf-8")), dtype=torch.uint8)
            save_file({"hs": hs.contiguous(), "rw": rw.contiguous(), "ids": id_bytes}, tmp, {"format": "moee-fast-shard/1"})
            _user_mode(tmp)  # safetensors renames its own 0600 temp file onto ours
        record = shard_record(tmp)
    return record


def _user_mode(path: str) -> None:
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)


def read_shard_ids(path: str, rows: int) -> list:
    """The ids of one shard (its arrays are not read), checked against the manifest's row count."""
    if path.endswith(".parquet"):
        import pyarrow.parquet as pq

        try:
            ids = pq.read_table(path, columns=["id"]).column("id").to_pylist()
        except Exception as exc:  # pyarrow raises several types for a damaged file
            raise ValueError(f"{path}: not a readable parquet shard ({exc})") from None
    else:
        ids = _safetensors_ids(path, read_safetensors(path, ("ids",))[0]["ids"])
    if len(ids) != rows:
        raise ValueError(f"{path}: {len(ids)} ids where the manifest recorded {rows} rows")
    return ids


def _safetensors_ids(path: str, array) -> list:
    try:
        ids = json.loads(bytes(array).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ValueError(f"{path}: its ids are not readable (corrupt shard)") from None
    if not isinstance(ids, list):
        raise ValueError(f"{path}: its ids are not a list (corrupt shard)")
    return ids


def read_shard(path: str, shape: tuple[int, int, int], rows: int) -> tuple[list, np.ndarray, np.ndarray]:
    """(ids, hs [rows, H], rw [rows, L, E]) of one shard, float32, checked against the manifest's
    shape and row count; safetensors arrays are memory-mapped."""
    if path.endswith(".parquet"):
        ids, hs, rw = _read_parquet(path, shape)
    else:
        arrays, _ = read_safetensors(path, ("hs", "rw", "ids"))
        ids, hs, rw = _safetensors_ids(path, arrays["ids"]), arrays["hs"], arrays["rw"]
    if hs.dtype != np.float32 or rw.dtype != np.float32:
        raise ValueError(f"{path}: hs {hs.dtype}, rw {rw.dtype} where the manifest records float32")
    if not (len(ids) == hs.shape[0] == rw.shape[0] == rows) or (hs.shape[1], *rw.shape[1:]) != tuple(shape):
        raise ValueError(f"{path}: hs {tuple(hs.shape)}, rw {tuple(rw.shape)}, {len(ids)} ids do not match "
                         f"the manifest's {rows} rows of {list(shape)}")
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
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path, memory_map=True)
    except Exception as exc:  # pyarrow raises several types for a damaged file
        raise ValueError(f"{path}: not a readable parquet shard ({exc})") from None
    hidden, layers, experts = shape

    def column(name: str, width: int) -> np.ndarray:
        kind = table.schema.field(name).type if name in table.column_names else None
        if not (pa.types.is_fixed_size_list(kind) and kind.list_size == width and kind.value_type == pa.float32()):
            raise ValueError(f"{path}: column {name!r} is {kind}, where the manifest's shape {list(shape)} "
                             f"needs fixed_size_list<float>[{width}]")
        # Arrow's buffers are read-only: a writable copy, so tensors over it are safe to change.
        values = np.array(table.column(name).combine_chunks().flatten().to_numpy(), copy=True)
        return values.reshape(-1, width)

    hs = column("hs", hidden)
    rw = column("rw", layers * experts).reshape(-1, layers, experts)
    return table.column("id").to_pylist(), hs, rw
