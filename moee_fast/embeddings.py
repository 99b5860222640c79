"""MoEEmbeddings: the two raw embeddings of a batch of texts, HS and RW, in input order."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import torch

FORMAT = "moee-fast/1"


@dataclass
class MoEEmbeddings:
    """hs: float32 [N, hidden_size], the final-norm hidden state at each text's last token.
    rw: float32 [N, num_moe_layers, num_experts], each MoE layer's routing distribution there.
    metadata: strings describing how they were made (model, prompt, ...)."""

    hs: torch.Tensor
    rw: torch.Tensor
    metadata: dict[str, str] = field(default_factory=dict)

    def __post_init__(self):
        if self.hs.dim() != 2 or self.rw.dim() != 3 or self.hs.shape[0] != self.rw.shape[0]:
            raise ValueError(
                f"MoEEmbeddings needs hs [N, H] and rw [N, L, E] with the same N, got hs "
                f"{tuple(self.hs.shape)} and rw {tuple(self.rw.shape)}"
            )
        for name in ("hs", "rw"):
            if getattr(self, name).dtype != torch.float32:
                raise ValueError(f"MoEEmbeddings.{name} must be float32, got {getattr(self, name).dtype}")

    def __len__(self) -> int:
        return self.hs.shape[0]

    def __getitem__(self, index) -> MoEEmbeddings:
        if isinstance(index, int):
            index = slice(index, index + 1 if index != -1 else None)
        return MoEEmbeddings(self.hs[index], self.rw[index], dict(self.metadata))

    def __repr__(self) -> str:
        return f"MoEEmbeddings(n={len(self)}, hs={tuple(self.hs.shape)}, rw={tuple(self.rw.shape)})"

    @property
    def shape_key(self) -> tuple[int, int, int]:
        """(hidden_size, num_moe_layers, num_experts): what must match to compare two sets."""
        return self.hs.shape[1], self.rw.shape[1], self.rw.shape[2]

    def numpy(self):
        """(hs, rw) as numpy arrays."""
        return self.hs.detach().cpu().numpy(), self.rw.detach().cpu().numpy()

    def to(self, device) -> MoEEmbeddings:
        return MoEEmbeddings(self.hs.to(device), self.rw.to(device), dict(self.metadata))

    @classmethod
    def empty(cls, hidden_size: int, num_layers: int, num_experts: int, metadata=None) -> MoEEmbeddings:
        return cls(torch.empty(0, hidden_size), torch.empty(0, num_layers, num_experts), dict(metadata or {}))

    @classmethod
    def cat(cls, parts: list[MoEEmbeddings]) -> MoEEmbeddings:
        if not parts:
            raise ValueError("MoEEmbeddings.cat needs at least one part")
        for i, part in enumerate(parts[1:], 1):
            if part.shape_key != parts[0].shape_key:
                raise ValueError(f"parts[{i}] has shape {part.shape_key}, parts[0] has {parts[0].shape_key}")
        return cls(torch.cat([p.hs for p in parts]), torch.cat([p.rw for p in parts]), dict(parts[0].metadata))

    def save(self, path: str | os.PathLike) -> None:
        """Write hs, rw and the metadata to a .safetensors file."""
        from safetensors.torch import save_file

        metadata = {"format": FORMAT, "moee_metadata": json.dumps(self.metadata)}
        save_file({"hs": self.hs.contiguous().cpu(), "rw": self.rw.contiguous().cpu()}, os.fspath(path), metadata)

    @classmethod
    def load(cls, path: str | os.PathLike) -> MoEEmbeddings:
        from safetensors import safe_open

        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no embeddings file at {path}")
        with safe_open(path, framework="pt") as f:
            missing = [name for name in ("hs", "rw") if name not in f.keys()]
            if missing:
                raise ValueError(f"{path}: no tensor named {', '.join(missing)}; not a moee-fast embeddings file")
            hs, rw = f.get_tensor("hs"), f.get_tensor("rw")
            header = f.metadata() or {}
        return cls(hs, rw, json.loads(header.get("moee_metadata", "{}")))
