"""Local rows against gathered columns: the form every sdray loss takes in a distributed step.

With ``W`` workers of ``B`` pairs each, a worker holds its own rows and every worker's columns
(all-gathered with gradients; open_clip's ``gather_with_grad`` + ``local_loss`` scheme)::

    i2t rows: this rank's images × all texts       (B, W·B)
    t2i rows: this rank's texts  × all images      (B, W·B)

Every loss term is a mean over the rank's rows, so the mean of the ranks' losses is the loss of
the concatenated ``W·B`` batch, and so is the mean of their gradients (what DDP averages).
:class:`Columns` carries the gathered vectors and where the rank's rows sit among them;
``columns=None`` is one process (the columns are the rows, and the t2i matrix is the transposed
i2t one). The positive mask is the global ``(N_i, N_t)`` mask of the gathered batch
(:func:`~sdray.losses.targets.positive_mask` of the gathered ids); :func:`row_targets` cuts each
direction's rows out of it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from .targets import score_matrix

__all__ = ["Columns", "directions", "row_targets"]

Scorer = Callable[[Tensor, Tensor], Tensor]


@dataclass(frozen=True)
class Columns:
    """Every rank's vectors, gathered in rank order, and the index of this rank's first row.

    ``img_dense (N_i, D)``, ``txt_dense (N_t, D)``, ``img_sparse (N_i, V)`` / ``txt_sparse
    (N_t, V)`` or ``None`` (dense loss), ``offset`` int. Caption sparse vectors are gathered
    *after* any expansion-control mask: the losses mask only the rank's own rows.
    """

    img_dense: Tensor
    txt_dense: Tensor
    img_sparse: Tensor | None = None
    txt_sparse: Tensor | None = None
    offset: int = 0


def directions(
    img_rows: Tensor,
    txt_rows: Tensor,
    img_cols: Tensor | None,
    txt_cols: Tensor | None,
    scorer: Scorer = score_matrix,
) -> tuple[Tensor, Tensor]:
    """``(s_i2t (B_i, N_t), s_t2i (B_t, N_i))``: rows × columns in both directions.

    Without columns (one process) ``s_t2i`` is ``s_i2t.T`` (one matmul).
    """
    if img_cols is None or txt_cols is None:
        s = scorer(img_rows, txt_rows)
        return s, s.T
    return scorer(img_rows, txt_cols), scorer(txt_rows, img_cols)


def row_targets(
    pos: Tensor | None, columns: Columns | None, b_i: int, b_t: int
) -> tuple[Tensor | None, Tensor | None]:
    """The positive masks of this rank's rows: ``(pos_i2t (B_i, N_t), pos_t2i (B_t, N_i))``.

    ``pos`` is the mask of the whole (gathered) batch, ``(N_i, N_t)``, images as rows; ``None``
    is the identity (sample ``k``'s image with sample ``k``'s caption). Text→image rows are
    columns of ``pos``: the mask need not be symmetric.
    """
    if columns is None:
        if pos is None:
            return None, None
        if pos.shape != (b_i, b_t):
            raise ValueError(f"pos has shape {tuple(pos.shape)}, expected {(b_i, b_t)}")
        pos = pos.bool()
        return pos, pos.T
    n_i, n_t = columns.img_dense.shape[0], columns.txt_dense.shape[0]
    a = columns.offset
    if not (0 <= a and a + b_i <= n_i and a + b_t <= n_t):
        raise ValueError(f"rows [{a}, {a + max(b_i, b_t)}) do not lie within the columns")
    if pos is None:
        if n_i != n_t:
            raise ValueError("pos=None (identity targets) needs as many images as texts")
        pos = torch.eye(n_i, dtype=torch.bool, device=columns.img_dense.device)
    if pos.shape != (n_i, n_t):
        raise ValueError(f"pos has shape {tuple(pos.shape)}, expected the gathered {(n_i, n_t)}")
    pos = pos.bool()
    return pos[a : a + b_i], pos[:, a : a + b_t].T
