"""`kernels/` ships inside moee_fast; a top-level `kernels` module is Hugging Face's package."""

import importlib.metadata
import os
import subprocess
import sys


def test_kernels_is_installed_only_inside_moee_fast(tmp_path):
    import moee_fast.kernels

    assert os.path.basename(os.path.dirname(moee_fast.kernels.__file__)) == "kernels"
    files = importlib.metadata.files("moee-fast") or []
    assert not any(str(f).startswith("kernels/") for f in files)
    # From a neutral directory, `import kernels` must not find our folder.
    probe = "import importlib.util as u; s = u.find_spec('kernels'); print(s.origin if s else None)"
    origin = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, check=True).stdout.strip()
    ours = os.path.dirname(moee_fast.kernels.__file__)
    assert origin == "None" or not origin.startswith(ours)


def test_import_does_not_pull_optional_packages():
    code = "import sys, moee_fast; print(sorted(m for m in ('mteb', 'triton') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"
