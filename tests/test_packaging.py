"""`kernels/` ships inside moee_fast; a top-level `kernels` module is Hugging Face's package
(transformers 5 imports it), whatever the working directory."""

import importlib.metadata
import os
import site
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

PROBE = """
import kernels, moee_fast.kernels.grid
assert not hasattr(kernels, "__path__") or all("site-packages" in p for p in kernels.__path__), kernels.__path__
assert kernels.__file__ and "site-packages" in kernels.__file__, kernels.__file__
from kernels import CUDAProperties  # what transformers.integrations.hub_kernels imports
import transformers.modeling_utils, moee_fast.loading.models
print(os.path.basename(os.path.dirname(moee_fast.kernels.grid.__file__)))
"""


def run_python(code: str, cwd) -> str:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", "import os\n" + code], cwd=cwd, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout.strip()


def test_hugging_face_kernels_wins_from_the_repository_root_and_anywhere_else(tmp_path):
    # From the checkout root the folder `kernels/` is on sys.path first; it has no __init__.py,
    # so it is at most a namespace portion and the installed regular package wins.
    assert not (ROOT / "kernels" / "__init__.py").exists()
    for cwd in (ROOT, tmp_path):
        assert run_python(PROBE, cwd) == "kernels"


def test_pytest_collects_from_the_repository_root():
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider"],
                          cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "error" not in proc.stdout.splitlines()[-1].lower(), proc.stdout[-2000:]


def test_no_top_level_kernels_is_installed_by_moee_fast():
    # The installed distribution (not a build's egg-info in the checkout, which the root's place
    # on sys.path would otherwise make importlib.metadata read first).
    paths = [p for p in site.getsitepackages() if os.path.isdir(p)]
    (dist,) = [d for d in importlib.metadata.distributions(path=paths) if d.metadata["Name"] == "moee-fast"]
    assert not any(str(f).startswith("kernels/") for f in dist.files or [])


def test_import_does_not_pull_optional_packages():
    code = "import sys, moee_fast; print(sorted(m for m in ('mteb', 'triton', 'kernels', 'bitsandbytes') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"
