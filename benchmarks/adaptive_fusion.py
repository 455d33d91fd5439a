"""Query-dependent fusion weight vs the fixed one, on saved sweep runs (no retraining).

Usage::

    python benchmarks/sweep.py --features FEAT --out runs.jsonl --seeds 0 1 2 --eval-split test --only joint-default
    python benchmarks/adaptive_fusion.py --features FEAT --runs runs.jsonl --only joint-default

For every run of ``benchmarks/sweep.py --eval-split SPLIT`` named in ``--only`` (one per seed),
it loads the run's saved heads, encodes ``FEAT/val`` and ``FEAT/SPLIT`` (unique images and
captions, as :func:`sdray.evaluation.evaluate_features`), and scores both directions, queries
as rows, with :class:`sdray.fusion.FusionConfig` over a grid: sparse weight ``w2`` (``--w2``),
confidence power ``p`` (``--powers``: the per-query factor ``(gap_sparse/gap_dense)^p``), cosine
slope ``β`` (``--slopes``: the per-query factor ``exp(β·(0.5 − best cosine))``), on ``cos/τ``
(``--normalize none``, the default) and/or z-scored scores (``zscore``: ``z-`` prefix). ``p = β =
0`` is the fixed-weight fusion. Every choice is made on **val** and reported on the eval split:

* ``fixed``: ``p = β = 0``, the ``w2`` with the best val RSUM (the sweep's fusion, finer grid);
* ``gap``: ``β = 0``, the ``(p, w2)`` with the best val RSUM (``p`` may come out 0);
* ``level``: ``p = 0``, the ``(β, w2)`` with the best val RSUM;
* ``both``: the ``(p, β, w2)`` with the best val RSUM;
* ``fixed@t2i``, ``level@t2i``, ``both@t2i``: chosen for val **t2i R@1**, the target's metric;
* ``best-on-test (diag.)``: the grid point with the best t2i R@1 on the eval split itself — the
  most this family can give, never a result.

Ties on val go to the smaller ``p``, then ``β``, then ``w2``. Prints a markdown table of mean ±
std over seeds (percent): RSUM and t2i R@1 on the eval split, with the model's dense figures.
"""

from __future__ import annotations

import sys

import numpy as np
import torch

from hybrid_levers import by_setting, heads_of, load_saved_runs, measure_each, saved_runs_parser  # benchmarks/ is the script's folder
from sdray import config as config_lib
from sdray.evaluation import dedupe, encode, head_tau, sparse_scores
from sdray.fusion import FusionConfig
from sdray.metrics import ranking_metrics, relevance_from_pairs
from sweep import mean_std

W2 = tuple(np.logspace(-2, 2, 17).round(4).tolist())
POWERS = (0.0, 0.5, 1.0)
SLOPES = (0.0, 2.0, 5.0, 10.0, 20.0)


def split_scores(heads, data: dict) -> dict[str, tuple[torch.Tensor, torch.Tensor, np.ndarray]]:
    """Per direction, queries as rows: ``(cos, sparse, relevant)``, each ``(n_queries, n_items)``."""
    image_rows, text_rows, pairs = dedupe(list(data["image_id"]), [str(c) for c in data["caption"]])
    txt_dense, txt_sparse = encode(heads, np.asarray(data["text_features"], np.float32)[text_rows], "text")
    img_dense, img_sparse = encode(heads, np.asarray(data["image_features"], np.float32)[image_rows], "image")
    relevant = relevance_from_pairs(pairs, len(image_rows), len(text_rows))  # (n_images, n_texts)
    dense = (img_dense @ txt_dense.T).double()
    sparse = sparse_scores(img_sparse, txt_sparse).double()
    rel = np.asarray(relevant, dtype=bool)
    out = {"i2t": (dense, sparse, rel), "t2i": (dense.T.contiguous(), sparse.T.contiguous(), rel.T.copy())}
    return {d: (c[r.any(1)], s[r.any(1)], r[r.any(1)]) for d, (c, s, r) in out.items()}


def direction_figures(scores: torch.Tensor, relevant: np.ndarray) -> tuple[float, float]:
    """``(R@1 + R@5 + R@10, R@1)`` of one direction (fractions)."""
    m = ranking_metrics(scores, relevant)
    return m["R@1"] + m["R@5"] + m["R@10"], m["R@1"]


def grid_figures(split: dict, tau: float, w2s, powers, slopes, normalizations) -> dict[tuple, dict[str, float]]:
    """``(normalize, p, β, w2)`` → ``{"rsum", "t2i_r1"}`` over both directions of one split."""
    out = {}
    for normalize in normalizations:
        for p in powers:
            for b in slopes:
                for w2 in w2s:
                    f = FusionConfig("calibrated", 1.0, w2, tau, normalize, confidence_power=p, cosine_slope=b)
                    figs = {d: direction_figures(f(c, s), r) for d, (c, s, r) in split.items()}
                    out[(normalize, p, b, w2)] = {"rsum": figs["t2i"][0] + figs["i2t"][0], "t2i_r1": figs["t2i"][1]}
    return out


FAMILIES = {"fixed": lambda k: k[1] == 0 and k[2] == 0, "gap": lambda k: k[2] == 0,
            "level": lambda k: k[1] == 0, "both": lambda k: True}
CHOICES = (("fixed", "rsum"), ("gap", "rsum"), ("level", "rsum"), ("both", "rsum"),
           ("fixed", "t2i_r1"), ("level", "t2i_r1"), ("both", "t2i_r1"))


def choose(val: dict, normalize, metric: str, family: str) -> tuple:
    keys = sorted(k for k in val if k[0] == normalize and FAMILIES[family](k))
    return max(keys, key=lambda k: val[k][metric])  # first max: the smaller p, then β, then w2


def measure(runs_path: str, row: dict, val_data: dict, test_data: dict, w2s, powers, slopes,
            normalizations) -> dict:
    heads = heads_of(runs_path, row, config_lib.with_overrides(config_lib.SdrayConfig(), row.get("overrides", {})))
    tau = head_tau(heads)
    val_split, test_split = split_scores(heads, val_data), split_scores(heads, test_data)
    val = grid_figures(val_split, tau, w2s, powers, slopes, normalizations)
    test = grid_figures(test_split, tau, w2s, powers, slopes, normalizations)
    dense = {d: direction_figures(c, r) for d, (c, _, r) in test_split.items()}
    out = {"name": row["name"], "seed": row["seed"], "tau": tau,
           "dense": {"rsum": dense["t2i"][0] + dense["i2t"][0], "t2i_r1": dense["t2i"][1]}}
    for normalize in normalizations:
        prefix = "z-" if normalize else ""
        for family, metric in CHOICES:
            k = choose(val, normalize, metric, family)
            out[prefix + family + ("@t2i" if metric == "t2i_r1" else "")] = {**test[k], "p": k[1], "b": k[2], "w2": k[3]}
        best = max((k for k in test if k[0] == normalize), key=lambda k: test[k]["t2i_r1"])
        out[prefix + "best-on-test (diag.)"] = {**test[best], "p": best[1], "b": best[2], "w2": best[3]}
    return out


LABELS = (*(f + ("@t2i" if m == "t2i_r1" else "") for f, m in CHOICES), "best-on-test (diag.)")


def table(results: list[dict]) -> str:
    by = by_setting(results)
    lines = ["Eval split, mean ± std over seeds (percent); every fusion chosen on val except the "
             "diagnostic; p = confidence power, β = cosine slope (both 0: the fixed weight):", "",
             "| setting | seeds | fusion | RSUM | t2i R@1 | t2i R@1 − dense | chosen (p, β, w2) per seed |",
             "|---|---|---|---|---|---|---|"]
    for name, rs in by.items():
        seeds = ",".join(str(r["seed"]) for r in rs)
        lines.append(f"| {name} | {seeds} | dense | {mean_std([r['dense']['rsum'] for r in rs])} | "
                     f"{mean_std([r['dense']['t2i_r1'] for r in rs])} | | |")
        for prefix in ("", "z-"):
            for label in LABELS:
                key = prefix + label
                if key not in rs[0]:
                    continue
                delta = [r[key]["t2i_r1"] - r["dense"]["t2i_r1"] for r in rs]
                chosen = " ".join(f"({r[key]['p']:g}, {r[key]['b']:g}, {r[key]['w2']:g})" for r in rs)
                lines.append(f"| {name} | {seeds} | {key} | {mean_std([r[key]['rsum'] for r in rs])} | "
                             f"{mean_std([r[key]['t2i_r1'] for r in rs])} | {mean_std(delta)} | {chosen} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = saved_runs_parser(__doc__.splitlines()[0])
    p.add_argument("--w2", type=float, nargs="+", default=list(W2))
    p.add_argument("--powers", type=float, nargs="+", default=list(POWERS))
    p.add_argument("--slopes", type=float, nargs="+", default=list(SLOPES))
    p.add_argument("--normalize", nargs="+", choices=("none", "zscore"), default=["none"])
    p.add_argument("--json", action="store_true", help="also print every run's figures as JSON lines")
    args = p.parse_args(argv)
    loaded = load_saved_runs(args, "val", "eval")
    if loaded is None:
        return 2
    rows, val, test = loaded
    normalize = [None if n == "none" else n for n in args.normalize]
    results = measure_each(rows, lambda row: measure(args.runs, row, val, test, args.w2, args.powers,
                                                     args.slopes, normalize), args.json)
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
