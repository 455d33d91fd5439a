"""The trainable part of a retriever: per-modality dense projections and one shared sparse head.

Song et al. (CIKM 2025, §3) keep the vision-language backbone frozen and train only its final
projection layers plus a vocabulary-sized sparse head applied to the normalised dense vectors::

    d = normalize(proj(h))                                   # (B, D) per modality
    z = log1p(relu(W_v · LayerNorm(W_h · d)))                # (B, |V|), shared by both modalities

``W_v`` (``|V| x hidden``) starts as a copy of the text tower's word embeddings, so every sparse
dimension is a readable word piece.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class Encoded:
    """Encodings of a batch: ``dense`` (B, D) L2-normalised, ``sparse`` (B, V) non-negative."""

    dense: torch.Tensor
    sparse: torch.Tensor


class DenseProjection(nn.Module):
    """The backbone's final layer for one modality: ``normalize(W h + b)``, (B, H) -> (B, D)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.linear = linear

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.linear(features), dim=-1)


class SparseHead(nn.Module):
    """Vocabulary-sized sparse encoder shared by images and captions.

    ``Linear(dense_dim -> hidden) -> LayerNorm -> Linear(hidden -> |V|, no bias) -> log1p(relu)``.

    Args:
        dense_dim: size D of the normalised dense vectors it reads.
        word_embeddings: (|V|, E) the text tower's word embeddings: |V| is the vocabulary, and
            with ``init_from_embeddings`` they are the initial vocabulary projector (a copy).
        hidden: hidden size; default E. It must be E when the projector is copied.
        init_from_embeddings: copy the word embeddings into the projector (DESIGN.md §1);
            False: a fresh ``nn.Linear`` initialisation (an ablation).
    Shapes: (B, D) -> (B, |V|).
    """

    def __init__(self, dense_dim: int, word_embeddings: torch.Tensor, hidden: int | None = None,
                 init_from_embeddings: bool = True):
        super().__init__()
        vocab_size, emb_dim = word_embeddings.shape
        hidden = emb_dim if hidden is None else int(hidden)
        if init_from_embeddings and hidden != emb_dim:
            raise ValueError(f"heads.sparse_hidden {hidden} must equal the word-embedding size "
                             f"{emb_dim} when heads.init_vocab_from_embeddings is true")
        self.transform = nn.Linear(dense_dim, hidden)
        self.norm = nn.LayerNorm(hidden)
        self.vocab_projector = nn.Linear(hidden, vocab_size, bias=False)
        if init_from_embeddings:
            with torch.no_grad():
                self.vocab_projector.weight.copy_(word_embeddings)

    @property
    def vocab_size(self) -> int:
        return self.vocab_projector.out_features

    def forward(self, dense: torch.Tensor) -> torch.Tensor:
        return torch.log1p(torch.relu(self.vocab_projector(self.norm(self.transform(dense)))))


def prune_topk(sparse: torch.Tensor, k: int | None) -> torch.Tensor:
    """Keep the ``k`` largest weights per row of ``sparse`` (B, V), zeroing the rest."""
    if k is None or k >= sparse.shape[-1]:
        return sparse
    values, idx = sparse.topk(k, dim=-1)
    return torch.zeros_like(sparse).scatter_(-1, idx, values)


class RetrieverHeads(nn.Module):
    """Dense projections for both modalities, the shared :class:`SparseHead` and temperature τ.

    τ is learnable (Song et al. follow BLIP: init 0.07, clamped to [tau_min, tau_max] after each
    optimiser step by :meth:`clamp_tau_`).
    """

    def __init__(
        self,
        text_proj: nn.Linear,
        vision_proj: nn.Linear,
        word_embeddings: torch.Tensor,
        tau_init: float = 0.07,
        tau_range: tuple[float, float] = (0.001, 0.5),
        topk: tuple[int | None, int | None] = (None, None),
        sparse_hidden: int | None = None,
        init_vocab_from_embeddings: bool = True,
    ):
        super().__init__()
        if text_proj.out_features != vision_proj.out_features:
            raise ValueError("text and vision projections must share an output size")
        self.text_proj = DenseProjection(text_proj)
        self.vision_proj = DenseProjection(vision_proj)
        self.sparse = SparseHead(text_proj.out_features, word_embeddings, sparse_hidden,
                                 init_vocab_from_embeddings)
        self.tau = nn.Parameter(torch.tensor(float(tau_init)))
        self.tau_range = tau_range
        self.topk_text, self.topk_image = topk

    @torch.no_grad()
    def clamp_tau_(self) -> None:
        self.tau.clamp_(*self.tau_range)

    @contextmanager
    def judged(self, vectors: str = "uncapped") -> Iterator["RetrieverHeads"]:
        """The heads as training's validation judges them (``selection.vectors``): ``"uncapped"``
        (:meth:`uncapped`) or ``"served"`` (the caps stay, as eval, index and serve apply them)."""
        if vectors == "served":
            yield self
        elif vectors == "uncapped":
            with self.uncapped():
                yield self
        else:
            raise ValueError(f"vectors must be 'uncapped' or 'served', got {vectors!r}")

    @contextmanager
    def uncapped(self) -> Iterator["RetrieverHeads"]:
        """Encode without the top-k caps while inside: training's validation judges the model's
        own sparsity, which a cap at the budget would hide (every epoch would look within it)."""
        caps = self.topk_text, self.topk_image
        self.topk_text = self.topk_image = None
        try:
            yield self
        finally:
            self.topk_text, self.topk_image = caps

    def encode_text(self, features: torch.Tensor) -> Encoded:
        """(B, text_dim) pre-projection caption features -> :class:`Encoded`."""
        dense = self.text_proj(features)
        sparse = self.sparse(dense)
        return Encoded(dense, sparse if self.training else prune_topk(sparse, self.topk_text))

    def encode_image(self, features: torch.Tensor) -> Encoded:
        """(B, image_dim) pre-projection image features -> :class:`Encoded`."""
        dense = self.vision_proj(features)
        sparse = self.sparse(dense)
        return Encoded(dense, sparse if self.training else prune_topk(sparse, self.topk_image))


def sparse_to_csr(sparse: torch.Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(B, V) non-negative matrix -> CSR ``(indptr int64, indices int32, values float32)``.

    Term ids are increasing within each row (what Seismic and scipy expect).
    """
    dense = sparse.detach().cpu().numpy() if isinstance(sparse, torch.Tensor) else np.asarray(sparse)
    rows, cols = np.nonzero(dense)
    indptr = np.zeros(dense.shape[0] + 1, dtype=np.int64)
    np.cumsum(np.bincount(rows, minlength=dense.shape[0]), out=indptr[1:])
    return indptr, cols.astype(np.int32), dense[rows, cols].astype(np.float32)


def top_terms(
    weights: torch.Tensor | np.ndarray, vocabulary: list[str], k: int = 10
) -> list[tuple[int, str, float]]:
    """The ``k`` heaviest terms of one sparse vector (V,) as ``(term id, word piece, weight)``."""
    w = weights.detach().cpu().numpy() if isinstance(weights, torch.Tensor) else np.asarray(weights)
    nz = np.flatnonzero(w)
    order = nz[np.argsort(-w[nz], kind="stable")][:k]
    return [(int(i), vocabulary[i], float(w[i])) for i in order]
