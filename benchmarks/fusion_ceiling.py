"""How far can *any* fusion of a trained model's two scores lift text→image R@1? A ceiling check.

Usage::

    python benchmarks/sweep.py --features FEAT --out runs.jsonl --seeds 0 1 2 --eval-split test --only joint-default
    python benchmarks/fusion_ceiling.py --features FEAT --runs runs.jsonl --only joint-default d2s-default

For every run of ``benchmarks/sweep.py --eval-split SPLIT`` named in ``--only`` (one per seed), it
loads the run's saved heads and scores the text→image queries of ``FEAT/SPLIT`` (and of
``FEAT/val``, to choose weights) with the dense ``cos/τ`` and the sparse dot product. Over a fine
grid of sparse weights ``w2`` (``W2_FINE``: 0 and 161 log-spaced values from 1e-4 to 1e4) it
reports the t2i R@1 (pessimistic ties, as :mod:`sdray.metrics`) of:

* **val-chosen for t2i R@1**: ``cos/τ + w2·sparse`` (and its per-query z-score variant) with the
  ``w2`` that maximises t2i R@1 on val (ties: the smaller ``w2``) — a lever aimed at the target
  itself, on a finer grid than the sweep's five weights;
* **test-chosen** (diagnostic, never a result): the best single ``w2`` on the eval split itself —
  the most a fixed weight can give;
* **either top-1**: the query's dense top-1 or its sparse top-1 is relevant;
* **per-query oracle**: some ``w2`` of the grid puts a relevant image first for that query. Every
  per-query linear fusion with non-negative weights (calibrated, z-score, min–max) ranks like
  ``cos/τ + w2·sparse`` for some ``w2 ∈ [0, ∞)`` of that query, so this bounds them all (up to
  the grid); rank fusions such as RRF are outside the bound.

Prints a markdown table of mean ± std over the runs' seeds (percent).
"""

from __future__ import annotations

import sys

import numpy as np
import torch

from hybrid_levers import heads_of, load_saved_runs, saved_runs_parser  # benchmarks/ is the script's folder
from sdray import config as config_lib
from sdray.evaluation import dedupe, encode, head_tau, sparse_scores
from sdray.fusion import _zscore
from sdray.metrics import relevance_from_pairs
from sweep import mean_std

W2_FINE = (0.0, *np.logspace(-4, 4, 161).tolist())


def t2i_queries(heads, data: dict) -> dict[str, torch.Tensor]:
    """The split's text→image queries, only captions with a relevant image kept (``keep``, a
    bool mask over the unique captions): ``dense`` (``cos/τ``), ``sparse`` and ``relevant``, each
    ``(n_queries, n_images)``, and the kept captions' own ``text_dense`` ``(n_queries, D)``;
    ``text_sparse`` is the CSR ``(n_unique_captions, V)`` of every unique caption (select rows
    with ``keep``)."""
    image_rows, text_rows, pairs = dedupe(list(data["image_id"]), [str(c) for c in data["caption"]])
    txt_dense, txt_sparse = encode(heads, np.asarray(data["text_features"], np.float32)[text_rows], "text")
    img_dense, img_sparse = encode(heads, np.asarray(data["image_features"], np.float32)[image_rows], "image")
    relevant = torch.as_tensor(relevance_from_pairs(pairs, len(image_rows), len(text_rows))).T
    dense = (txt_dense @ img_dense.T).double() / head_tau(heads)
    sparse = sparse_scores(img_sparse, txt_sparse).double().T
    keep = relevant.any(1)
    return {"dense": dense[keep], "sparse": sparse[keep], "relevant": relevant[keep], "keep": keep,
            "text_dense": txt_dense[keep], "text_sparse": txt_sparse}


def t2i_scores(heads, data: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(cos/τ, sparse, relevant)``, each ``(n_texts, n_images)``: queries are the split's unique
    captions, items its unique images; only captions with a relevant image are kept."""
    q = t2i_queries(heads, data)
    return q["dense"], q["sparse"], q["relevant"]


def top1_hits(scores: torch.Tensor, relevant: torch.Tensor) -> torch.Tensor:
    """``(n_q,)`` bool: a relevant item is ranked first, a tie with a non-relevant item counting
    as a miss (the pessimistic rule of :mod:`sdray.metrics`)."""
    best_rel = torch.where(relevant, scores, -torch.inf).amax(1)
    best_other = torch.where(relevant, -torch.inf, scores).amax(1)
    return best_rel > best_other


def hits_per_weight(dense: torch.Tensor, sparse: torch.Tensor, relevant: torch.Tensor,
                    zscore: bool = False) -> torch.Tensor:
    """``(len(W2_FINE), n_q)`` bool top-1 hits of ``dense + w2·sparse`` (z-scored per query if
    ``zscore``) for every weight of :data:`W2_FINE`."""
    if zscore:
        dense, sparse = _zscore(dense), _zscore(sparse)
    return torch.stack([top1_hits(dense + w2 * sparse, relevant) for w2 in W2_FINE])


def measure(runs_path: str, row: dict, val: dict, test: dict) -> dict[str, float]:
    """Every figure of one run (fractions of the eval split's t2i queries)."""
    heads = heads_of(runs_path, row, config_lib.with_overrides(config_lib.SdrayConfig(), row.get("overrides", {})))
    vd, vs, vr = t2i_scores(heads, val)
    td, ts, tr = t2i_scores(heads, test)
    out = {"dense": top1_hits(td, tr).float().mean().item(),
           "sparse": top1_hits(ts, tr).float().mean().item(),
           "either": (top1_hits(td, tr) | top1_hits(ts, tr)).float().mean().item(),
           "hybrid_sweep": top1_hits(td + row["test"]["val_w2"] * ts, tr).float().mean().item()}
    for label, z in (("cal", False), ("z", True)):
        val_r1 = hits_per_weight(vd, vs, vr, z).float().mean(1)
        test_hits = hits_per_weight(td, ts, tr, z)
        test_r1 = test_hits.float().mean(1)
        pick = int(torch.nonzero(val_r1 == val_r1.max())[0])  # the smallest weight among the best
        out[f"{label}_val"] = test_r1[pick].item()
        out[f"{label}_val_w2"] = W2_FINE[pick]
        out[f"{label}_test"] = test_r1.max().item()
        if not z:
            out["oracle"] = test_hits.any(0).float().mean().item()
    return out


def table(results: list[tuple[str, int, dict]]) -> str:
    by: dict[str, list[dict]] = {}
    seeds: dict[str, list[int]] = {}
    for name, seed, r in results:
        by.setdefault(name, []).append(r)
        seeds.setdefault(name, []).append(seed)
    cols = (("dense", "dense"), ("hybrid_sweep", "hybrid (sweep's val w2)"),
            ("cal_val", "cos/τ + w2·sparse, w2 val-chosen for t2i R@1"), ("z_val", "z-score, val-chosen"),
            ("cal_test", "best fixed w2 on test (diag.)"), ("z_test", "z-score best on test (diag.)"),
            ("sparse", "sparse"), ("either", "dense or sparse top-1"), ("oracle", "per-query oracle w2"))
    lines = ["t2i R@1 on the eval split (percent, mean ± std over seeds):", "",
             "| setting | seeds | " + " | ".join(c for _, c in cols) + " | val-chosen w2 (cal / z) |",
             "|---|---|" + "---|" * (len(cols) + 1)]
    for name, rs in by.items():
        w2s = " ".join(f"{r['cal_val_w2']:.2g}/{r['z_val_w2']:.2g}" for r in rs)
        lines.append(f"| {name} | {','.join(map(str, seeds[name]))} | "
                     + " | ".join(mean_std([r[k] for r in rs]) for k, _ in cols) + f" | {w2s} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = saved_runs_parser(__doc__.splitlines()[0])
    args = p.parse_args(argv)
    loaded = load_saved_runs(args, "val", "eval")
    if loaded is None:
        return 2
    rows, val, test = loaded
    results = [(row["name"], row["seed"], measure(args.runs, row, val, test)) for row in rows]
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
