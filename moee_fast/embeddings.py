"""MoEEmbeddings: the two raw embeddings of a batch of texts, HS and RW, in input order, and
the vectors each MoEE variant reads from them."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field

import numpy as np
import torch

from .checks import NORM_EPS, VARIANTS, as_integer, check_alpha, check_variant  # noqa: F401  (re-exported)

FORMAT = "moee-fast/1"

# Added to the standard deviation before dividing, as the MoEE authors' z-scores do.
STD_EPS = 1e-8


def unit_rows(x: torch.Tensor) -> torch.Tensor:
    """Rows scaled to unit L2 norm (norms clamped at NORM_EPS); all-zero rows stay zero."""
    return x / x.norm(dim=1, keepdim=True).clamp_min(NORM_EPS)


@dataclass
class Standardizer:
    """Per-dimension mean and standard deviation of HS and RW, fitted on a corpus
    (`MoEEmbeddings.fit_standardizer`); `to_dict`/`from_dict` round-trip it through JSON."""

    hs_mean: torch.Tensor
    hs_std: torch.Tensor
    rw_mean: torch.Tensor
    rw_std: torch.Tensor

    @property
    def shape_key(self) -> tuple[int, int, int]:
        return self.hs_mean.shape[0], self.rw_mean.shape[0], self.rw_mean.shape[1]

    def to_dict(self) -> dict[str, list]:
        return {name: getattr(self, name).tolist() for name in ("hs_mean", "hs_std", "rw_mean", "rw_std")}

    @classmethod
    def from_dict(cls, stats: dict[str, list]) -> Standardizer:
        return cls(**{name: torch.tensor(stats[name], dtype=torch.float32) for name in ("hs_mean", "hs_std", "rw_mean", "rw_std")})

    def save(self, path: str | os.PathLike) -> None:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Standardizer:
        with open(path, encoding="utf-8") as f:
            return cls.from_dict(json.load(f))


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
        """One row (an integer, negative counting from the end) as a set of one; a slice, an index
        tensor or a boolean mask as a set of those rows."""
        many = isinstance(index, slice) or (isinstance(index, torch.Tensor) and index.dim() > 0)
        position = None if many else as_integer(index)
        if position is not None:
            if not -len(self) <= position < len(self):
                raise IndexError(f"index {position} is out of range for {len(self)} embeddings")
            index = slice(position % len(self), position % len(self) + 1)
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

    def check_compatible(self, other: MoEEmbeddings | Standardizer, names: tuple[str, str] = ("a", "b")) -> None:
        """Raise unless `other` comes from a model with the same hidden size, MoE layers and experts."""
        if other.shape_key != self.shape_key:
            raise ValueError(
                f"{names[0]} and {names[1]} come from different models: {names[0]} has (hidden_size, "
                f"moe_layers, experts) = {self.shape_key}, {names[1]} has {other.shape_key}"
            )

    # ----------------------------------------------------------------------------------------
    def vectors(self, variant: str, alpha: float = 1.0) -> torch.Tensor:
        """float32 [N, D] vectors of a MoEE variant (see VARIANTS); alpha matters only for "sum".

        The plain cosine of two "sum" vectors is (cos_HS + alpha cos_RW) / (1 + alpha), so MoEE(sum)
        ranks the same under any cosine index; their dot product is cos_HS + alpha cos_RW itself.
        """
        check_variant(variant)
        rw = self.rw.flatten(1)
        if variant == "hs":
            return self.hs
        if variant == "rw":
            return rw
        if variant == "concat":
            return torch.cat([self.hs, rw], dim=1)
        return torch.cat([unit_rows(self.hs), math.sqrt(check_alpha(alpha)) * unit_rows(rw)], dim=1)

    def fit_standardizer(self) -> Standardizer:
        """Per-dimension mean and (unbiased) standard deviation of HS and RW over these rows."""
        if len(self) < 2:
            raise ValueError(f"fitting a standardizer needs at least 2 embeddings, got {len(self)}")
        hs_std, hs_mean = torch.std_mean(self.hs, dim=0)
        rw_std, rw_mean = torch.std_mean(self.rw, dim=0)
        return Standardizer(hs_mean, hs_std, rw_mean, rw_std)

    def standardized(self, stats: Standardizer) -> MoEEmbeddings:
        """New embeddings with every dimension z-scored by `stats`: (x - mean) / (std + 1e-8)."""
        self.check_compatible(stats, ("embeddings", "standardizer"))
        hs = (self.hs - stats.hs_mean.to(self.hs)) / (stats.hs_std.to(self.hs) + STD_EPS)
        rw = (self.rw - stats.rw_mean.to(self.rw)) / (stats.rw_std.to(self.rw) + STD_EPS)
        return MoEEmbeddings(hs, rw, {**self.metadata, "standardized": "fitted"})

    def standardized_per_batch(self, batch_size: int = 128) -> MoEEmbeddings:
        """The MoEE authors' z-scores: each run of `batch_size` consecutive rows standardised by its
        own per-dimension statistics, as their encoder did batch by batch before scoring RW and MoEE.

        Batch-dependent by design (a text's vector depends on its neighbours and on the order), for
        reproducing published numbers only. A one-row batch has no standard deviation: it becomes
        zeros, as their code's NaNs did.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        hs, rw = torch.zeros_like(self.hs), torch.zeros_like(self.rw)
        for start in range(0, len(self), batch_size):
            rows = slice(start, start + batch_size)
            if len(self.hs[rows]) < 2:
                continue  # no spread: their NaNs became zeros
            for source, target in ((self.hs, hs), (self.rw, rw)):
                std, mean = torch.std_mean(source[rows], dim=0)
                target[rows] = (source[rows] - mean) / (std + STD_EPS)
        return MoEEmbeddings(hs, rw, {**self.metadata, "standardized": f"per_batch:{batch_size}"})

    # ----------------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike, overwrite: bool = False) -> None:
        """Write hs, rw and the metadata to a .safetensors file, atomically (an interrupted save
        leaves no file behind). An existing file is replaced only with `overwrite`; a path that
        is not a regular file (device, pipe, symlink, directory) is refused."""
        from safetensors.torch import save_file

        from .files import atomic_path, check_output_file

        path = check_output_file(os.fspath(path), overwrite)
        metadata = {"format": FORMAT, "moee_metadata": json.dumps(self.metadata)}
        tensors = {"hs": self.hs.contiguous().cpu(), "rw": self.rw.contiguous().cpu()}
        with atomic_path(path, overwrite) as tmp:
            save_file(tensors, tmp, metadata)

    @classmethod
    def load(cls, path: str | os.PathLike) -> MoEEmbeddings:
        """Read a file written by `save`; a missing, truncated or foreign file fails naming it."""
        from .files import read_safetensors

        path = os.fspath(path)
        arrays, header = read_safetensors(path, ("hs", "rw"))
        hs, rw = (torch.from_numpy(np.array(arrays[name])) for name in ("hs", "rw"))
        return cls(hs, rw, json.loads(header.get("moee_metadata", "{}")))
