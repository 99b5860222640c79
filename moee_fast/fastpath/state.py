"""The per-forward state the fast path's hooks read: one object per model forward, handed to the
hooks through a context variable, so concurrent forwards (threads, asyncio tasks) never share it
and nothing about a call is stored on the encoder or the model."""

from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass, field

import torch

_CURRENT: contextvars.ContextVar[ForwardState | None] = contextvars.ContextVar("moee_fast_forward", default=None)


@dataclass
class ForwardState:
    """One packed forward: where its texts' last tokens lie, how many tokens it runs, and whether
    the last layer may run on the last tokens only (mean pooling over that layer needs every token)."""

    last: torch.Tensor  # [B] packed position of each text's last token
    tokens: int  # packed tokens in the forward
    trim: bool = True
    _on_device: dict = field(default_factory=dict, repr=False)

    @property
    def batch_size(self) -> int:
        return self.last.shape[0]

    def last_on(self, device: torch.device) -> torch.Tensor:
        """`last` on `device`, copied once per device (models split across GPUs by a device_map)."""
        if device not in self._on_device:
            self._on_device[device] = self.last.to(device)
        return self._on_device[device]

    def cu_seqlens_on(self, device: torch.device) -> torch.Tensor:
        """int64 [B + 1] on `device`: text b owns packed rows cu_seqlens[b] .. cu_seqlens[b + 1] - 1
        (texts are packed back to back, so each starts after the previous one's last token)."""
        key = ("cu_seqlens", device)
        if key not in self._on_device:
            last = self.last_on(device)
            self._on_device[key] = torch.cat([last.new_zeros(1), last + 1])
        return self._on_device[key]


def current() -> ForwardState | None:
    """The state of the forward running in this thread or task, or None outside one."""
    return _CURRENT.get()


@contextlib.contextmanager
def running(state: ForwardState):
    token = _CURRENT.set(state)
    try:
        yield state
    finally:
        _CURRENT.reset(token)
