"""No load path lets transformers or bitsandbytes fetch kernels from the Hub (code from outside the
installed packages, which moee-fast's fast path would also fight over the same layers)."""

import subprocess
import sys

import pytest

from moee_fast import MoEEncoder

FAMILIES = ["olmoe", "mixtral", "qwen2_moe", "deepseek_v2"]


@pytest.fixture
def hub_requests(monkeypatch):
    """Every entry point through which a Hub kernel could be fetched or swapped in, recorded."""
    import kernels
    import transformers.integrations.hub_kernels as hub

    calls = []

    def recorder(name):
        def record(*args, **kwargs):
            calls.append(name)
            raise RuntimeError(f"{name} was called")
        return record

    for module, attr in ((kernels, "get_kernel"), (kernels, "kernelize"), (hub, "kernelize"), (hub, "get_kernel"),
                         (hub, "lazy_load_kernel")):
        if hasattr(module, attr):
            monkeypatch.setattr(module, attr, recorder(f"{module.__name__}.{attr}"))
    return calls


@pytest.mark.parametrize("family", FAMILIES)
def test_no_model_load_requests_a_hub_kernel(family, checkpoint, hub_requests):
    enc = MoEEncoder.from_pretrained(checkpoint(family), device="cpu")
    assert hub_requests == []
    assert enc.model.use_kernels is False
    # Nothing in the model was swapped for a layer from the `kernels` package.
    assert not [name for name, m in enc.model.named_modules() if type(m).forward.__module__.startswith("kernels")]


def test_a_request_for_hub_kernels_is_refused(checkpoint):
    with pytest.raises(ValueError, match="Hub"):
        MoEEncoder.from_pretrained(checkpoint("olmoe"), device="cpu", use_kernels=True)


def test_nf4_on_cpu_neither_fetches_nor_mentions_a_hub_kernel(checkpoint):
    pytest.importorskip("bitsandbytes")
    # A fresh process: bitsandbytes tries its fetch when it is first imported.
    code = f"""
import kernels
calls = []
real = kernels.get_kernel
def record(*a, **k):
    calls.append(a)
    return real(*a, **k)
kernels.get_kernel = record
from moee_fast import MoEEncoder
enc = MoEEncoder.from_pretrained({checkpoint("olmoe")!r}, device="cpu", quantize="nf4")
enc.encode(["a sentence to embed"])
assert calls == [], calls
print("ok")
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for phrase in ("kernels-community", "Hub", "trust_remote_code", "get_kernel"):
        assert phrase not in proc.stdout + proc.stderr, proc.stderr[-3000:]
