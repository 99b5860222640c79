"""Files written atomically and never clobbered, and safetensors files read back (memory-mapped)
with errors that name the file."""

from __future__ import annotations

import contextlib
import json
import os
import stat
import struct
import tempfile

import numpy as np

_DTYPES = {"F32": np.float32, "U8": np.uint8, "I64": np.int64, "F16": np.float16}


def check_output_file(path: str, overwrite: bool = False, inputs=()) -> str:
    """Refuse an output that is not a regular file (a device, pipe, symlink or directory), one
    that is an input, one in a missing or unwritable directory, and an existing file unless
    `overwrite`. Returns the path."""
    path = os.fspath(path)
    if os.path.lexists(path):
        mode = os.lstat(path).st_mode
        if not stat.S_ISREG(mode):
            kind = "a symlink" if stat.S_ISLNK(mode) else "a directory" if stat.S_ISDIR(mode) else "not a regular file"
            raise ValueError(f"{path}: output is {kind}; moee-fast writes only regular files")
        for item in inputs:
            if item != "-" and os.path.exists(item) and os.path.samefile(item, path):
                raise ValueError(f"{path}: output is also an input; choose another output")
        if not overwrite:
            raise FileExistsError(f"{path}: output exists; pass --overwrite (overwrite=True) to replace it")
    check_writable_dir(os.path.dirname(path) or ".", path)
    return path


def check_writable_dir(directory: str, for_path: str) -> None:
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"{for_path}: no directory {directory} to write into")
    if not os.access(directory, os.W_OK | os.X_OK):
        raise PermissionError(f"{for_path}: directory {directory} is not writable")


@contextlib.contextmanager
def atomic_path(path: str, overwrite: bool = True):
    """Yields a temporary path beside `path`; on success it is fsynced and renamed over `path`
    (refused if `path` appeared meanwhile and not `overwrite`); on any failure, Ctrl-C included,
    it is removed."""
    directory = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp's 0600 (or a writer's own) would outlive the rename
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        if overwrite:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)  # fails, rather than clobbers, if `path` exists now
            os.unlink(tmp)
        _fsync_dir(directory)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_json_atomic(path: str, data) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1)


def _fsync_dir(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_safetensors(path: str, names: tuple[str, ...]) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """The named arrays of a safetensors file, memory-mapped copy-on-write (nothing is read into
    RAM until used), and its metadata. A missing, truncated or garbage file fails naming it."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no embeddings file at {path}")
    size = os.path.getsize(path)
    header = _safetensors_header(path, size)
    missing = [name for name in names if name not in header]
    if missing:
        raise ValueError(f"{path}: no tensor named {', '.join(missing)}; not a moee-fast embeddings file")
    arrays = {name: _mapped(path, header[name], 8 + header["__length__"], size, name) for name in names}
    return arrays, header.get("__metadata__") or {}


def _safetensors_header(path: str, size: int) -> dict:
    bad = f"{path}: truncated or not a safetensors file"
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise ValueError(f"{bad} ({size} bytes)")
        (length,) = struct.unpack("<Q", prefix)
        if length > size - 8:
            raise ValueError(f"{bad} (its header claims {length} bytes, the file has {size})")
        try:
            header = json.loads(f.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise ValueError(f"{bad} (its header is not JSON)") from None
    if not isinstance(header, dict):
        raise ValueError(f"{bad} (its header is not a JSON object)")
    header["__length__"] = length
    return header


def _mapped(path: str, info, data_start: int, size: int, name: str) -> np.ndarray:
    try:
        dtype = np.dtype(_DTYPES[info["dtype"]])
        shape = tuple(int(n) for n in info["shape"])
        begin, end = (int(n) for n in info["data_offsets"])
    except (KeyError, TypeError, ValueError):
        raise ValueError(f"{path}: tensor {name!r} has a malformed or unsupported header entry") from None
    count = int(np.prod(shape, dtype=np.int64))
    if end - begin != count * dtype.itemsize or data_start + end > size or begin < 0:
        raise ValueError(f"{path}: tensor {name!r} lies outside the file (truncated?)")
    if count == 0:
        return np.empty(shape, dtype)
    return np.memmap(path, dtype=dtype, mode="c", offset=data_start + begin, shape=shape)
