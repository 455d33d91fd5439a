"""Evaluate a retriever on a split's features: dense, sparse and hybrid recall, sparsity, FLOPs.

Pure PyTorch/NumPy (no Ray). The result has the shape of DESIGN.md §4 (``sdray eval --json``)::

    {"t2i": {"dense": {"R@1", "R@5", "R@10", "MRR@10"}, "sparse": {...}, "hybrid": {...}},
     "i2t": {...}, "sparsity": {"text_nnz", "image_nnz", "flops"}, "n_texts", "n_images",
     "fusion": {"method", "w1", "w2", "tau"}}

Images are deduplicated by ``image_id`` and captions by exact text (DESIGN.md §3); a caption is
relevant to an image when some sample pairs them. Sparse vectors are kept as CSR so a split of a
few thousand items never holds dense ``n × |V|`` matrices.
"""

from __future__ import annotations

from typing import Any, Sequence

import warnings

import numpy as np
import torch

from sdray.devices import to_host, to_module_device
from sdray.fusion import FusionConfig, fuse
from sdray.heads import RetrieverHeads, prune_topk
from sdray.metrics import flops, mean_nnz, ranking_metrics, relevance_from_pairs, retrieval_metrics

warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
warnings.filterwarnings("ignore", message="Sparse invariant checks are implicitly disabled")

REPRESENTATIONS = ("dense", "sparse", "hybrid")
DIRECTIONS = ("t2i", "i2t")


def dedupe(image_ids: Sequence, captions: Sequence[str]) -> tuple[np.ndarray, np.ndarray, list[tuple[int, int]]]:
    """First-occurrence rows of unique images and captions, and ``(image_idx, text_idx)`` pairs.

    Returns ``(image_rows, text_rows, pairs)``: ``image_rows[i]`` is the sample row holding image
    ``i``; ``text_rows[j]`` the row holding caption ``j``; each sample contributes one pair.
    """
    img_index: dict[Any, int] = {}
    txt_index: dict[str, int] = {}
    image_rows, text_rows, pairs = [], [], []
    for row, (iid, cap) in enumerate(zip(image_ids, captions)):
        iid = iid.item() if isinstance(iid, np.generic) else iid
        if iid not in img_index:
            img_index[iid] = len(image_rows)
            image_rows.append(row)
        if cap not in txt_index:
            txt_index[cap] = len(text_rows)
            text_rows.append(row)
        pairs.append((img_index[iid], txt_index[cap]))
    return np.asarray(image_rows, np.int64), np.asarray(text_rows, np.int64), pairs


@torch.no_grad()
def encode(heads: RetrieverHeads, features: np.ndarray | torch.Tensor, modality: str,
           chunk: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dense (n, D), sparse CSR (n, V))`` for pre-projection features of one modality.

    The heads are used in eval mode (top-k pruning from the config applies). Each chunk of
    features is moved to the heads' device (CUDA when ``Trainer`` put them there) and its outputs
    come back to the host, where the metrics are computed."""
    was_training = heads.training
    heads.eval()
    dense_parts, sparse_parts = [], []
    feats = torch.as_tensor(np.asarray(features, dtype=np.float32))
    enc = heads.encode_text if modality == "text" else heads.encode_image
    for a in range(0, feats.shape[0], chunk):
        out = enc(to_module_device(feats[a : a + chunk], heads))
        dense_parts.append(to_host(out.dense.float()))
        sparse_parts.append(to_host(out.sparse.float()).to_sparse_csr())
    heads.train(was_training)
    if not dense_parts:
        v = heads.sparse.vocab_size
        return torch.zeros(0, heads.text_proj.linear.out_features), torch.zeros(0, v).to_sparse_csr()
    return torch.cat(dense_parts), _cat_csr(sparse_parts)


def _cat_csr(parts: list[torch.Tensor]) -> torch.Tensor:
    if len(parts) == 1:
        return parts[0]
    crow, col, val, offset = [torch.zeros(1, dtype=torch.int64)], [], [], 0
    for p in parts:
        c = p.crow_indices().to(torch.int64)
        crow.append(c[1:] + offset)
        offset += int(c[-1])
        col.append(p.col_indices().to(torch.int64))
        val.append(p.values())
    n = sum(p.shape[0] for p in parts)
    return torch.sparse_csr_tensor(torch.cat(crow), torch.cat(col), torch.cat(val), (n, parts[0].shape[1]))


def sparse_scores(img_sparse: torch.Tensor, txt_sparse: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """``(n_images, n_texts)`` dot products of two CSR sparse matrices (chunks of texts)."""
    out = []
    n_t = txt_sparse.shape[0]
    n_i, v = img_sparse.shape
    nnz = img_sparse.values().numel() + txt_sparse.values().numel()
    if nnz > 0.02 * (n_i + n_t) * v:
        # still dense vectors (early training): BLAS on dense chunks beats CSR products
        for a in range(0, n_t, chunk):
            txt = _csr_rows(txt_sparse, a, min(a + chunk, n_t)).to_dense()
            out.append(torch.cat([_csr_rows(img_sparse, b, min(b + chunk, n_i)).to_dense() @ txt.T
                                  for b in range(0, n_i, chunk)]) if n_i else torch.zeros(0, txt.shape[0]))
        return torch.cat(out, 1) if out else torch.zeros(n_i, 0)
    for a in range(0, n_t, chunk):
        b = min(a + chunk, n_t)
        txt = _csr_rows(txt_sparse, a, b).to_dense()
        out.append(torch.sparse.mm(img_sparse, txt.T.contiguous()))
    return torch.cat(out, 1) if out else torch.zeros(img_sparse.shape[0], 0)


def _csr_rows(m: torch.Tensor, a: int, b: int) -> torch.Tensor:
    crow = m.crow_indices()
    lo, hi = int(crow[a]), int(crow[b])
    return torch.sparse_csr_tensor(crow[a : b + 1] - lo, m.col_indices()[lo:hi], m.values()[lo:hi],
                                   (b - a, m.shape[1]))


def fusion_params(cfg, tau: float) -> dict[str, Any]:
    """Fusion method and parameters of a config (``cfg.fusion``; weights default to the loss's)."""
    w1, w2 = cfg.fusion_weights()
    params: dict[str, Any] = {"method": cfg.fusion.method, "w1": float(w1), "w2": float(w2)}
    if cfg.fusion.method == "calibrated":
        params["tau"] = float(tau)
        normalize = getattr(cfg.fusion, "normalize", None)
        if normalize:
            params["normalize"] = normalize
        for key in ("confidence_power", "cosine_slope"):
            if getattr(cfg.fusion, key, 0.0):
                params[key] = float(getattr(cfg.fusion, key))
        if params.get("cosine_slope"):
            params["cosine_pivot"] = float(cfg.fusion.cosine_pivot)
    if cfg.fusion.method == "rrf":
        params["k_rrf"] = float(cfg.fusion.rrf_k)
    return params


def fused_metrics(dense: torch.Tensor, sparse: torch.Tensor, relevant: Any,
                  fusion: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Hybrid metrics of both directions from ``dense``/``sparse (n_images, n_texts)`` scores.

    Each direction fuses with the *queries as rows* (text→image on the transposed matrices), so
    per-query fusions (z-scores, RRF ranks) normalise over one query's candidates — what an
    index search does — and never over the other side's.
    """
    params = dict(fusion)
    method = params.pop("method")
    i2t = fuse(dense, sparse, method, **params)
    per_query = FusionConfig(method=method, **params).per_query
    t2i = fuse(dense.T, sparse.T, method, **params) if per_query else i2t.T  # per-document: same scores
    return {"t2i": ranking_metrics(t2i, relevant.T), "i2t": ranking_metrics(i2t, relevant)}


def evaluate_encoded(img_dense: torch.Tensor, img_sparse: torch.Tensor, txt_dense: torch.Tensor,
                     txt_sparse: torch.Tensor, relevant: np.ndarray, fusion: dict[str, Any],
                     extra_fusions: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """Metrics of encoded, deduplicated images and texts; ``relevant (n_images, n_texts)``.

    ``extra_fusions`` (name → fusion params) adds ``"hybrid_<name>"`` entries, for comparing
    fusion methods on one encoding.
    """
    dense = (img_dense @ txt_dense.T).double()
    sparse = sparse_scores(img_sparse, txt_sparse).double()
    result: dict[str, Any] = {"t2i": {}, "i2t": {}}
    for rep, s in (("dense", dense), ("sparse", sparse)):
        m = retrieval_metrics(s, relevant)
        for d in DIRECTIONS:
            result[d][rep] = m[d]
    fusions = {"hybrid": fusion, **{f"hybrid_{name}": fp for name, fp in (extra_fusions or {}).items()}}
    for rep, fp in fusions.items():
        for d, m in fused_metrics(dense, sparse, relevant, fp).items():
            result[d][rep] = m
    result["sparsity"] = {"text_nnz": mean_nnz(txt_sparse), "image_nnz": mean_nnz(img_sparse),
                          "flops": flops(txt_sparse, img_sparse)}
    result["n_texts"] = int(txt_dense.shape[0])
    result["n_images"] = int(img_dense.shape[0])
    result["fusion"] = dict(fusion)
    return result


def head_tau(heads: RetrieverHeads) -> float:
    """The heads' temperature τ as a Python float (read back from the heads' device)."""
    return float(to_host(heads.tau.detach()))


def evaluate_features(heads: RetrieverHeads, data: dict[str, Any], cfg,
                      extra_fusions: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """Evaluate ``heads`` on a split's feature columns.

    Args:
        heads: trained heads (used in eval mode).
        data: columns ``text_features (n, Ht)``, ``image_features (n, Hi)``, ``image_id (n,)``,
            ``caption (n,)`` — one row per sample (image–caption pair).
        cfg: the model's :class:`~sdray.config.SdrayConfig` (fusion settings).
    Returns: the DESIGN.md §4 eval object (plus ``fusion`` and ``tau``).
    """
    image_rows, text_rows, pairs = dedupe(list(data["image_id"]), [str(c) for c in data["caption"]])
    tf = np.asarray(data["text_features"], dtype=np.float32)[text_rows]
    imf = np.asarray(data["image_features"], dtype=np.float32)[image_rows]
    txt_dense, txt_sparse = encode(heads, tf, "text")
    img_dense, img_sparse = encode(heads, imf, "image")
    relevant = relevance_from_pairs(pairs, len(image_rows), len(text_rows))
    tau = head_tau(heads)
    result = evaluate_encoded(img_dense, img_sparse, txt_dense, txt_sparse, relevant,
                              fusion_params(cfg, tau), extra_fusions)
    result["tau"] = tau
    return result


def evaluate_and_calibrate(heads: RetrieverHeads, data: dict[str, Any], cfg) -> tuple[dict[str, Any], Any]:
    """:func:`evaluate_features`, choosing the sparse fusion weight on ``data`` (a val split).

    With ``cfg.fusion.calibrate`` (and the ``calibrated`` method), the hybrid is scored with
    ``w1 = 1`` and each ``w2`` of ``cfg.fusion.w2_grid`` — one encoding, several fusions — and
    the ``w2`` with the best hybrid RSUM (ties: the smaller) is kept. Tuning a fusion weight on
    held-out data is the usual way to set it; DESIGN.md §1 asks for the fusion that measures best.

    Returns ``(result, cfg)``: ``result["hybrid"]`` and ``result["fusion"]`` are the chosen
    fusion's, ``result["fusion_grid"]`` maps each ``w2`` to its hybrid RSUM, and ``cfg`` carries
    ``fusion.w1 = 1, fusion.w2 = <chosen>`` (the input ``cfg`` when nothing is calibrated).
    """
    f = cfg.fusion
    if not (f.calibrate and f.method == "calibrated" and cfg.loss.method != "dense" and f.w2_grid):
        return evaluate_features(heads, data, cfg), cfg
    tau = head_tau(heads)
    grid = {f"w2={w2:g}": {"method": "calibrated", "w1": 1.0, "w2": float(w2), "tau": tau,
                           **({"normalize": f.normalize} if f.normalize else {}),
                           **{k: v for k, v in fusion_params(cfg, tau).items()
                              if k in ("confidence_power", "cosine_slope", "cosine_pivot")}}
            for w2 in f.w2_grid}
    result = evaluate_features(heads, data, cfg, grid)
    scores = {name: rsum(result, f"hybrid_{name}") for name in grid}
    best = max(sorted(grid, key=lambda n: grid[n]["w2"]), key=lambda n: scores[n])
    for d in DIRECTIONS:
        result[d]["hybrid"] = result[d][f"hybrid_{best}"]
        for name in grid:
            del result[d][f"hybrid_{name}"]
    result["fusion"] = grid[best]
    result["fusion_grid"] = {grid[n]["w2"]: scores[n] for n in grid}
    chosen = cfg.model_copy(deep=True)
    chosen.fusion.w1, chosen.fusion.w2 = 1.0, grid[best]["w2"]
    return result, chosen


def rsum(result: dict[str, Any], rep: str) -> float:
    """Sum of R@1, R@5, R@10 in both directions for ``rep`` (a fraction sum in [0, 6])."""
    return float(sum(result[d][rep][f"R@{k}"] for d in DIRECTIONS for k in (1, 5, 10)))


def format_table(result: dict[str, Any]) -> str:
    """A readable table of an eval result (percentages)."""
    cols = ("R@1", "R@5", "R@10", "MRR@10")
    reps = [r for r in REPRESENTATIONS if r in result["t2i"]]
    reps += sorted(r for r in result["t2i"] if r.startswith("hybrid_"))
    lines = [f"{'':<8}{'':<16}" + "".join(f"{c:>8}" for c in cols) + f"{'RSUM':>9}"]
    for d in DIRECTIONS:
        for rep in reps:
            m = result[d][rep]
            lines.append(f"{d:<8}{rep:<16}" + "".join(f"{100 * m[c]:8.2f}" for c in cols)
                         + f"{100 * sum(result[x][rep][f'R@{k}'] for x in DIRECTIONS for k in (1, 5, 10)):9.1f}"
                         * (d == "t2i") )
    sp = result["sparsity"]
    lines.append(f"sparsity: text nnz {sp['text_nnz']:.1f}, image nnz {sp['image_nnz']:.1f}, "
                 f"FLOPs {sp['flops']:.1f}   ({result['n_texts']} texts, {result['n_images']} images)")
    if "fusion" in result:
        f = result["fusion"]
        lines.append("hybrid: " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                            for k, v in f.items()))
    return "\n".join(lines)


def prune(sparse: torch.Tensor, k: int | None) -> torch.Tensor:
    """Top-k pruning (re-exported for callers that post-process dense sparse vectors)."""
    return prune_topk(sparse, k)
