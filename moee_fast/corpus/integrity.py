"""What makes a corpus directory trustworthy: one job at a time (an flock'ed lock file), shards
the manifest can prove (size and SHA-256 of each file), and a fingerprint of the model's weights,
so a resume never mixes shards of another model, another job or a damaged file."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import socket
import struct
import time

LOCK = "_lock"
# Files this large that are not safetensors are fingerprinted by size unless full hashes are asked.
_SMALL_FILE = 64 << 20


class JobLocked(OSError):
    """Another job holds the output directory."""


class DirectoryLock:
    """An exclusive `flock` on DIR/_lock for the life of a job: released when closed or when the
    process dies, however it dies. The holder's pid, host and start time are written into the
    file so a refused job can name it."""

    def __init__(self, directory: str):
        self.path = os.path.join(directory, LOCK)
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = self._holder()
            os.close(self.fd)
            self.fd = None
            raise JobLocked(f"{directory}: another corpus job is writing here ({holder}); "
                            "wait for it to end, or write to another directory") from None
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, json.dumps(holder).encode(), 0)

    def _holder(self) -> str:
        for _ in range(50):  # the holder writes its name just after taking the lock
            try:
                holder = json.loads(os.pread(self.fd, 4096, 0) or b"null")
            except (json.JSONDecodeError, UnicodeDecodeError):
                holder = None
            if isinstance(holder, dict):
                return f"pid {holder.get('pid')} on {holder.get('host')}, started {holder.get('started')}"
            time.sleep(0.01)
        return "a process that has not said who it is"

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # releases the flock
            self.fd = None

    def __del__(self):
        self.close()


# --------------------------------------------------------------------------------------------
def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def shard_record(path: str) -> dict:
    """What the manifest keeps to prove a shard file: its size and SHA-256."""
    return {"bytes": os.path.getsize(path), "sha256": file_sha256(path)}


def shard_problem(directory: str, entry: dict, hashes: bool = True) -> str | None:
    """Why the shard file of a manifest entry is not the file that was written, or None."""
    path = os.path.join(directory, entry["file"])
    if not os.path.isfile(path):
        return "missing"
    if "sha256" not in entry:
        return None  # a job written before shards were checksummed
    size = os.path.getsize(path)
    if size != entry.get("bytes"):
        return f"{size} bytes where the manifest recorded {entry.get('bytes')}"
    if hashes and file_sha256(path) != entry["sha256"]:
        return "its SHA-256 differs from the manifest's (the file changed after it was written)"
    return None


# --------------------------------------------------------------------------------------------
def weights_fingerprint(directory: str, full: bool = False) -> dict:
    """Every file of a checkpoint directory by name and size, with the SHA-256 of each
    safetensors header (names, dtypes, shapes and offsets of every tensor) and of each small
    file (config, tokenizer); `full` hashes every byte of every file."""
    files = {}
    for name in sorted(os.listdir(directory)):
        path = os.path.join(directory, name)
        if name.startswith(".") or not os.path.isfile(path):
            continue
        size = os.path.getsize(path)
        record: dict = {"bytes": size}
        if full or size <= _SMALL_FILE:
            record["sha256"] = file_sha256(path)
        elif name.endswith(".safetensors"):
            record["header_sha256"] = _safetensors_header_sha256(path)
        files[name] = record
    return {"files": files, "hashes": "full" if full else "headers"}


def _safetensors_header_sha256(path: str) -> str:
    with open(path, "rb") as f:
        prefix = f.read(8)
        (length,) = struct.unpack("<Q", prefix) if len(prefix) == 8 else (0,)
        return hashlib.sha256(prefix + f.read(min(length, 100 << 20))).hexdigest()


def describe_weights_change(old, new) -> str:
    """The first file whose fingerprint differs, for a refusal message."""
    old_files = (old or {}).get("files", {}) if isinstance(old, dict) else {}
    new_files = (new or {}).get("files", {}) if isinstance(new, dict) else {}
    for name in sorted(set(old_files) | set(new_files)):
        if name not in old_files:
            return f"{name} is new"
        if name not in new_files:
            return f"{name} is gone"
        if old_files[name] != new_files[name]:
            return f"{name} changed"
    return f"fingerprinted as {_kind(old)}, now {_kind(new)}"


def _kind(fingerprint) -> str:
    return fingerprint.get("hashes", "?") if isinstance(fingerprint, dict) else repr(fingerprint)
