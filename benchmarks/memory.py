"""Peak resident memory of a piece of work, in-process on Linux.

Writing "5" to /proc/self/clear_refs resets the kernel's high-water mark (VmHWM), so each
measurement starts from the current footprint; elsewhere the process-lifetime maximum is used.
"""

from __future__ import annotations

import gc
import resource


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
