"""Query-dependent fusion weight vs the fixed one, on saved sweep runs (no retraining).

Usage::

    python benchmarks/sweep.py --features FEAT --out runs.jsonl --seeds 0 1 2 --eval-split test --only joint-default
    python benchmarks/adaptive_fusion.py --features FEAT --runs runs.jsonl --only joint-default

For every run of ``benchmarks/sweep.py --eval-split SPLIT`` named in ``--only`` (one per seed),
it loads the run's saved heads, encodes ``FEAT/val`` and ``FEAT/SPLIT`` (unique images and
captions, as :func:`sdray.evaluation.evaluate_features`), and scores both directions, queries
as rows, with :class:`sdray.fusion.FusionConfig` over a grid: sparse weight ``w2`` (``--w2``),
confidence power ``p`` (``--powers``; 0 is the fixed-weight fusion, ``p > 0`` the per-query
weight ``w2·(gap_sparse/gap_dense)^p``), raw (``cos/τ``) or z-scored scores. Every choice is made
on **val** and reported on the eval split:

* ``fixed``: ``p = 0``, the ``w2`` with the best val RSUM (the sweep's fusion, on a finer grid);
* ``adaptive``: the ``(p, w2)`` with the best val RSUM; ``p`` may come out 0;
* the same two chosen for val **t2i R@1** (``fixed@t2i``, ``adaptive@t2i``) — the target's metric;
* each of them with z-scored scores (``z-`` prefix).

Ties on val go to the smaller ``p``, then the smaller ``w2``. Prints markdown tables of mean ±
std over seeds (percent): RSUM and t2i R@1 on the eval split, with the dense model's figures.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np
import torch

from hybrid_levers import heads_of, load_runs  # benchmarks/ is the script's folder
from sdray import config as config_lib
from sdray.evaluation import dedupe, encode, head_tau, sparse_scores
from sdray.fusion import FusionConfig
from sdray.metrics import ranking_metrics, relevance_from_pairs
from sweep import mean_std

W2 = tuple(np.logspace(-2, 2, 17).round(4).tolist())
POWERS = (0.0, 0.25, 0.5, 1.0, 2.0)


def split_scores(heads, data: dict) -> dict[str, tuple[torch.Tensor, torch.Tensor, np.ndarray]]:
    """Per direction, queries as rows: ``(cos, sparse, relevant)``, each ``(n_queries, n_items)``."""
    image_rows, text_rows, pairs = dedupe(list(data["image_id"]), [str(c) for c in data["caption"]])
    txt_dense, txt_sparse = encode(heads, np.asarray(data["text_features"], np.float32)[text_rows], "text")
    img_dense, img_sparse = encode(heads, np.asarray(data["image_features"], np.float32)[image_rows], "image")
    relevant = relevance_from_pairs(pairs, len(image_rows), len(text_rows))  # (n_images, n_texts)
    dense = (img_dense @ txt_dense.T).double()
    sparse = sparse_scores(img_sparse, txt_sparse).double()
    rel = np.asarray(relevant.todense() if hasattr(relevant, "todense") else relevant, dtype=bool)
    out = {"i2t": (dense, sparse, rel), "t2i": (dense.T.contiguous(), sparse.T.contiguous(), rel.T.copy())}
    return {d: (c[r.any(1)], s[r.any(1)], r[r.any(1)]) for d, (c, s, r) in out.items()}


def direction_figures(scores: torch.Tensor, relevant: np.ndarray) -> tuple[float, float]:
    """``(R@1 + R@5 + R@10, R@1)`` of one direction (fractions)."""
    m = ranking_metrics(scores, relevant)
    return m["R@1"] + m["R@5"] + m["R@10"], m["R@1"]


def grid_figures(split: dict, tau: float, w2s, powers) -> dict[tuple, dict[str, float]]:
    """``(normalize, p, w2)`` → ``{"rsum", "t2i_r1"}`` over both directions of one split."""
    out = {}
    for normalize in (None, "zscore"):
        for p in powers:
            for w2 in w2s:
                f = FusionConfig("calibrated", 1.0, w2, tau, normalize, confidence_power=p)
                figs = {d: direction_figures(f(c, s), r) for d, (c, s, r) in split.items()}
                out[(normalize, p, w2)] = {"rsum": figs["t2i"][0] + figs["i2t"][0], "t2i_r1": figs["t2i"][1]}
    return out


def choose(val: dict, normalize, metric: str, adaptive: bool) -> tuple:
    keys = sorted((k for k in val if k[0] == normalize and (adaptive or k[1] == 0.0)), key=lambda k: (k[1], k[2]))
    return max(keys, key=lambda k: val[k][metric])  # first max: the smaller p, then w2


def measure(runs_path: str, row: dict, val_data: dict, test_data: dict, w2s, powers) -> dict:
    heads = heads_of(runs_path, row, config_lib.with_overrides(config_lib.SdrayConfig(), row.get("overrides", {})))
    tau = head_tau(heads)
    val_split, test_split = split_scores(heads, val_data), split_scores(heads, test_data)
    val, test = grid_figures(val_split, tau, w2s, powers), grid_figures(test_split, tau, w2s, powers)
    dense = {d: direction_figures(c, r) for d, (c, _, r) in test_split.items()}
    out = {"name": row["name"], "seed": row["seed"], "tau": tau,
           "dense": {"rsum": dense["t2i"][0] + dense["i2t"][0], "t2i_r1": dense["t2i"][1]}}
    for prefix, normalize in (("", None), ("z-", "zscore")):
        for label, metric, adaptive in (("fixed", "rsum", False), ("adaptive", "rsum", True),
                                        ("fixed@t2i", "t2i_r1", False), ("adaptive@t2i", "t2i_r1", True)):
            k = choose(val, normalize, metric, adaptive)
            out[prefix + label] = {**test[k], "p": k[1], "w2": k[2]}
        best = max((k for k in test if k[0] == normalize), key=lambda k: test[k]["t2i_r1"])
        out[prefix + "best-on-test (diag.)"] = {**test[best], "p": best[1], "w2": best[2]}
    return out


LABELS = ("fixed", "adaptive", "fixed@t2i", "adaptive@t2i", "best-on-test (diag.)")


def table(results: list[dict]) -> str:
    by: dict[str, list[dict]] = {}
    for r in results:
        by.setdefault(r["name"], []).append(r)
    lines = ["Eval split, mean ± std over seeds (percent); every fusion chosen on val except the "
             "diagnostic; p = confidence power (0: fixed weight):", "",
             "| setting | seeds | fusion | RSUM | t2i R@1 | t2i R@1 − dense | chosen (p, w2) per seed |",
             "|---|---|---|---|---|---|---|"]
    for name, rs in by.items():
        seeds = ",".join(str(r["seed"]) for r in rs)
        lines.append(f"| {name} | {seeds} | dense | {mean_std([r['dense']['rsum'] for r in rs])} | "
                     f"{mean_std([r['dense']['t2i_r1'] for r in rs])} | | |")
        for prefix in ("", "z-"):
            for label in LABELS:
                key = prefix + label
                delta = [r[key]["t2i_r1"] - r["dense"]["t2i_r1"] for r in rs]
                chosen = " ".join(f"({r[key]['p']:g}, {r[key]['w2']:g})" for r in rs)
                lines.append(f"| {name} | {seeds} | {key} | {mean_std([r[key]['rsum'] for r in rs])} | "
                             f"{mean_std([r[key]['t2i_r1'] for r in rs])} | {mean_std(delta)} | {chosen} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--features", required=True, help="featurize output with val/ and the eval split")
    p.add_argument("--runs", required=True, help="benchmarks/sweep.py --out file (rows with --eval-split)")
    p.add_argument("--only", nargs="+", required=True, help="setting names")
    p.add_argument("--split", default="test")
    p.add_argument("--w2", type=float, nargs="+", default=list(W2))
    p.add_argument("--powers", type=float, nargs="+", default=list(POWERS))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", action="store_true", help="also print every run's figures as JSON lines")
    args = p.parse_args(argv)
    from pipelines.evaluate import read_feature_columns

    torch.set_num_threads(args.threads)
    val = read_feature_columns(os.path.join(args.features, "val"))
    test = read_feature_columns(os.path.join(args.features, args.split))
    rows = load_runs(args.runs, args.only)
    if not rows:
        print(f"no runs of {args.only} with an eval split in {args.runs}", file=sys.stderr)
        return 2
    results = []
    for row in rows:
        results.append(measure(args.runs, row, val, test, args.w2, args.powers))
        print(f"{row['name']} seed {row['seed']} done", file=sys.stderr, flush=True)
        if args.json:
            print(json.dumps(results[-1]), flush=True)
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
