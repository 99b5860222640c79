"""The bound on OpenMP's idle spin (moee_fast/openmp.py): set before torch loads, never over the
user's own setting, and read by the OpenMP runtime torch loads."""

from __future__ import annotations

import os
import subprocess
import sys

from moee_fast import openmp

# Idle CPU time of torch's OpenMP threads: a two-thread region, then a sleep in which only the
# idle thread's spin can use CPU; summed over rounds, in milliseconds.
_IDLE_SPIN = """
import os, time
import moee_fast
import torch
torch.set_num_threads(2)
x = torch.randn(4096, 256)
idle = 0.0
for _ in range(20):
    torch.nn.functional.softmax(x, dim=-1)  # a parallel region
    start = time.process_time()
    time.sleep(0.03)
    idle += time.process_time() - start
print(os.environ.get("GOMP_SPINCOUNT"), idle * 1e3)
"""


def _run(code: str, **overrides: str | None) -> str:
    env = dict(os.environ)
    for name in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT"):
        env.pop(name, None)
    for name, value in overrides.items():
        if value is not None:
            env[name] = value
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_bound_set_only_before_torch_and_without_a_user_setting():
    environ: dict[str, str] = {}
    assert openmp.bound_spin(environ, {}) and environ == {"GOMP_SPINCOUNT": str(openmp.SPIN_COUNT)}
    environ = {}
    assert not openmp.bound_spin(environ, {"torch": object()}) and environ == {}  # too late: OpenMP is loaded
    for name, value in (("OMP_WAIT_POLICY", "ACTIVE"), ("GOMP_SPINCOUNT", "300000")):
        environ = {name: value}
        assert not openmp.bound_spin(environ, {}) and environ == {name: value}


def test_import_bounds_the_spin_that_torch_openmp_threads_use():
    value, idle_ms = _run(_IDLE_SPIN).split()
    assert value == str(openmp.SPIN_COUNT)
    # Bounded: about 0.25 ms of spin per region, 5 ms over 20 (OpenMP's default spins ~7 ms each).
    assert float(idle_ms) < 40.0, f"idle OpenMP threads spun {float(idle_ms):.1f} ms over 20 regions"


def test_user_settings_and_an_earlier_torch_are_left_alone():
    assert _run("import moee_fast, os; print(os.environ['GOMP_SPINCOUNT'])", GOMP_SPINCOUNT="300000") == "300000"
    assert _run("import moee_fast, os; print(os.environ.get('GOMP_SPINCOUNT'))", OMP_WAIT_POLICY="PASSIVE") == "None"
    assert _run("import torch, moee_fast, os; print(os.environ.get('GOMP_SPINCOUNT'))") == "None"
