"""(name or path, options) -> (model, tokenizer, adapter): the one place a checkpoint is read.

    loaded = load("allenai/OLMoE-1B-7B-0924", device="cpu", quantize=None)
    loaded.model, loaded.tokenizer, loaded.adapter, loaded.name

In order: argument policy (no remote code, no Hub kernels, quantization settings), device and
dtype (placement.py), the config (checkpoint.py), the family's adapter, the weight files'
checks, then the native loader (models/) or transformers' AutoModel, the bitsandbytes shims
(quantization/) and the tokenizer.
"""

from __future__ import annotations

import os
import warnings
from typing import NamedTuple

from torch import nn

from ..adapters import Adapter, adapter_for
from . import checkpoint
from .checkpoint import quiet_transformers
from .placement import input_device, placement, resolve_device, resolve_dtype
from .quantization import decode_4bit_linears_on_cpu, run_int8_linears_on_rows, with_quantization

# Keys of load's **hf_kwargs that also apply to the config and tokenizer.
_SHARED_HF_KWARGS = ("revision", "cache_dir", "token", "local_files_only", "subfolder")


class Loaded(NamedTuple):
    model: nn.Module  # the base model (no LM head)
    tokenizer: object
    adapter: Adapter
    name: str  # the path or Hub id, user directory expanded


def load(name_or_path: str | os.PathLike, device=None, dtype=None, quantize: str | None = None,
         quantize_routers: bool | None = None, **hf_kwargs) -> Loaded:
    """Load a Mixture-of-Experts checkpoint (local directory or Hub id); the options are those of
    MoEEncoder.from_pretrained."""
    from transformers import AutoModel

    from . import models  # registers the families transformers lacks (imports transformers' modeling code)

    name = os.path.expanduser(os.fspath(name_or_path))
    if name == DEMO_ALIAS and not os.path.isdir(name):
        from .demo import demo_checkpoint

        name = demo_checkpoint()
    check_location(name)
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    if hf_kwargs.pop("attn_implementation", None) is not None:
        warnings.warn("attn_implementation is ignored: moee-fast runs its own packed attention", stacklevel=3)
    checkpoint.refuse_remote_code(hf_kwargs)
    hf_kwargs = with_quantization(hf_kwargs, quantize, device, dtype, quantize_routers)
    offline = not os.path.isdir(name) and hub_offline_reason()
    if offline:  # the cache only: no retries against a Hub that cannot answer
        hf_kwargs["local_files_only"] = True
    shared = {k: hf_kwargs[k] for k in _SHARED_HF_KWARGS if k in hf_kwargs}
    try:
        config = checkpoint.load_config(name, **shared)
    except OSError as exc:
        if offline:
            raise OSError(f"offline ({offline}): {name!r} is not a local directory and not in the Hugging Face "
                          "cache; download it on a connected machine or pass a checkpoint directory") from None
        raise OSError(f"could not load a checkpoint from {name!r}: not a local directory, and {exc}") from exc
    adapter = adapter_for(config.model_type, _base_model_class(config))

    checkpoint.check_weight_files(checkpoint.checkpoint_directory(name, hf_kwargs.get("subfolder")), hf_kwargs.get("allow_pickle", False))
    with quiet_transformers(), checkpoint.naming_unreadable_weights(name, hf_kwargs):
        if config.model_type in models.NATIVE_LOADERS:  # streams each tensor onto `device`
            model = models.NATIVE_LOADERS[config.model_type](name, config=config, dtype=dtype, device=device, **hf_kwargs)
        else:
            kwargs = checkpoint.transformers_kwargs(hf_kwargs)
            model = AutoModel.from_pretrained(name, dtype=dtype, **placement(device, kwargs), **kwargs)
    decode_4bit_linears_on_cpu(model)
    run_int8_linears_on_rows(model)
    tokenizer = checkpoint.load_tokenizer(name, **shared)
    return Loaded(model, tokenizer, adapter, name)


DEMO_ALIAS = "demo"  # MoEEncoder.from_pretrained("demo"): the built-in untrained demo checkpoint


def hub_offline_reason(timeout: float = 3.0) -> str | None:
    """Why the Hub cannot be reached (HF_HUB_OFFLINE set, or its host unreachable within
    `timeout` seconds), or None when it can."""
    import socket
    from urllib.parse import urlparse

    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return "HF_HUB_OFFLINE is set"
    endpoint = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    host, port = endpoint.hostname or "huggingface.co", endpoint.port or (80 if endpoint.scheme == "http" else 443)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as exc:
        return f"cannot reach {host}:{port}: {exc.strerror or exc}"
    return None


def check_location(name: str) -> None:
    """A path that is not a directory fails here, naming it; anything shaped like a Hub id
    ("name" or "org/name") is left to transformers."""
    if os.path.isdir(name):
        return
    parts = name.split("/")
    hub_like = len(parts) <= 2 and all(parts) and not name.startswith((".", "~")) and os.sep == "/"
    if not hub_like or os.path.exists(name):
        raise FileNotFoundError(f"no checkpoint directory at {name!r}")


def _base_model_class(config):
    """The base-model class (no LM head) transformers maps this config to, or None."""
    from transformers import AutoModel

    try:
        return AutoModel._model_mapping[type(config)]
    except KeyError:
        return None




__all__ = ["Loaded", "load", "check_location", "input_device", "placement", "quiet_transformers", "resolve_device", "resolve_dtype"]
