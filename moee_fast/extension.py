"""The optional C++ extension (moee_fast._C): whether it loaded, and whether its CPU ops apply.

Importing moee_fast._C registers torch.ops.moee_fast.*; without a compiler at install time (or a
build against another torch) the import fails and every caller falls back to torch.
"""

from __future__ import annotations

import torch

try:
    from . import _C  # noqa: F401  (importing it registers torch.ops.moee_fast.*)

    CPP_IMPORT_ERROR: ImportError | None = None
except ImportError as exc:  # not built: no compiler at install time, or built against another torch
    CPP_IMPORT_ERROR = exc


def cpp_built() -> bool:
    return CPP_IMPORT_ERROR is None


def cpp_applies(*tensors: torch.Tensor) -> bool:
    """Whether the C++ CPU ops can take these tensors: the extension is built and every tensor is
    float32 on CPU and needs no gradient (the ops have no backward)."""
    if CPP_IMPORT_ERROR is not None:
        return False
    grad = torch.is_grad_enabled()
    return all(t.device.type == "cpu" and t.dtype == torch.float32 and not (grad and t.requires_grad) for t in tensors)


def cpp_op(name: str) -> bool:
    """Whether the built extension has the op torch.ops.moee_fast.<name>."""
    return CPP_IMPORT_ERROR is None and hasattr(torch.ops.moee_fast, name)
