"""Joint sparse–dense self-knowledge distillation (Song et al., CIKM 2025)."""

from __future__ import annotations

from torch import Tensor

from ._common import LoggedLoss, apply_txt_mask, as_temperature, check_pair, regularizer_input
from .columns import Columns, directions, row_targets
from .regularizers import build_regularizer
from .targets import kd_rows, nce_rows, score_matrix

__all__ = ["JointSelfDistillationLoss"]


class JointSelfDistillationLoss(LoggedLoss):
    """Dense and sparse retrievers trained together, each distilled from their integrated score.

    Scores (images are rows, texts columns)::

        s_dense  = d_img · d_txtᵀ / τ
        s_sparse = z_img · z_txtᵀ                      (no τ)
        s_int    = w1 · s_dense + w2 · s_sparse        (the shared teacher)

    Loss::

        L     = λ1·InfoNCE(s_dense) + λ2·InfoNCE(s_sparse) + InfoNCE(s_int)
        L'    = λ1·KD(s_int→s_dense) + λ2·KD(s_int→s_sparse)
        total = relevance_scale·(L + L') + ½·(R_text(z_txt) + R_image(z_img))

    with ``InfoNCE`` the mean of row- and column-wise multi-positive CE
    (:func:`~sdray.losses.targets.info_nce`), ``KD(t→s) = ½(KD_i2t + KD_t2i)``,
    ``KD_i2t = −mean_i Σ_j softmax(t)_ij log_softmax(s)_ij`` and ``KD_t2i`` the same on the
    transposed matrices (:func:`~sdray.losses.targets.distillation`). ``relevance_scale=¼`` is the
    official code's scaling (it divides L and L' by the two enabled representations, then
    averages them), DESIGN.md §1. ``R`` is :class:`~sdray.losses.L1Regularizer` (or
    :class:`~sdray.losses.FlopsRegularizer`) with weights ``q_reg`` (text) and ``d_reg`` (image),
    warmed up quadratically over the first ``warmup_fraction`` of ``total_steps``.

    Reference: Song et al., "Sparse and Dense Retrievers Learn Better Together: Joint
    Sparse-Dense Optimization for Text-Image Retrieval", CIKM 2025 (arXiv 2508.16707), §3.2–3.3;
    official code holi-lab/mm-sparse-retrieval ``loss.py`` (``BICELoss``).

    Deviations from the official code, as options:

    * ``detach_teacher`` (default **True**): the teacher ``s_int`` is a constant in L'. The
      official code does not detach; there the KD terms also train the teacher, and in the
      reference run τ then collapsed to its clamp (DESIGN.md §1). ``False`` reproduces it.
    * ``teacher_orientation`` (default **"correct"**): the text→image KD uses ``softmax`` over the
      rows of ``s_intᵀ``. ``"official"`` reproduces the paper code, whose text→image teacher is
      the *un-transposed* image→text distribution.
    * Multi-positive targets (``pos``) in the InfoNCE terms; ``pos=None`` is the official
      diagonal. The KD terms need no mask: the teacher is already a distribution.
    * Expansion control (``txt_mask``, from :class:`~sdray.losses.ExpansionControl`) is optional;
      the masked caption vectors are used for the scores *and* the text regulariser.

    Args:
        w1, w2: weights of the dense and sparse scores in ``s_int``.
        lambda1, lambda2: weights of the dense and sparse terms in L and L'.
        q_reg, d_reg: final regulariser weights for caption and image sparse vectors.
        total_steps: total optimiser steps (for the warm-up); ``None``: no warm-up.
        warmup_fraction: regulariser warm-up fraction (default 0.2).
        regularizer: ``"l1"`` (official) or ``"flops"``.
        detach_teacher: stop gradients through the teacher of L'.
        teacher_orientation: ``"correct"`` or ``"official"``.
        relevance_scale: factor on ``L + L'`` (official: 0.25).

    Distributed step: with ``columns`` (:class:`~sdray.losses.columns.Columns`: every rank's
    dense and sparse vectors, the captions' already masked) the inputs are this rank's rows,
    ``pos`` is the gathered batch's ``(N_i, N_t)`` mask, and each term is a mean over this
    rank's rows in both directions (i2t: its images × all texts; t2i: its texts × all images),
    so the mean over ranks is the loss of the whole batch. L1 is applied to the rows, FLOPS to
    the gathered vectors. ``columns=None`` is one process.

    Shapes:
        ``img_dense (B_i, D)``, ``txt_dense (B_t, D)`` (L2-normalised), ``img_sparse (B_i, V)``,
        ``txt_sparse (B_t, V)`` (non-negative), ``temperature ()``, ``pos (B_i, B_t)`` bool or
        ``None``, ``txt_mask (B_t, V)`` or ``None``, ``step`` int (needed while a warm-up is
        configured) → ``(loss (), logs dict[str, float])``. ``teacher_orientation="official"``
        needs ``B_i == B_t``.

    Logged components: ``loss``, ``relevance`` (= relevance_scale·(L+L')), ``L``, ``L_prime``,
    ``dense_nce``, ``sparse_nce``, ``int_nce``, ``kd_dense``, ``kd_sparse``, ``reg`` (=½(R_t+R_i)),
    ``reg_text``, ``reg_image``, ``reg_weight_text``, ``reg_weight_image``, ``temperature``
    (:meth:`terms` returns them as tensors).

    Example::

        >>> loss_fn = JointSelfDistillationLoss(w1=0.1, w2=0.1, lambda1=0.9, lambda2=0.3,
        ...                                     q_reg=5e-4, d_reg=3e-5, total_steps=10_000)
        >>> pos = positive_mask(batch["image_id"], batch["caption"])
        >>> loss, logs = loss_fn(d_img, d_txt, z_img, z_txt, model.tau, pos, step=step)
        >>> loss.backward()
    """

    def __init__(
        self,
        w1: float = 0.1,
        w2: float = 0.1,
        lambda1: float = 0.9,
        lambda2: float = 0.3,
        q_reg: float = 5e-4,
        d_reg: float = 3e-5,
        total_steps: int | None = None,
        warmup_fraction: float = 0.2,
        regularizer: str = "l1",
        detach_teacher: bool = True,
        teacher_orientation: str = "correct",
        relevance_scale: float = 0.25,
    ) -> None:
        super().__init__()
        if teacher_orientation not in ("correct", "official"):
            raise ValueError(
                f"teacher_orientation must be 'correct' or 'official', got {teacher_orientation!r}"
            )
        self.w1, self.w2 = float(w1), float(w2)
        self.lambda1, self.lambda2 = float(lambda1), float(lambda2)
        self.detach_teacher = bool(detach_teacher)
        self.teacher_orientation = teacher_orientation
        self.relevance_scale = float(relevance_scale)
        self.text_reg = build_regularizer(regularizer, q_reg, total_steps, warmup_fraction)
        self.image_reg = build_regularizer(regularizer, d_reg, total_steps, warmup_fraction)

    #: ``(a, b) -> a @ b.T`` for the sparse scores (the Trainer may swap in sparse kernels)
    sparse_scorer = staticmethod(score_matrix)

    def terms(
        self,
        img_dense: Tensor,
        txt_dense: Tensor,
        img_sparse: Tensor,
        txt_sparse: Tensor,
        temperature: Tensor | float,
        pos: Tensor | None = None,
        txt_mask: Tensor | None = None,
        step: int | None = None,
        columns: Columns | None = None,
    ) -> tuple[Tensor, dict[str, Tensor | float]]:
        """:meth:`forward` with the logged components as detached tensors (no host sync)."""
        check_pair("dense", img_dense, txt_dense)
        check_pair("sparse", img_sparse, txt_sparse)
        b_i, b_t = img_dense.shape[0], txt_dense.shape[0]
        if img_sparse.shape[0] != b_i or txt_sparse.shape[0] != b_t:
            raise ValueError("dense and sparse batches differ in size")
        pos_i2t, pos_t2i = row_targets(pos, columns, b_i, b_t)
        tau = as_temperature(temperature, img_dense)
        txt_sparse = apply_txt_mask(txt_sparse, txt_mask)
        c = columns

        d_i2t, d_t2i = directions(
            img_dense, txt_dense, None if c is None else c.img_dense,
            None if c is None else c.txt_dense,
        )
        dense_i2t, dense_t2i = d_i2t / tau, d_t2i / tau
        sparse_i2t, sparse_t2i = directions(
            img_sparse, txt_sparse, None if c is None else c.img_sparse,
            None if c is None else c.txt_sparse, self.sparse_scorer,
        )
        int_i2t = self.w1 * dense_i2t + self.w2 * sparse_i2t
        int_t2i = self.w1 * dense_t2i + self.w2 * sparse_t2i

        dense_nce = nce_rows(dense_i2t, dense_t2i, pos_i2t, pos_t2i)
        sparse_nce = nce_rows(sparse_i2t, sparse_t2i, pos_i2t, pos_t2i)
        int_nce = nce_rows(int_i2t, int_t2i, pos_i2t, pos_t2i)
        kd_kw = dict(detach_teacher=self.detach_teacher, orientation=self.teacher_orientation)
        kd_dense = kd_rows(int_i2t, int_t2i, dense_i2t, dense_t2i, **kd_kw)
        kd_sparse = kd_rows(int_i2t, int_t2i, sparse_i2t, sparse_t2i, **kd_kw)

        big_l = self.lambda1 * dense_nce + self.lambda2 * sparse_nce + int_nce
        big_l_prime = self.lambda1 * kd_dense + self.lambda2 * kd_sparse
        relevance = self.relevance_scale * (big_l + big_l_prime)
        reg_text = self.text_reg(
            regularizer_input(self.text_reg, txt_sparse, None if c is None else c.txt_sparse), step
        )
        reg_image = self.image_reg(
            regularizer_input(self.image_reg, img_sparse, None if c is None else c.img_sparse), step
        )
        reg = 0.5 * (reg_text + reg_image)
        loss = relevance + reg
        logs = {
            "loss": loss,
            "relevance": relevance,
            "L": big_l,
            "L_prime": big_l_prime,
            "dense_nce": dense_nce,
            "sparse_nce": sparse_nce,
            "int_nce": int_nce,
            "kd_dense": kd_dense,
            "kd_sparse": kd_sparse,
            "reg": reg,
            "reg_text": reg_text,
            "reg_image": reg_image,
            "reg_weight_text": self.text_reg.weight_at(step),
            "reg_weight_image": self.image_reg.weight_at(step),
            "temperature": tau,
        }
        return loss, {k: v.detach() if isinstance(v, Tensor) else v for k, v in logs.items()}

    def extra_repr(self) -> str:
        return (
            f"w1={self.w1}, w2={self.w2}, lambda1={self.lambda1}, lambda2={self.lambda2}, "
            f"detach_teacher={self.detach_teacher}, "
            f"teacher_orientation={self.teacher_orientation!r}, "
            f"relevance_scale={self.relevance_scale}"
        )
