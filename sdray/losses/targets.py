"""Score matrices, positive masks and the two cross-entropies every sdray loss is built from.

Conventions (DESIGN.md §1): **images are rows, texts are columns**. A batch is a list of
(image, caption) pairs, so row ``i`` and column ``i`` come from the same sample and a score
matrix is ``(B_i, B_t)`` with ``B_i == B_t`` for an ordinary paired batch.

Multi-positive targets
----------------------
Web and captioning data repeat themselves: COCO has five captions per image, and in some data
one caption names several images. Inside a random batch such duplicates are *false negatives*
for the usual diagonal InfoNCE. sdray therefore describes the targets of a batch with a boolean
**positive mask** ``pos (B_i, B_t)`` (see :func:`positive_mask`) and uses a *soft-target*
cross-entropy whose target distribution is **uniform over the positives of the row**:

.. math::

    \\mathrm{CE}_{pos}(s)_i = -\\sum_j \\frac{pos_{ij}}{\\sum_k pos_{ik}} \\log\\mathrm{softmax}(s_i)_j

This reduces exactly to ``F.cross_entropy(s, arange(B))`` when ``pos`` is the identity. We chose
it over the "log of the summed positive probability" variant (MIL-NCE) because (a) it is the
same functional form as the distillation terms (a CE against a distribution), (b) when two
positive columns are identical (a duplicated caption) its gradient never pushes one of them down
(``p_j <= 1/k = target_j``), and (c) it is what the reference run measured (+4 R@1 for dense).
Its minimum is ``log k`` for a row with ``k`` positives rather than 0; that constant has no
gradient. Rows with no positive at all (possible only for a hand-made, non-square ``pos``) are
left out of the mean.
"""

from __future__ import annotations

import hashlib
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "ids_to_tensor",
    "positive_mask",
    "score_matrix",
    "soft_cross_entropy",
    "multi_positive_cross_entropy",
    "info_nce",
    "distillation",
    "nce_rows",
    "kd_rows",
]


def _stable_hash(x) -> int:
    """A process-independent 63-bit hash (Python's ``hash`` of a str is salted per process)."""
    if isinstance(x, bytes):
        data = x
    else:
        data = str(x).encode("utf-8")
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little") >> 1


def ids_to_tensor(ids: Tensor | Sequence, device: torch.device | str | None = None) -> Tensor:
    """Turn a sequence of ids (ints, strings or bytes) into an ``int64`` tensor of shape ``(B,)``.

    Integer tensors are returned as they are (moved to ``device``); strings and bytes are mapped
    through a stable 63-bit hash, so equal ids map to equal values in every process (this is what
    makes masks agree across DDP workers). ``None`` entries never match anything, not even
    another ``None`` (they get distinct negative values).
    """
    if isinstance(ids, Tensor):
        if ids.dim() != 1:
            raise ValueError(f"ids must be 1-D, got shape {tuple(ids.shape)}")
        return ids.to(device=device, dtype=torch.long) if device is not None else ids.long()
    out = []
    for k, x in enumerate(ids):
        if x is None:
            out.append(-1 - k)
        elif isinstance(x, bool):
            raise TypeError("ids must be ints, strings or bytes, not bool")
        elif isinstance(x, int):
            out.append(int(x))
        else:
            out.append(_stable_hash(x))
    return torch.tensor(out, dtype=torch.long, device=device)


def positive_mask(
    image_ids: Tensor | Sequence,
    caption_ids: Tensor | Sequence | None = None,
) -> Tensor:
    """Boolean positive mask ``pos (B, B)`` of a batch of (image, caption) pairs.

    Row ``i`` is the image of sample ``i``, column ``j`` the caption of sample ``j``. They are
    relevant when **some sample of the batch pairs them** (DESIGN.md §3)::

        pos[i, j] = ∃ k : image_ids[k] == image_ids[i]  and  caption_ids[k] == caption_ids[j]

    This covers a shared image (``k = j``), a shared caption (``k = i``) and the chain of the
    two: in the batch (A, "x"), (B, "dog"), (A, "dog"), image A of sample 0 and caption "dog"
    of sample 1 are relevant through sample 2. The mask is then **not symmetric** (image B of
    sample 1 and caption "x" of sample 0 are not, while image A and caption "dog" are), so the
    text→image direction uses ``pos.T``.
    The diagonal is always True. Cost: ``O(B²)`` through a table of the distinct (image,
    caption) pairs.

    Args:
        image_ids: ``(B,)`` image identifiers (ints, strings or bytes; see :func:`ids_to_tensor`).
        caption_ids: ``(B,)`` caption identifiers, typically the caption text itself or a hash
            of it; ``None`` to use image ids only (``pos[i, j] = image_ids[i] == image_ids[j]``).

    Returns:
        ``torch.bool`` tensor of shape ``(B, B)``.

    Example::

        >>> positive_mask(["A", "B", "A"], ["x", "dog", "dog"]).int()
        tensor([[1, 1, 1],
                [0, 1, 1],
                [1, 1, 1]], dtype=torch.int32)
    """
    img = ids_to_tensor(image_ids)
    if caption_ids is None:
        pos = img[:, None] == img[None, :]
        pos.fill_diagonal_(True)
        return pos
    cap = ids_to_tensor(caption_ids, device=img.device)
    if cap.shape != img.shape:
        raise ValueError(
            f"image_ids and caption_ids must have the same length, got {img.numel()} and "
            f"{cap.numel()}"
        )
    _, img_group = torch.unique(img, return_inverse=True)
    _, cap_group = torch.unique(cap, return_inverse=True)
    paired = torch.zeros(
        int(img_group.max()) + 1 if img.numel() else 0,
        int(cap_group.max()) + 1 if cap.numel() else 0,
        dtype=torch.bool,
        device=img.device,
    )
    paired[img_group, cap_group] = True
    pos = paired[img_group[:, None], cap_group[None, :]]
    pos.fill_diagonal_(True)
    return pos


def score_matrix(a: Tensor, b: Tensor) -> Tensor:
    """``a @ b.T`` computed in float32 (or float64 if an input is float64), outside autocast.

    Sparse scores reach the thousands and would overflow fp16, so every sdray loss computes its
    scores through this function. Shapes: ``a (N, D)``, ``b (M, D)`` → ``(N, M)``.
    """
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(
            f"expected (N, D) and (M, D), got {tuple(a.shape)} and {tuple(b.shape)}"
        )
    dtype = torch.float64 if torch.float64 in (a.dtype, b.dtype) else torch.float32
    with torch.autocast(device_type=a.device.type, enabled=False):
        return a.to(dtype) @ b.to(dtype).T


def soft_cross_entropy(logits: Tensor, target: Tensor, row_weight: Tensor | None = None) -> Tensor:
    """Row-wise ``-Σ_j target_ij · log_softmax(logits)_ij``, averaged over rows.

    Args:
        logits: ``(N, M)`` student scores.
        target: ``(N, M)`` target distributions (each row sums to 1, or to 0 for a row that is
            to be ignored together with ``row_weight``).
        row_weight: optional ``(N,)`` 0/1 weights; the mean is taken over the rows with weight 1.
    """
    per_row = -(target * F.log_softmax(logits, dim=1)).sum(dim=1)
    if row_weight is None:
        return per_row.mean()
    row_weight = row_weight.to(per_row.dtype)
    return (per_row * row_weight).sum() / row_weight.sum().clamp_min(1.0)


def multi_positive_cross_entropy(logits: Tensor, pos: Tensor | None = None) -> Tensor:
    """Row-wise CE against the uniform distribution over each row's positives.

    ``pos=None`` means the identity (``logits`` must be square): the result then equals
    ``F.cross_entropy(logits, torch.arange(N))``.

    Shapes: ``logits (N, M)``, ``pos (N, M)`` bool → scalar.
    """
    n, m = logits.shape
    if pos is None:
        if n != m:
            raise ValueError("pos=None needs a square score matrix (one positive per row)")
        return F.cross_entropy(logits, torch.arange(n, device=logits.device))
    if pos.shape != logits.shape:
        raise ValueError(f"pos has shape {tuple(pos.shape)}, scores {tuple(logits.shape)}")
    pos = pos.to(device=logits.device, dtype=logits.dtype)
    count = pos.sum(dim=1, keepdim=True)
    target = pos / count.clamp_min(1.0)
    return soft_cross_entropy(logits, target, row_weight=(count.squeeze(1) > 0))


def nce_rows(
    s_i2t: Tensor, s_t2i: Tensor, pos_i2t: Tensor | None, pos_t2i: Tensor | None
) -> Tensor:
    """Symmetric InfoNCE over a rank's rows: ``½(CE_{pos_i2t}(s_i2t) + CE_{pos_t2i}(s_t2i))``.

    Shapes: ``s_i2t (B_i, N_t)`` (this rank's images × all texts), ``s_t2i (B_t, N_i)`` (this
    rank's texts × all images), masks of the same shapes (``None``: identity, square scores).
    """
    return 0.5 * (
        multi_positive_cross_entropy(s_i2t, pos_i2t) + multi_positive_cross_entropy(s_t2i, pos_t2i)
    )


def kd_rows(
    t_i2t: Tensor,
    t_t2i: Tensor,
    s_i2t: Tensor,
    s_t2i: Tensor,
    detach_teacher: bool = True,
    orientation: str = "correct",
) -> Tensor:
    """Symmetric KD over a rank's rows: ``½(KD(t_i2t→s_i2t) + KD(t_t2i→s_t2i))``.

    ``KD(t→s) = −mean_rows Σ_j softmax(t)_j log_softmax(s)_j``. With ``orientation="official"``
    the text→image teacher is the *i2t* teacher row of the same sample (holi-lab/mm-sparse-retrieval
    ``loss.py``: ``p_sinter_t2i = softmax(sinter, dim=1)``), which needs ``t_i2t`` and ``s_t2i``
    of one shape. Shapes as :func:`nce_rows`.
    """
    if orientation not in ("correct", "official"):
        raise ValueError(f"orientation must be 'correct' or 'official', got {orientation!r}")
    if detach_teacher:
        t_i2t, t_t2i = t_i2t.detach(), t_t2i.detach()
    p_i2t = F.softmax(t_i2t, dim=1)
    if orientation == "correct":
        p_t2i = F.softmax(t_t2i, dim=1)
    else:
        if t_i2t.shape != s_t2i.shape:
            raise ValueError("orientation='official' needs a square score matrix")
        p_t2i = p_i2t
    return 0.5 * (soft_cross_entropy(s_i2t, p_i2t) + soft_cross_entropy(s_t2i, p_t2i))


def info_nce(scores: Tensor, pos: Tensor | None = None) -> Tensor:
    """Symmetric InfoNCE: mean of the image→text (rows) and text→image (columns) CE.

    .. math::

        \\mathrm{InfoNCE}(s) = \\tfrac12\\big(\\mathrm{CE}_{pos}(s) + \\mathrm{CE}_{pos^T}(s^T)\\big)

    Shapes: ``scores (B_i, B_t)``, ``pos (B_i, B_t)`` bool or ``None`` (identity) → scalar.
    """
    return nce_rows(scores, scores.T, pos, None if pos is None else pos.T)


def distillation(
    teacher: Tensor,
    student: Tensor,
    detach_teacher: bool = True,
    orientation: str = "correct",
) -> Tensor:
    """Symmetric KD: ``½(KD_i2t + KD_t2i)`` with ``KD(t→s) = −Σ softmax(t)·log_softmax(s)``.

    * i2t: rows of ``teacher`` against rows of ``student`` (each image's distribution over texts).
    * t2i, ``orientation="correct"``: rows of ``teacher.T`` against rows of ``student.T``.
    * t2i, ``orientation="official"``: rows of the *un-transposed* ``teacher`` against rows of
      ``student.T`` — what holi-lab/mm-sparse-retrieval ``loss.py`` does (``p_sinter_t2i`` is
      ``softmax(sinter, dim=1)`` of the i2t matrix). Needs square matrices.

    Each direction is a mean over its rows. With ``detach_teacher`` the teacher is a constant.

    Shapes: ``teacher, student (B_i, B_t)`` → scalar.
    """
    if teacher.shape != student.shape:
        raise ValueError(
            f"teacher {tuple(teacher.shape)} and student {tuple(student.shape)} differ"
        )
    return kd_rows(teacher, teacher.T, student, student.T, detach_teacher, orientation)
