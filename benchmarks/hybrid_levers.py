"""Post-hoc levers of trained models' hybrid on an eval split: candidate depth and top-k pruning.

Usage::

    python benchmarks/sweep.py --features FEAT --out runs.jsonl --seeds 0 1 2 --eval-split test --only joint-default
    python benchmarks/hybrid_levers.py --features FEAT --runs runs.jsonl --only joint-default d2s-default

For every run of ``benchmarks/sweep.py --eval-split SPLIT`` named in ``--only`` (one per seed), it
loads the run's saved heads and, on ``FEAT/SPLIT``, measures with the fusion weights the sweep
chose on val (``cos/τ + w2·sparse``, and its z-score variant):

* **candidate depth**: the hybrid searched through a one-shard index of the split (default
  :class:`~sdray.index.IndexConfig`: flat FAISS, Seismic for sides of ≥ 1,000 documents) with
  ``k'`` dense and ``k'`` sparse candidates per query, rescored exactly
  (:func:`sdray.index.evaluate.evaluate_index`), against brute force over the whole split
  (:func:`sdray.evaluation.evaluate_features`, the sweep's own figure). A per-document fusion can
  only lose candidates; a per-query one (z-scores) normalises over them, so it can move either way.
* **top-k pruning**: the encoders keep only the ``k`` largest terms per caption and per image
  (``heads.topk_text`` / ``heads.topk_image``), brute force, same fusion weight (not re-chosen).

Prints a markdown table of mean ± std over the runs' seeds (RSUM of 600 and t2i R@1, percent).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

import numpy as np
import torch

from sdray import config as config_lib
from sdray.evaluation import dedupe, encode, evaluate_features, rsum
from sweep import mean_std  # benchmarks/ is the script's folder


def load_runs(path: str, names: list[str]) -> list[dict]:
    """Rows of ``benchmarks/sweep.py --eval-split`` for ``names`` (last row per name/epochs/seed)."""
    rows: dict[tuple, dict] = {}
    for line in open(path, encoding="utf-8"):
        r = json.loads(line)
        if r["name"] in names and "test" in r:
            rows[(r["name"], r["epochs"], r.get("seed", 0))] = r
    return [rows[k] for k in sorted(rows, key=lambda k: (names.index(k[0]), k[2]))]


def saved_runs_parser(description: str) -> argparse.ArgumentParser:
    """A parser with the arguments every benchmark over saved sweep heads takes."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--features", required=True, help="featurize output with val/ and the eval split")
    p.add_argument("--runs", required=True, help="benchmarks/sweep.py --out file (rows with --eval-split)")
    p.add_argument("--only", nargs="+", required=True, help="setting names")
    p.add_argument("--split", default="test", help="the eval split")
    p.add_argument("--threads", type=int, default=2)
    return p


def load_saved_runs(args: argparse.Namespace, *splits: str) -> tuple | None:
    """``(rows, columns of each of splits...)`` for a :func:`saved_runs_parser` namespace, torch on
    ``--threads``; a split is ``"val"`` or ``"eval"`` (``--split``). None, after saying why, when
    ``--runs`` has no row of ``--only``."""
    from pipelines.evaluate import read_feature_columns

    torch.set_num_threads(args.threads)
    rows = load_runs(args.runs, args.only)
    if not rows:
        print(f"no runs of {args.only} with an eval split in {args.runs}", file=sys.stderr)
        return None
    return (rows, *(read_feature_columns(os.path.join(args.features, args.split if s == "eval" else s))
                    for s in splits))


def measure_each(rows: list[dict], measure_row, as_json: bool) -> list[dict]:
    """``measure_row(row)`` for every sweep row, a progress line on stderr after each and, with
    ``as_json``, its figures as one JSON line on stdout."""
    results = []
    for row in rows:
        results.append(measure_row(row))
        print(f"{row['name']} seed {row['seed']} done", file=sys.stderr, flush=True)
        if as_json:
            print(json.dumps(results[-1]), flush=True)
    return results


def by_setting(results: list[dict]) -> dict[str, list[dict]]:
    """Per-seed results grouped by setting name, in the order first seen."""
    by: dict[str, list[dict]] = {}
    for r in results:
        by.setdefault(r["name"], []).append(r)
    return by


def heads_of(runs_path: str, row: dict, cfg):
    from safetensors.torch import load_file

    from sdray.model import _heads_like

    path = f"{runs_path}.{row['name']}.e{row['epochs']}.s{row['seed']}.safetensors"
    return _heads_like(cfg, load_file(path)).eval()


def fusions(row: dict, tau: float) -> dict[str, dict]:
    t = row["test"]
    return {"hybrid": {"method": "calibrated", "w1": 1.0, "w2": t["val_w2"], "tau": tau},
            "zscore": {"method": "calibrated", "w1": 1.0, "w2": t["val_w2_zscore"], "tau": tau,
                       "normalize": "zscore"}}


def _scipy_csr(t: torch.Tensor):
    import scipy.sparse as sp

    t = t if t.layout == torch.sparse_csr else t.to_sparse_csr()
    return sp.csr_matrix((t.values().numpy(), t.col_indices().numpy(), t.crow_indices().numpy()),
                         shape=tuple(t.shape))


def build_split_index(out: str, heads, data: dict) -> None:
    """One-shard index of the split's unique images and captions, encoded by ``heads``."""
    from sdray.index import ShardData, build_index

    image_ids = [str(x) for x in data["image_id"]]
    captions = [str(c) for c in data["caption"]]
    image_rows, text_rows, _ = dedupe(image_ids, captions)
    img_dense, img_sparse = encode(heads, np.asarray(data["image_features"], np.float32)[image_rows], "image")
    txt_dense, txt_sparse = encode(heads, np.asarray(data["text_features"], np.float32)[text_rows], "text")
    ids = [image_ids[r] for r in image_rows]
    caps = [captions[r] for r in text_rows]
    sides = {"images": ShardData(img_dense.numpy(), _scipy_csr(img_sparse), ids, image_ids=ids),
             "captions": ShardData(txt_dense.numpy(), _scipy_csr(txt_sparse), [f"c{j}" for j in range(len(caps))],
                                   captions=caps)}
    build_index(out, sides, 1)


def _figures(res: dict, rep: str) -> dict[str, float]:
    return {"rsum": rsum(res, rep), "t2i_R@1": res["t2i"][rep]["R@1"]}


def measure(runs_path: str, row: dict, data: dict, depths: list[int], topks: list[int]) -> dict:
    """Every lever's figures for one run (fractions, not percent)."""
    from sdray.index import Retriever
    from sdray.index.evaluate import evaluate_index

    cfg = config_lib.SdrayConfig()
    heads = heads_of(runs_path, row, cfg)
    tau = float(heads.tau.detach())
    fz = fusions(row, tau)
    brute = evaluate_features(heads, data, cfg, fz)
    out: dict = {"name": row["name"], "seed": row["seed"],
                 "brute": {k: _figures(brute, "hybrid_" + k) for k in fz}}
    out["brute"]["dense"] = _figures(brute, "dense")
    out["depth"] = {}
    with tempfile.TemporaryDirectory() as tmp:
        build_split_index(tmp, heads, data)
        retriever = Retriever.load(tmp)
        try:
            for d in depths:
                out["depth"][d] = {k: _figures(evaluate_index(retriever, heads, data, cfg, modes=("hybrid",),
                                                              candidates=d, fusion=f), "hybrid")
                                   for k, f in fz.items()}
        finally:
            retriever.close()
    out["topk"] = {}
    for k in topks:
        heads.topk_text = heads.topk_image = k
        res = evaluate_features(heads, data, cfg, fz)
        out["topk"][k] = {"sparse": _figures(res, "sparse"), "hybrid": _figures(res, "hybrid_hybrid"),
                          "nnz": [res["sparsity"]["text_nnz"], res["sparsity"]["image_nnz"]]}
    heads.topk_text = heads.topk_image = None
    return out


def tables(results: list[dict]) -> str:
    by = by_setting(results)
    lines = ["Candidate depth k' (dense and sparse candidates per query, through a one-shard index) "
             "vs brute force:", "",
             "| setting | seeds | k' | hybrid RSUM | hybrid t2i R@1 | z-score RSUM | z-score t2i R@1 |",
             "|---|---|---|---|---|---|---|"]
    for name, rs in by.items():
        seeds = ",".join(str(r["seed"]) for r in rs)
        lines.append(f"| {name} | {seeds} | brute force | {mean_std([r['brute']['hybrid']['rsum'] for r in rs])} | "
                     f"{mean_std([r['brute']['hybrid']['t2i_R@1'] for r in rs])} | "
                     f"{mean_std([r['brute']['zscore']['rsum'] for r in rs])} | "
                     f"{mean_std([r['brute']['zscore']['t2i_R@1'] for r in rs])} |")
        for d in rs[0]["depth"]:
            cell = lambda k, m: mean_std([r["depth"][d][k][m] for r in rs])  # noqa: E731
            lines.append(f"| {name} | {seeds} | {d} | {cell('hybrid', 'rsum')} | {cell('hybrid', 't2i_R@1')} | "
                         f"{cell('zscore', 'rsum')} | {cell('zscore', 't2i_R@1')} |")
    lines += ["", "Top-k pruning of the sparse vectors (brute force; fusion weight as chosen on val "
              "without pruning):", "",
              "| setting | seeds | k | sparse RSUM | hybrid RSUM | hybrid t2i R@1 | nnz text / image | "
              "dense t2i R@1 |", "|---|---|---|---|---|---|---|---|"]
    for name, rs in by.items():
        seeds = ",".join(str(r["seed"]) for r in rs)
        for k in rs[0]["topk"]:
            cell = lambda rep, m: mean_std([r["topk"][k][rep][m] for r in rs])  # noqa: E731
            nnz = [np.mean([r["topk"][k]["nnz"][i] for r in rs]) for i in (0, 1)]
            lines.append(f"| {name} | {seeds} | {k} | {cell('sparse', 'rsum')} | {cell('hybrid', 'rsum')} | "
                         f"{cell('hybrid', 't2i_R@1')} | {nnz[0]:.0f} / {nnz[1]:.0f} | "
                         f"{mean_std([r['brute']['dense']['t2i_R@1'] for r in rs])} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = saved_runs_parser(__doc__.splitlines()[0])
    p.add_argument("--depths", type=int, nargs="*", default=[10, 25, 50, 100])
    p.add_argument("--topk", type=int, nargs="*", default=[128, 64, 32])
    p.add_argument("--json", action="store_true", help="also print every run's figures as JSON lines")
    args = p.parse_args(argv)
    loaded = load_saved_runs(args, "eval")
    if loaded is None:
        return 2
    rows, data = loaded
    results = measure_each(rows, lambda row: measure(args.runs, row, data, args.depths, args.topk), args.json)
    print(tables(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
