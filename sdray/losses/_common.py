"""Small shared helpers of the loss modules (not public API)."""

from __future__ import annotations

import torch
from torch import Tensor, nn


def check_pair(name: str, img: Tensor, txt: Tensor) -> None:
    if img.dim() != 2 or txt.dim() != 2:
        raise ValueError(
            f"{name}: expected 2-D (B, D) tensors, got {tuple(img.shape)} and {tuple(txt.shape)}"
        )
    if img.shape[1] != txt.shape[1]:
        raise ValueError(f"{name}: feature sizes differ: {img.shape[1]} vs {txt.shape[1]}")


def as_temperature(temperature: Tensor | float, like: Tensor) -> Tensor:
    t = temperature if isinstance(temperature, Tensor) else torch.tensor(float(temperature))
    if t.numel() != 1:
        raise ValueError("temperature must be a scalar")
    return t.reshape(()).to(device=like.device)


def apply_txt_mask(txt_sparse: Tensor, txt_mask: Tensor | None) -> Tensor:
    if txt_mask is None:
        return txt_sparse
    if txt_mask.shape != txt_sparse.shape:
        raise ValueError(
            f"txt_mask has shape {tuple(txt_mask.shape)}, txt_sparse {tuple(txt_sparse.shape)}"
        )
    return txt_sparse * txt_mask.to(txt_sparse.dtype)


def to_floats(items: dict[str, Tensor | float]) -> dict[str, float]:
    """Detach and convert to Python floats with a single device→host copy."""
    keys = [k for k, v in items.items() if isinstance(v, Tensor)]
    out = {k: float(v) for k, v in items.items() if not isinstance(v, Tensor)}
    if keys:
        dev = items[keys[0]].device
        dtype = torch.float32 if dev.type == "mps" else torch.float64
        vals = torch.stack(
            [items[k].detach().reshape(()).to(device=dev, dtype=dtype) for k in keys]
        ).cpu().tolist()
        out.update(zip(keys, vals))
    return out


def regularizer_input(reg, rows: Tensor, cols: Tensor | None) -> Tensor:
    """What a regulariser sees in a (distributed) step: the rank's rows for a per-row penalty
    (L1: the mean over ranks is the batch mean), every rank's vectors for a batch-level one
    (FLOPS: the same value on every rank)."""
    return rows if reg.per_row or cols is None else cols


class LoggedLoss(nn.Module):
    """A loss module whose :meth:`terms` returns ``(loss, logs)`` with the logs as detached tensors
    (no host sync, what the Trainer calls every step); calling the module returns the same loss
    with the logs as Python floats. Subclasses define ``terms``; its signature is the module's."""

    def forward(self, *args, **kwargs) -> tuple[Tensor, dict[str, float]]:
        loss, logs = self.terms(*args, **kwargs)
        return loss, to_floats(logs)
