"""Training objectives of sdray (DESIGN.md §1), as small ``nn.Module`` s in pure PyTorch.

Conventions shared by every loss:

* **images are rows, texts columns** of every score matrix;
* dense inputs are L2-normalised embeddings, sparse inputs non-negative ``(B, V)`` vectors,
  ``temperature`` is τ itself (scores are divided by it);
* targets are a boolean positive mask ``pos (B_i, B_t)`` (:func:`positive_mask`), ``None`` for
  the diagonal; multi-positive rows use a uniform soft target (see :mod:`.targets`);
* in a distributed step the inputs are a rank's rows and ``columns`` (:class:`Columns`) holds
  every rank's vectors; :class:`sdray.training.Trainer` calls these modules (see :mod:`.columns`);
* ``forward`` returns ``(loss, logs)``: a scalar tensor and a ``dict[str, float]`` of components.

Modules: :class:`DenseContrastiveLoss` (``dense``), :class:`JointSelfDistillationLoss`
(``joint``), :class:`D2SLoss` (``d2s``), :class:`L1Regularizer`, :class:`FlopsRegularizer`,
:class:`ExpansionControl`. :func:`build_loss` makes the loss of a ``LossConfig``.
"""

from __future__ import annotations

from .columns import Columns, directions, row_targets
from .contrastive import DenseContrastiveLoss
from .d2s import D2SLoss
from .expansion import ExpansionControl, token_support_mask
from .joint import JointSelfDistillationLoss
from .regularizers import FlopsRegularizer, L1Regularizer, build_regularizer, quadratic_warmup
from .targets import (
    distillation,
    info_nce,
    kd_rows,
    nce_rows,
    multi_positive_cross_entropy,
    positive_mask,
    score_matrix,
    soft_cross_entropy,
)

__all__ = [
    "DenseContrastiveLoss",
    "JointSelfDistillationLoss",
    "D2SLoss",
    "L1Regularizer",
    "FlopsRegularizer",
    "ExpansionControl",
    "build_loss",
    "build_regularizer",
    "quadratic_warmup",
    "positive_mask",
    "score_matrix",
    "info_nce",
    "distillation",
    "multi_positive_cross_entropy",
    "soft_cross_entropy",
    "token_support_mask",
    "Columns",
    "directions",
    "row_targets",
    "nce_rows",
    "kd_rows",
]


def build_loss(cfg, total_steps: int | None = None):
    """The loss module of a ``sdray.config.LossConfig`` (duck-typed: any object with its fields).

    ``method="dense"`` → :class:`DenseContrastiveLoss`; ``"d2s"`` → :class:`D2SLoss` with
    ``q_reg = d_reg = cfg.d2s_l1`` and ``cfg.d2s_regularizer``; ``"joint"`` → :class:`JointSelfDistillationLoss`.
    Expansion control is built separately (:class:`ExpansionControl`), as it needs the
    vocabulary size.
    """
    method = cfg.method
    if method == "dense":
        return DenseContrastiveLoss()
    if method == "d2s":
        return D2SLoss(
            q_reg=cfg.d2s_l1,
            d_reg=cfg.d2s_l1,
            total_steps=total_steps,
            warmup_fraction=cfg.reg_warmup_fraction,
            regularizer=cfg.d2s_regularizer,
        )
    if method == "joint":
        return JointSelfDistillationLoss(
            w1=cfg.w1,
            w2=cfg.w2,
            lambda1=cfg.lambda1,
            lambda2=cfg.lambda2,
            q_reg=cfg.q_reg,
            d_reg=cfg.d_reg,
            total_steps=total_steps,
            warmup_fraction=cfg.reg_warmup_fraction,
            regularizer=cfg.regularizer,
            detach_teacher=cfg.detach_teacher,
            teacher_orientation=cfg.teacher_orientation,
        )
    raise ValueError(f"unknown loss method {method!r}")
