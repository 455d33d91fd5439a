"""Probabilistic expansion control for caption sparse vectors (D2S, Nguyen et al., ECIR 2024).

A learned sparse encoder is free to *expand* a caption onto vocabulary terms it does not
contain. D2S (§3.2, "probabilistic expansion control") curbs this early in training: with
probability ``p`` a caption's sparse vector is multiplied by a 0/1 mask of **its own input token
ids**, so it can only weight the words it contains; ``p`` decays linearly from ``p0 = 1`` to 0 at
95% of training, after which captions expand freely. Images always expand, and ``p = 0`` at
evaluation time. sdray offers the same control to the ``joint`` method (DESIGN.md §1).

The module produces the mask; the losses (:class:`~sdray.losses.D2SLoss`,
:class:`~sdray.losses.JointSelfDistillationLoss`) take it as ``txt_mask`` and multiply the
caption sparse vectors by it before scoring and regularising.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

__all__ = ["token_support_mask", "ExpansionControl"]


def token_support_mask(
    input_ids: Tensor,
    vocab_size: int,
    attention_mask: Tensor | None = None,
    exclude_token_ids: Sequence[int] = (),
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """0/1 mask ``(B, V)``: 1 at the vocabulary ids that occur in each caption's input ids.

    Args:
        input_ids: ``(B, L)`` token ids.
        vocab_size: ``V``.
        attention_mask: ``(B, L)``; positions with 0 (padding) are not counted.
        exclude_token_ids: ids never kept even when present (e.g. ``[CLS]``, ``[SEP]``).
        dtype: dtype of the returned mask.
    """
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be (B, L), got {tuple(input_ids.shape)}")
    ids = input_ids.long()
    if ids.numel() and (ids.min() < 0 or ids.max() >= vocab_size):
        raise ValueError(f"input_ids must lie in [0, {vocab_size})")
    keep = torch.ones_like(ids, dtype=dtype)
    if attention_mask is not None:
        keep = keep * (attention_mask != 0).to(dtype)
    mask = torch.zeros(ids.shape[0], vocab_size, dtype=dtype, device=ids.device)
    mask.scatter_reduce_(1, ids, keep, reduce="amax")
    if exclude_token_ids:
        mask[:, torch.as_tensor(list(exclude_token_ids), device=ids.device, dtype=torch.long)] = 0
    return mask


class ExpansionControl(nn.Module):
    """Draws the per-caption expansion mask of D2S with a linearly decaying probability.

    .. math::

        p(t) = p_0 \\cdot \\max\\big(0,\\; 1 - t / (f_{end} \\cdot T)\\big)

        m_b = \\begin{cases} \\mathbb{1}[v \\in \\mathrm{tokens}(c_b)] & \\text{with probability } p(t) \\\\
                             \\mathbf{1} & \\text{otherwise} \\end{cases}

    With the defaults ``p0=1``, ``end_fraction=0.95``: ``p = 1`` at step 0, ``0.5`` at 47.5%
    of training, 0 from 95% on. In ``eval()`` mode the mask is all ones (``p = 0``), like
    dropout.

    Reference: Nguyen, Hendriksen, Yates, de Rijke, "Multimodal Learned Sparse Retrieval with
    Probabilistic Expansion Control", ECIR 2024, §3.2. The official joint code
    (holi-lab/mm-sparse-retrieval) draws one decision per *batch* and steps ``p`` per epoch;
    sdray draws per caption by default (``granularity="caption"``) and steps ``p`` per
    optimiser step; ``granularity="batch"`` reproduces the per-batch draw.

    Args:
        vocab_size: ``V`` of the sparse vectors.
        total_steps: total optimiser steps ``T`` of the run.
        p0: initial masking probability.
        end_fraction: fraction of training at which ``p`` reaches 0.
        granularity: ``"caption"`` (one Bernoulli draw per caption) or ``"batch"`` (one per batch).
        exclude_token_ids: token ids never kept by the mask (e.g. ``[CLS]``/``[SEP]``).

    Shapes: ``forward(input_ids (B, L), step, attention_mask (B, L) | None)`` → ``(B, V)`` mask.

    Example::

        >>> ec = ExpansionControl(vocab_size=30522, total_steps=10_000)
        >>> txt_mask = ec(batch["input_ids"], step, batch["attention_mask"])
        >>> loss, logs = joint_loss(..., txt_mask=txt_mask, step=step)
    """

    def __init__(
        self,
        vocab_size: int,
        total_steps: int,
        p0: float = 1.0,
        end_fraction: float = 0.95,
        granularity: str = "caption",
        exclude_token_ids: Sequence[int] = (),
    ) -> None:
        super().__init__()
        if vocab_size <= 0:
            raise ValueError(f"vocab_size must be > 0, got {vocab_size}")
        if total_steps <= 0:
            raise ValueError(f"total_steps must be > 0, got {total_steps}")
        if not 0.0 <= p0 <= 1.0:
            raise ValueError(f"p0 must lie in [0, 1], got {p0}")
        if not 0.0 < end_fraction <= 1.0:
            raise ValueError(f"end_fraction must lie in (0, 1], got {end_fraction}")
        if granularity not in ("caption", "batch"):
            raise ValueError(f"granularity must be 'caption' or 'batch', got {granularity!r}")
        self.vocab_size = int(vocab_size)
        self.total_steps = int(total_steps)
        self.p0 = float(p0)
        self.end_fraction = float(end_fraction)
        self.granularity = granularity
        self.exclude_token_ids = tuple(int(i) for i in exclude_token_ids)

    def probability(self, step: int | float) -> float:
        """Scheduled masking probability ``p(step)`` (ignores train/eval mode)."""
        end = self.end_fraction * self.total_steps
        return self.p0 * max(0.0, 1.0 - float(step) / end)

    def forward(
        self,
        input_ids: Tensor,
        step: int | float,
        attention_mask: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Return the ``(B, V)`` float mask to multiply the caption sparse vectors with."""
        b = input_ids.shape[0]
        device = input_ids.device
        p = self.probability(step) if self.training else 0.0
        ones = torch.ones(b, self.vocab_size, device=device)
        if p <= 0.0:
            return ones
        n_draws = b if self.granularity == "caption" else 1
        draw = torch.rand(n_draws, generator=generator, device="cpu").to(device) < p
        draw = draw.expand(b) if n_draws == 1 else draw
        if not bool(draw.any()):
            return ones
        support = token_support_mask(
            input_ids, self.vocab_size, attention_mask, self.exclude_token_ids
        )
        return torch.where(draw[:, None], support, ones)

    def extra_repr(self) -> str:
        return (
            f"vocab_size={self.vocab_size}, total_steps={self.total_steps}, p0={self.p0}, "
            f"end_fraction={self.end_fraction}, granularity={self.granularity!r}"
        )
