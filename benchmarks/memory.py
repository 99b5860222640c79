"""Peak resident memory of a piece of work, in-process on Linux.

Writing "5" to /proc/self/clear_refs resets the kernel's high-water mark (VmHWM), so each
measurement starts from the current footprint; elsewhere the process-lifetime maximum is used.
glibc keeps freed memory for reuse (and raises its mmap threshold as large blocks are freed),
which would hide a later run's peak inside memory an earlier run left resident: on the first
measurement large blocks are pinned to mmap, and the heap is trimmed before each one. Pinning
makes every large allocation a fresh mapping, which slows compute: time things before measuring
memory in the same process.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import resource

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_LIBC = None


def _pin_large_blocks_to_mmap():
    global _LIBC
    if _LIBC is None:
        try:
            _LIBC = ctypes.CDLL(ctypes.util.find_library("c"))
            _LIBC.mallopt(_M_MMAP_THRESHOLD, 256 << 10)  # a fixed threshold: freed tensors go back to the OS
            _LIBC.mallopt(_M_TRIM_THRESHOLD, 1 << 20)
        except (OSError, AttributeError):  # not glibc
            _LIBC = False
    return _LIBC


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def peak_memory_mib(fn, *args, **kwargs):
    """(result of fn, peak resident memory above the starting footprint, in MiB)."""
    gc.collect()
    libc = _pin_large_blocks_to_mmap()
    if libc:
        libc.malloc_trim(0)
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        resettable = True
    except OSError:
        resettable = False
    start = _status_kib("VmRSS") or 0
    result = fn(*args, **kwargs)
    peak = _status_kib("VmHWM") if resettable else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return result, max(0, (peak or 0) - start) / 1024
