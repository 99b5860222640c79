"""(name or path, options) -> (model, tokenizer, adapter): the one place a checkpoint is read.

    loaded = load("allenai/OLMoE-1B-7B-0924", device="cpu", quantize=None)
    loaded.model, loaded.tokenizer, loaded.adapter, loaded.name

In order: argument policy (no remote code, no Hub kernels, quantization settings), device and
dtype (placement.py), the config (checkpoint.py), the family's adapter, the weight files'
checks, then the native loader (models/) or transformers' AutoModel, the bitsandbytes shims
(quantization/) and the tokenizer.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from typing import NamedTuple

from torch import nn

from ..adapters import Adapter, adapter_for
from . import checkpoint
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
    check_location(name)
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    if hf_kwargs.pop("attn_implementation", None) is not None:
        warnings.warn("attn_implementation is ignored: moee-fast runs its own packed attention", stacklevel=3)
    checkpoint.refuse_remote_code(hf_kwargs)
    hf_kwargs = with_quantization(hf_kwargs, quantize, device, dtype, quantize_routers)
    shared = {k: hf_kwargs[k] for k in _SHARED_HF_KWARGS if k in hf_kwargs}
    try:
        config = checkpoint.load_config(name, **shared)
    except OSError as exc:
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


@contextlib.contextmanager
def quiet_transformers():
    """The base model loads from a causal-LM checkpoint: its unused lm_head weights are expected,
    so transformers' load report about them, and its per-shard progress bar, are noise."""
    from transformers.utils import logging as hf_logging

    level, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


__all__ = ["Loaded", "load", "check_location", "input_device", "placement", "quiet_transformers", "resolve_device", "resolve_dtype"]
