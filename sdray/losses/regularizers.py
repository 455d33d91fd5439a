"""Sparsity regularisers for learned sparse vectors, with the quadratic warm-up of SPLADE.

Both regularisers are stateless: the caller passes the global optimisation ``step`` (the number
of optimiser steps already taken, 0 on the first batch), so resuming from a checkpoint needs
nothing but the step counter the trainer already keeps.

Warm-up (Formal et al., SPLADE, SIGIR 2021 §3; Song et al., CIKM 2025 §4 / official
``loss.py``): the weight grows as ``weight · (t / T)²`` with ``T = warmup_fraction ·
total_steps`` and stays at ``weight`` afterwards. ``total_steps=None`` or
``warmup_fraction=0`` disables the warm-up (full weight from step 0).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["quadratic_warmup", "L1Regularizer", "FlopsRegularizer", "build_regularizer"]


def quadratic_warmup(
    weight: float, step: int | float | None, total_steps: int | None, warmup_fraction: float = 0.2
) -> float:
    """``weight · min(step / T, 1)²`` with ``T = warmup_fraction · total_steps``.

    Returns ``weight`` when there is no warm-up (``total_steps`` is None or ``T == 0``).
    Raises ``ValueError`` if a warm-up is configured but ``step`` is None: a forgotten step would
    otherwise silently apply the full weight (or none) from the start.

    Example::

        >>> quadratic_warmup(1e-3, step=10, total_steps=100, warmup_fraction=0.2)  # (10/20)²
        0.00025
    """
    if not 0.0 <= warmup_fraction <= 1.0:
        raise ValueError(f"warmup_fraction must lie in [0, 1], got {warmup_fraction}")
    if total_steps is None or warmup_fraction == 0.0:
        return float(weight)
    horizon = warmup_fraction * float(total_steps)
    if horizon <= 0.0:
        return float(weight)
    if step is None:
        raise ValueError("step is required while a regulariser warm-up is configured")
    step = float(step)
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    return float(weight) * min(step / horizon, 1.0) ** 2


class _Regularizer(nn.Module):
    #: True when the penalty is a mean of per-vector terms (a rank may apply it to its own rows);
    #: False when it couples the vectors of the batch (then it needs every rank's vectors).
    per_row = True

    def __init__(
        self, weight: float, total_steps: int | None = None, warmup_fraction: float = 0.2
    ) -> None:
        super().__init__()
        if weight < 0:
            raise ValueError(f"weight must be >= 0, got {weight}")
        if total_steps is not None and total_steps < 0:
            raise ValueError(f"total_steps must be >= 0, got {total_steps}")
        self.weight = float(weight)
        self.total_steps = total_steps
        self.warmup_fraction = float(warmup_fraction)
        quadratic_warmup(0.0, 0, total_steps, warmup_fraction)  # validates warmup_fraction

    def weight_at(self, step: int | float | None) -> float:
        """The warmed-up weight at ``step``."""
        return quadratic_warmup(self.weight, step, self.total_steps, self.warmup_fraction)

    def penalty(self, reps: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, reps: Tensor, step: int | float | None = None) -> Tensor:
        """Weighted penalty ``weight_at(step) · penalty(reps)``; ``reps`` is ``(B, V)``."""
        if reps.dim() != 2:
            raise ValueError(f"expected sparse vectors of shape (B, V), got {tuple(reps.shape)}")
        w = self.weight_at(step)
        with torch.autocast(device_type=reps.device.type, enabled=False):
            reps = reps if reps.dtype == torch.float64 else reps.float()
            return w * self.penalty(reps)

    def extra_repr(self) -> str:
        return (
            f"weight={self.weight}, total_steps={self.total_steps}, "
            f"warmup_fraction={self.warmup_fraction}"
        )


class L1Regularizer(_Regularizer):
    """Mean over the batch of the L1 norm of each sparse vector.

    .. math::

        \\mathcal{R}_{L1}(Z) = w(t)\\,\\frac{1}{B}\\sum_{b=1}^{B}\\sum_{v=1}^{V} |z_{bv}|,
        \\qquad w(t) = w\\,\\min(t/T, 1)^2

    This is the regulariser of Song et al. (CIKM 2025, §3.3; official ``loss.py`` class ``L1``)
    and of D2S (Nguyen et al., ECIR 2024, §3). It penalises every activation independently, so
    it shrinks the number of non-zeros per vector.

    Args:
        weight: final weight ``w`` (``q_reg`` for captions, ``d_reg`` for images).
        total_steps: total optimiser steps of the run (``None``: no warm-up).
        warmup_fraction: fraction of ``total_steps`` over which ``w(t)`` grows quadratically.

    Shapes: ``forward(reps (B, V), step)`` → scalar.

    Example::

        >>> reg = L1Regularizer(5e-4, total_steps=1000)
        >>> z = torch.relu(torch.randn(8, 30522))
        >>> loss = reg(z, step=100)  # 5e-4 · (100/200)² · mean_b ||z_b||₁
    """

    def penalty(self, reps: Tensor) -> Tensor:
        return reps.abs().sum(dim=1).mean()


class FlopsRegularizer(_Regularizer):
    """FLOPS regulariser (Paria et al., ICLR 2020, §3; SPLADE, Formal et al., SIGIR 2021 §3).

    .. math::

        \\mathcal{R}_{FLOPS}(Z) = w(t)\\sum_{v=1}^{V}\\Big(\\frac{1}{B}\\sum_{b=1}^{B}|z_{bv}|\\Big)^2

    A smooth relaxation of the expected number of multiply-adds of a query–document dot
    product: it penalises vocabulary terms that are active *across many* vectors, which evens
    out posting-list lengths rather than just shrinking each vector.

    Args and shapes as :class:`L1Regularizer`.

    Example::

        >>> reg = FlopsRegularizer(1e-3, total_steps=1000, warmup_fraction=0.2)
        >>> loss = reg(torch.relu(torch.randn(8, 100)), step=500)  # full weight after 200 steps
    """

    per_row = False

    def penalty(self, reps: Tensor) -> Tensor:
        return (reps.abs().mean(dim=0) ** 2).sum()


def build_regularizer(
    kind: str, weight: float, total_steps: int | None = None, warmup_fraction: float = 0.2
) -> _Regularizer:
    """``"l1"`` → :class:`L1Regularizer`, ``"flops"`` → :class:`FlopsRegularizer`."""
    kinds = {"l1": L1Regularizer, "flops": FlopsRegularizer}
    if kind not in kinds:
        raise ValueError(f"regularizer must be one of {sorted(kinds)}, got {kind!r}")
    return kinds[kind](weight, total_steps=total_steps, warmup_fraction=warmup_fraction)
