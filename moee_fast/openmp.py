"""How long OpenMP's idle threads spin: bounded before torch loads its OpenMP runtime.

An encode on CPU runs about a dozen short parallel regions per decoder layer (GEMMs, attention,
norms, rotary, the router). Between regions, libgomp's idle threads (torch's, MKL's and the C++
ops') spin for GOMP_SPINCOUNT iterations before they sleep: 300,000 by default, several
milliseconds. On a quiet machine that only heats a core; on one shared with other work the
spinning threads take the time slices the working threads need, and every region can end waiting
for a thread the scheduler has parked. 10,000 iterations (about 0.25 ms here) still spans the gap
between one op and the next in a forward, so a quiet machine keeps its threads awake, while a busy
one stops paying for the spin (benchmarks/results/cpu_openmp_spin_2026-12-06.md).

libgomp reads its environment once, when it loads, which `import torch` does; so the bound is set
only when torch is not imported yet, and never over a user's own OMP_WAIT_POLICY or
GOMP_SPINCOUNT. Importing torch first keeps OpenMP's default (docs/troubleshooting.md says how to
set the variable in that case).
"""

from __future__ import annotations

import os
import sys

SPIN_COUNT = 10_000
_USER_SETTINGS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")


def bound_spin(environ=os.environ, modules=sys.modules) -> bool:
    """Set GOMP_SPINCOUNT to SPIN_COUNT unless torch is already loaded or the user chose a wait
    policy or spin count; returns whether it was set."""
    if "torch" in modules or any(name in environ for name in _USER_SETTINGS):
        return False
    environ["GOMP_SPINCOUNT"] = str(SPIN_COUNT)
    return True
