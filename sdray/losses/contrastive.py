"""Dense contrastive loss: the ``dense`` baseline (the "original VLP" of Song et al.)."""

from __future__ import annotations

from torch import Tensor

from ._common import LoggedLoss, as_temperature, check_pair
from .columns import Columns, directions, row_targets
from .targets import nce_rows

__all__ = ["DenseContrastiveLoss"]


class DenseContrastiveLoss(LoggedLoss):
    """Symmetric InfoNCE on temperature-scaled cosine scores, with multi-positive targets.

    .. math::

        s_{dense} = \\frac{d_{img}\\, d_{txt}^\\top}{\\tau}, \\qquad
        \\mathcal{L} = \\tfrac12\\big(\\mathrm{CE}_{pos}(s_{dense}) + \\mathrm{CE}_{pos^T}(s_{dense}^\\top)\\big)

    where ``CE_pos`` is the cross-entropy against the uniform distribution over each row's
    positives (:func:`~sdray.losses.targets.multi_positive_cross_entropy`); with ``pos=None``
    (identity) this is exactly CLIP's loss (Radford et al., ICML 2021, Fig. 3) and the dense term
    of Song et al. (CIKM 2025, §3.2, Eq. for ``L_dense``).

    Inputs must already be L2-normalised; ``temperature`` is the learnable ``τ`` itself (clamp
    it in the model, DESIGN.md §1: init 0.07, range [0.001, 0.5]).

    Distributed step: ``columns`` (:class:`~sdray.losses.columns.Columns`) holds every rank's
    embeddings; the inputs are then this rank's rows, ``pos`` the gathered batch's mask, and the
    loss a mean over this rank's rows (its mean over ranks is the whole batch's loss).

    Shapes:
        ``img_dense (B_i, D)``, ``txt_dense (B_t, D)``, ``temperature ()``,
        ``pos (B_i, B_t)`` (``(N_i, N_t)`` with ``columns``) bool or ``None`` →
        ``(loss (), logs dict[str, float])``; :meth:`terms` returns the logs as tensors.

    Example::

        >>> loss_fn = DenseContrastiveLoss()
        >>> pos = positive_mask(image_ids, captions)
        >>> loss, logs = loss_fn(img_dense, txt_dense, model.tau, pos)
        >>> loss.backward()
    """

    def terms(
        self,
        img_dense: Tensor,
        txt_dense: Tensor,
        temperature: Tensor | float,
        pos: Tensor | None = None,
        columns: Columns | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """:meth:`forward` with the logged components as detached tensors (no host sync)."""
        check_pair("dense", img_dense, txt_dense)
        pos_i2t, pos_t2i = row_targets(pos, columns, img_dense.shape[0], txt_dense.shape[0])
        tau = as_temperature(temperature, img_dense)
        img_cols = None if columns is None else columns.img_dense
        txt_cols = None if columns is None else columns.txt_dense
        s_i2t, s_t2i = directions(img_dense, txt_dense, img_cols, txt_cols)
        loss = nce_rows(s_i2t / tau, s_t2i / tau, pos_i2t, pos_t2i)
        return loss, {"loss": loss.detach(), "dense_nce": loss.detach(), "temperature": tau.detach()}
