"""Dense contrastive loss: the ``dense`` baseline (the "original VLP" of Song et al.)."""

from __future__ import annotations

from torch import Tensor, nn

from ._common import as_temperature, check_pair, check_pos, to_floats
from .targets import info_nce, score_matrix

__all__ = ["DenseContrastiveLoss"]


class DenseContrastiveLoss(nn.Module):
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

    Shapes:
        ``img_dense (B_i, D)``, ``txt_dense (B_t, D)``, ``temperature ()``,
        ``pos (B_i, B_t)`` bool or ``None`` → ``(loss (), logs dict[str, float])``.

    Example::

        >>> loss_fn = DenseContrastiveLoss()
        >>> pos = positive_mask(image_ids, captions)
        >>> loss, logs = loss_fn(img_dense, txt_dense, model.tau, pos)
        >>> loss.backward()
    """

    def forward(
        self,
        img_dense: Tensor,
        txt_dense: Tensor,
        temperature: Tensor | float,
        pos: Tensor | None = None,
    ) -> tuple[Tensor, dict[str, float]]:
        check_pair("dense", img_dense, txt_dense)
        pos = check_pos(pos, img_dense.shape[0], txt_dense.shape[0])
        tau = as_temperature(temperature, img_dense)
        s_dense = score_matrix(img_dense, txt_dense) / tau
        loss = info_nce(s_dense, pos)
        return loss, to_floats({"loss": loss, "dense_nce": loss, "temperature": tau})
