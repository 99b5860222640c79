"""Build script: the Python package, the Triton kernels inside its namespace, and the optional
C++ CPU extension.

`kernels/` is installed as `moee_fast.kernels`, never as a top-level `kernels` module: that name
belongs to Hugging Face's `kernels` package, which transformers 5 requires and imports. So that no
process whose path holds the checkout root (pytest, `python -m ...`, a shell opened there) can find
our folder in its place, `kernels/` has no `__init__.py`: to Python it is at most a namespace
portion, and an installed regular package of the same name always wins over one. Inside
moee_fast it is a namespace subpackage too: `moee_fast/kernels` is a link to `../kernels` in the
checkout (what editable installs import), and `package_dir` copies the folder there in a wheel.

The extension is built only when torch is importable at build time (install with
`pip install --no-build-isolation`) and a C++ compiler works; otherwise the package installs
without it and the ops fall back to torch.
"""

import glob
import os
import platform
import shutil
import warnings

from setuptools import find_packages, setup

packages = find_packages(include=["moee_fast", "moee_fast.*"]) + ["moee_fast.kernels"]
package_dir = {"moee_fast.kernels": "kernels"}
ext_modules, cmdclass = [], {}

sources = sorted(glob.glob("csrc/*.cpp"))


def vector_isa_flags():
    """SIMD flags for the C++ ops: the build machine's own ISA on request, AVX2/FMA on x86-64, and the
    compiler's default elsewhere (aarch64 always has NEON; -mavx2 would not even parse there)."""
    if os.environ.get("MOEE_FAST_NATIVE"):
        return ["-march=native"]
    if platform.machine().lower() in ("x86_64", "amd64"):
        return ["-mavx2", "-mfma"]
    return []


want_ext = os.environ.get("MOEE_FAST_BUILD_EXT", "1") != "0" and sources
if want_ext and shutil.which(os.environ.get("CXX", "c++")):
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:
        warnings.warn("torch is not importable at build time: building moee-fast without its C++ ops")
    else:

        class OptionalBuildExtension(BuildExtension):
            """A failed compile leaves a working package that uses the torch fallback."""

            def build_extension(self, ext):
                try:
                    super().build_extension(ext)
                except Exception as exc:  # compiler errors surface as several exception types
                    warnings.warn(f"moee-fast C++ ops not built ({exc}); the torch fallback is used")

        ext_modules = [
            CppExtension(
                "moee_fast._C",
                sources,
                extra_compile_args=["-O3", "-fopenmp", *vector_isa_flags()],
                extra_link_args=["-fopenmp"],
            )
        ]
        cmdclass = {"build_ext": OptionalBuildExtension.with_options(use_ninja=False)}

# The server's page (HTML, JS, CSS) ships inside the package: it is served offline, never from a CDN.
package_data = {"moee_fast.serve": ["static/*.html", "static/*.js", "static/*.css"], "moee_fast.kernels": ["configs/*.json"]}

setup(packages=packages, package_dir=package_dir, package_data=package_data, ext_modules=ext_modules, cmdclass=cmdclass)
