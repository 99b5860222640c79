"""Where a model loads and in which dtype, and where a loaded model takes its inputs."""

from __future__ import annotations

import torch
from torch import nn


def resolve_device(device) -> torch.device:
    """None -> CUDA when available, else CPU."""
    return torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))


def resolve_dtype(dtype, device: torch.device) -> torch.dtype:
    """None -> bfloat16 on CUDA, float32 elsewhere; a name such as "bfloat16" -> its torch dtype."""
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, str):
        resolved = getattr(torch, dtype, None)
        if not isinstance(resolved, torch.dtype):
            raise ValueError(f"unknown dtype {dtype!r}; use e.g. 'float32', 'bfloat16', 'float16'")
        return resolved
    return dtype


def placement(device: torch.device, hf_kwargs: dict) -> dict:
    """Load straight onto an accelerator (no pass through host memory) unless the caller placed
    the model with a device_map; CPU is where transformers loads anyway."""
    if device.type == "cpu" or "device_map" in hf_kwargs:
        return {}
    return {"device_map": {"": device}}


def input_device(model: nn.Module) -> torch.device:
    """Where a batch's inputs go: the execution device accelerate's hooks name when a device_map
    spread or offloaded the model (offloaded weights wait on the meta device), else its first
    parameter's device that holds data."""
    for module in model.modules():  # the embedding comes first in every family
        device = getattr(getattr(module, "_hf_hook", None), "execution_device", None)
        if device is not None:
            return torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
    return next((p.device for p in model.parameters() if not p.is_meta), torch.device("cpu"))
