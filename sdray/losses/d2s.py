"""Dense-to-sparse distillation: the ``d2s`` baseline (Nguyen et al., ECIR 2024)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ._common import LoggedLoss, apply_txt_mask, as_temperature, check_pair, regularizer_input
from .columns import Columns, directions
from .regularizers import build_regularizer
from .targets import score_matrix, soft_cross_entropy

__all__ = ["D2SLoss"]


class D2SLoss(LoggedLoss):
    """Sparse head distilled from a frozen dense model, both directions, plus sparsity.

    .. math::

        P^{i2t} = \\mathrm{softmax}_{row}\\big(\\mathrm{sg}[d_{img} d_{txt}^\\top] / \\tau\\big),\\quad
        P^{t2i} = \\mathrm{softmax}_{row}\\big(\\mathrm{sg}[d_{txt} d_{img}^\\top] / \\tau\\big)

        s_{sparse} = z_{img}\\, (m \\odot z_{txt})^\\top

        \\mathcal{L} = \\tfrac12\\big(\\mathrm{CE}(s_{sparse}, P^{i2t}) + \\mathrm{CE}(s_{sparse}^\\top, P^{t2i})\\big)
                     + \\tfrac12\\big(R_{text}(m \\odot z_{txt}) + R_{image}(z_{img})\\big)

    ``sg`` is stop-gradient: neither the dense embeddings nor τ receive a gradient. ``m`` is the
    optional expansion-control mask (:class:`~sdray.losses.ExpansionControl`); ``R`` is L1 by
    default with weight ``1e-3`` for both modalities, warmed up quadratically like the joint
    loss. ``CE(s, P) = −mean_rows Σ_j P_j log_softmax(s)_j``.

    Multi-positive targets: the teacher is already a soft distribution — duplicate captions have
    identical dense embeddings and so receive identical teacher probabilities — so this loss
    takes no ``pos`` mask.

    Reference: Nguyen, Hendriksen, Yates, de Rijke, "Multimodal Learned Sparse Retrieval with
    Probabilistic Expansion Control", ECIR 2024, §3; as run by Song et al. (CIKM 2025) through
    holi-lab/mm-sparse-retrieval ``loss.py`` (``BaselineLoss``: the same ½ averaging of both
    the CE directions and the two regularisers).

    Args:
        q_reg, d_reg: regulariser weights for captions and images (default 1e-3 each).
        total_steps: total optimiser steps (for the warm-up); ``None``: no warm-up.
        warmup_fraction: regulariser warm-up fraction (default 0.2).
        regularizer: ``"l1"`` (D2S) or ``"flops"``.

    Distributed step: with ``columns`` (:class:`~sdray.losses.columns.Columns`, every rank's
    dense and sparse vectors, the captions' already masked) the inputs are this rank's rows and
    the loss is a mean over them; L1 is applied to the rows, FLOPS to the gathered vectors.

    Shapes:
        ``img_dense (B_i, D)``, ``txt_dense (B_t, D)`` (L2-normalised teacher embeddings),
        ``img_sparse (B_i, V)``, ``txt_sparse (B_t, V)``, ``temperature ()`` (the dense
        model's τ), ``txt_mask (B_t, V)`` or ``None``, ``step`` int →
        ``(loss (), logs dict[str, float])``. Logged: ``loss``, ``distill``, ``distill_i2t``,
        ``distill_t2i``, ``reg``, ``reg_text``, ``reg_image``, ``reg_weight_text``,
        ``reg_weight_image``; :meth:`terms` returns them as tensors.

    Example::

        >>> loss_fn = D2SLoss(total_steps=10_000)
        >>> ec = ExpansionControl(vocab_size=30522, total_steps=10_000)
        >>> with torch.no_grad():
        ...     d_img, d_txt = frozen_dense(images), frozen_dense(captions)
        >>> m = ec(input_ids, step, attention_mask)
        >>> loss, logs = loss_fn(d_img, d_txt, z_img, z_txt, dense_tau, txt_mask=m, step=step)
    """

    def __init__(
        self,
        q_reg: float = 1e-3,
        d_reg: float = 1e-3,
        total_steps: int | None = None,
        warmup_fraction: float = 0.2,
        regularizer: str = "l1",
    ) -> None:
        super().__init__()
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
        txt_mask: Tensor | None = None,
        step: int | None = None,
        columns: Columns | None = None,
    ) -> tuple[Tensor, dict[str, Tensor | float]]:
        """:meth:`forward` with the logged components as detached tensors (no host sync)."""
        check_pair("dense", img_dense, txt_dense)
        check_pair("sparse", img_sparse, txt_sparse)
        if img_sparse.shape[0] != img_dense.shape[0] or txt_sparse.shape[0] != txt_dense.shape[0]:
            raise ValueError("dense and sparse batches differ in size")
        txt_sparse = apply_txt_mask(txt_sparse, txt_mask)
        c = columns
        with torch.no_grad():
            tau = as_temperature(temperature, img_dense).detach()
            t_i2t, t_t2i = directions(
                img_dense.detach(),
                txt_dense.detach(),
                None if c is None else c.img_dense.detach(),
                None if c is None else c.txt_dense.detach(),
            )
            p_i2t = F.softmax(t_i2t / tau, dim=1)
            p_t2i = F.softmax(t_t2i / tau, dim=1)
        s_i2t, s_t2i = directions(
            img_sparse,
            txt_sparse,
            None if c is None else c.img_sparse,
            None if c is None else c.txt_sparse,
            self.sparse_scorer,
        )
        distill_i2t = soft_cross_entropy(s_i2t, p_i2t.to(s_i2t.dtype))
        distill_t2i = soft_cross_entropy(s_t2i, p_t2i.to(s_t2i.dtype))
        distill = 0.5 * (distill_i2t + distill_t2i)
        reg_text = self.text_reg(
            regularizer_input(self.text_reg, txt_sparse, None if c is None else c.txt_sparse), step
        )
        reg_image = self.image_reg(
            regularizer_input(self.image_reg, img_sparse, None if c is None else c.img_sparse), step
        )
        reg = 0.5 * (reg_text + reg_image)
        loss = distill + reg
        logs = {
            "loss": loss,
            "distill": distill,
            "distill_i2t": distill_i2t,
            "distill_t2i": distill_t2i,
            "reg": reg,
            "reg_text": reg_text,
            "reg_image": reg_image,
            "reg_weight_text": self.text_reg.weight_at(step),
            "reg_weight_image": self.image_reg.weight_at(step),
        }
        return loss, {k: v.detach() if isinstance(v, Tensor) else v for k, v in logs.items()}
