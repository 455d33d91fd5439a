"""A per-query fusion weight *learnt on labelled queries* (a router), scored without leaking labels.

Usage::

    python benchmarks/sweep.py --features FEAT --out runs.jsonl --seeds 0 1 2 --eval-split test --only joint-default
    python benchmarks/fusion_router.py --features FEAT --runs runs.jsonl --only joint-default

For every run of ``benchmarks/sweep.py --eval-split SPLIT`` named in ``--only`` (one per seed), it
loads the run's saved heads (served vectors: capped at ``heads.topk_*``, as the sweep) and scores
the text→image queries of ``FEAT/val`` and ``FEAT/SPLIT`` with ``cos/τ`` and the sparse dot
product (:func:`fusion_ceiling.t2i_queries`). A router chooses, per query, one sparse weight of
``--grid`` (0 = dense only, 1e4 ≈ sparse only) for ``cos/τ + w2·sparse``: a multinomial logistic
regression (L2, its strength chosen by an inner grouped cross-validation on the training queries
for routed t2i R@1) on standardised per-query features (:func:`query_features`):

* ``shape``: each side's top-1, top-1 − top-2 gap and top-1 z-score, the best cosine, the log gap
  ratio; the two sides' agreement: overlap of the top-10 lists, the rank of each side's top-1 in
  the other's list, whether the top-1s coincide, and the cross-margins (what each side loses by
  taking the other's top-1); the query's sparse vector: nnz, largest weight, L1 and L2 norms;
* ``content``: the same, plus the query's dense embedding (the trained projection's output).

Its training target: a query is informative when some weights of the grid put a relevant image
first and some do not; each informative query counts once, spread evenly over the weights that
serve it (soft labels). Two honest setups, each against its own fixed-weight baseline:

* **(a) val → test**: the router trained on the val split's queries, scored on the eval split;
  baseline: the single weight of :data:`fusion_ceiling.W2_FINE` with the best val t2i R@1;
* **(b) grouped K-fold on the eval split**: the eval queries split into ``--folds`` folds by
  *concept* (connected components of the caption–image relevance graph, so no held-out query shares
  a relevant image with a training query), the router trained on K−1 folds and scored on the
  held-out one, repeated over ``--repeats`` fold assignments (figures averaged); baseline: the best
  fixed ``W2_FINE`` weight on the training folds. This is the most optimistic honest setup: labels
  from the same distribution as the queries scored.

Also printed: the joint model's dense, the router fitted and scored on the eval split's own
queries (``C = 1``; a diagnostic of how far these features and this model can separate the
queries at all, labels leaking — never a result), the per-query oracle over the router's grid and over
``W2_FINE``. Figures are t2i R@1 and t2i R@1+R@5+R@10 ("t2i RSUM", of 300), percent, mean ± std
over the runs' seeds (pessimistic ties, as :mod:`sdray.metrics`).
"""

from __future__ import annotations

import sys

import numpy as np
import torch

from fusion_ceiling import W2_FINE, hits_per_weight, t2i_queries, top1_hits  # benchmarks/ is the script's folder
from hybrid_levers import by_setting, heads_of, load_saved_runs, measure_each, saved_runs_parser
from sdray import config as config_lib
from sdray.evaluation import head_tau
from sdray.metrics import ranking_metrics
from sweep import mean_std

GRID = (0.0, 0.1, 0.3, 1.0, 3.0, 10.0, 100.0, 1e4)
C_GRID = (1e-3, 1e-2, 1e-1, 1.0)
FEATURE_SETS = ("shape", "content")


def concept_groups(relevant: np.ndarray) -> np.ndarray:
    """``(n_queries,)`` component id of each query in the bipartite query–item relevance graph:
    queries that share a relevant item (directly or through others) share a group."""
    import scipy.sparse as sp
    from scipy.sparse.csgraph import connected_components

    n_q, n_i = relevant.shape
    rel = sp.csr_matrix(np.asarray(relevant, bool))
    graph = sp.bmat([[sp.csr_matrix((n_q, n_q)), rel], [rel.T, sp.csr_matrix((n_i, n_i))]], format="csr")
    return connected_components(graph, directed=False)[1][:n_q]


def grouped_folds(groups: np.ndarray, k: int, seed: int) -> np.ndarray:
    """``(n,)`` fold index in ``[0, k)`` per element; every group lies in exactly one fold. Groups
    are shuffled, then dealt largest first to the currently smallest fold (balanced sizes)."""
    rng = np.random.default_rng(seed)
    ids, sizes = np.unique(groups, return_counts=True)
    order = rng.permutation(len(ids))
    order = order[np.argsort(-sizes[order], kind="stable")]
    fold_of_group, load = {}, np.zeros(k, np.int64)
    for g in order:
        f = int(np.argmin(load))
        fold_of_group[ids[g]] = f
        load[f] += sizes[g]
    return np.array([fold_of_group[g] for g in groups], np.int64)


def _top2(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    v, i = x.topk(min(2, x.shape[1]), dim=1)
    second = v[:, 1] if v.shape[1] > 1 else v[:, 0]
    return v[:, 0], second, i[:, 0]


def _zscore_top1(x: torch.Tensor, top1: torch.Tensor) -> torch.Tensor:
    return (top1 - x.mean(1)) / x.std(1).clamp_min(1e-9)


def csr_row_stats(csr: torch.Tensor) -> np.ndarray:
    """``(n_rows, 4)``: nnz, largest value, L1 and L2 norm of each row of a CSR matrix."""
    crow = csr.crow_indices().numpy()
    vals = csr.values().double().numpy()
    out = np.zeros((len(crow) - 1, 4))
    for r in range(len(crow) - 1):
        v = vals[crow[r]:crow[r + 1]]
        if v.size:
            out[r] = (v.size, v.max(), np.abs(v).sum(), np.sqrt((v * v).sum()))
    return out


def query_features(q: dict, tau: float, feature_set: str, top: int = 10) -> np.ndarray:
    """``(n_queries, F)`` router features of :func:`fusion_ceiling.t2i_queries`' output (see the
    module docstring); ``feature_set`` is ``shape`` or ``content`` (adds the dense embedding)."""
    dense, sparse = q["dense"], q["sparse"]
    d1, d2, di = _top2(dense)
    s1, s2, si = _top2(sparse)
    k = min(top, dense.shape[1])
    dtop, stop = dense.topk(k, 1).indices, sparse.topk(k, 1).indices
    overlap = (dtop.unsqueeze(2) == stop.unsqueeze(1)).any(2).double().mean(1)
    s_at_d = sparse.gather(1, di[:, None])[:, 0]
    d_at_s = dense.gather(1, si[:, None])[:, 0]
    rank_d_in_s = (sparse > s_at_d[:, None]).sum(1).double()
    rank_s_in_d = (dense > d_at_s[:, None]).sum(1).double()
    gap_d, gap_s = d1 - d2, s1 - s2
    cols = [d1, gap_d, _zscore_top1(dense, d1), d1 * tau,
            s1, gap_s, _zscore_top1(sparse, s1),
            torch.log(gap_s + 1e-6) - torch.log(gap_d + 1e-6),
            overlap, torch.log1p(rank_d_in_s), torch.log1p(rank_s_in_d), (di == si).double(),
            d_at_s - d1, s_at_d - s1]
    stats = csr_row_stats(q["text_sparse"])[q["keep"].numpy()]
    stats[:, 0] = np.log1p(stats[:, 0])
    parts = [torch.stack(cols, 1).numpy(), stats]
    if feature_set == "content":
        parts.append(q["text_dense"].double().numpy())
    return np.concatenate(parts, 1)


class Router:
    """Standardised features → multinomial logistic regression over the grid's weight indices."""

    def __init__(self, c: float):
        self.c = c
        self.mean = self.std = self.model = None
        self.constant = 0

    def fit(self, x: np.ndarray, hits: np.ndarray) -> Router:
        """``hits``: ``(n_weights, n_queries)`` bool. Informative queries (some weights serve them,
        some do not) are the training rows, each weighted evenly over the weights that serve it."""
        from sklearn.linear_model import LogisticRegression

        self.mean, self.std = x.mean(0), x.std(0) + 1e-9
        served = hits.sum(0)
        informative = np.nonzero((served > 0) & (served < hits.shape[0]))[0]
        rows, labels = np.nonzero(hits[:, informative].T)
        weights = 1.0 / served[informative][rows]
        self.constant = int(np.argmax(hits.sum(1)))  # the best fixed weight: the fallback
        if len(np.unique(labels)) < 2:
            self.model = None
            return self
        self.model = LogisticRegression(C=self.c, max_iter=500)
        self.model.fit((x[informative][rows] - self.mean) / self.std, labels, sample_weight=weights)
        return self

    def route(self, x: np.ndarray) -> np.ndarray:
        """``(n,)`` index into the grid chosen for each query."""
        if self.model is None:
            return np.full(len(x), self.constant, np.int64)
        return self.model.classes_[self.model.predict_proba((x - self.mean) / self.std).argmax(1)]


def routed_hits(hits: np.ndarray, choice: np.ndarray) -> np.ndarray:
    """``(n_queries,)`` bool: the hit of each query at its chosen weight index."""
    return hits[choice, np.arange(hits.shape[1])]


def fit_router(x: np.ndarray, hits: np.ndarray, groups: np.ndarray, seed: int,
               inner_folds: int = 4, cs=C_GRID) -> Router:
    """A :class:`Router` whose L2 strength (``C``) has the best routed R@1 over grouped inner
    folds of the training queries (ties: the smaller ``C``, the stronger penalty), refit on all."""
    folds = grouped_folds(groups, inner_folds, seed)
    scores = []
    for c in cs:
        hit = np.zeros(len(x), bool)
        for f in range(inner_folds):
            tr, te = folds != f, folds == f
            hit[te] = routed_hits(hits[:, te], Router(c).fit(x[tr], hits[:, tr]).route(x[te]))
        scores.append(hit.mean())
    return Router(cs[int(np.argmax(scores))]).fit(x, hits)


def grid_hits(q: dict, grid) -> np.ndarray:
    """``(len(grid), n_queries)`` bool top-1 hits of ``cos/τ + w2·sparse`` per grid weight."""
    return np.stack([top1_hits(q["dense"] + w * q["sparse"], q["relevant"]).numpy() for w in grid])


def figures(q: dict, weights: np.ndarray) -> dict[str, float]:
    """t2i R@1 and R@1+R@5+R@10 of ``cos/τ + w2(q)·sparse`` with a weight per query."""
    w = torch.as_tensor(weights, dtype=torch.float64)[:, None]
    m = ranking_metrics(q["dense"] + w * q["sparse"], q["relevant"].numpy())
    return {"r1": m["R@1"], "rsum": m["R@1"] + m["R@5"] + m["R@10"]}


def fine_choice(q: dict, rows: np.ndarray | None = None) -> int:
    """Index into ``W2_FINE`` of the best t2i R@1 on the queries ``rows`` (a bool mask; default
    all) of :func:`fusion_ceiling.t2i_queries`' output (ties: the smaller weight)."""
    r = slice(None) if rows is None else torch.as_tensor(rows)
    r1 = hits_per_weight(q["dense"][r], q["sparse"][r], q["relevant"][r]).float().mean(1)
    return int(torch.nonzero(r1 == r1.max())[0])


def setup_val(val: dict, test: dict, tau: float, grid, seed: int) -> dict:
    """(a): fixed weight and routers trained on val, figures on test."""
    out = {"fixed_a": figures(test, np.full(len(test["dense"]), W2_FINE[fine_choice(val)]))}
    val_hits, groups = grid_hits(val, grid), concept_groups(val["relevant"].numpy())
    for fs in FEATURE_SETS:
        router = fit_router(query_features(val, tau, fs), val_hits, groups, seed)
        choice = router.route(query_features(test, tau, fs))
        out[f"router_a_{fs}"] = {**figures(test, np.asarray(grid)[choice]), "C": router.c}
    return out


def setup_cv(test: dict, tau: float, grid, seed: int, folds: int, repeats: int) -> dict:
    """(b): grouped K-fold over the eval queries, ``repeats`` fold assignments averaged."""
    hits, groups = grid_hits(test, grid), concept_groups(test["relevant"].numpy())
    feats = {fs: query_features(test, tau, fs) for fs in FEATURE_SETS}
    per = {k: [] for k in ("fixed_b", *(f"router_b_{fs}" for fs in FEATURE_SETS))}
    for rep in range(repeats):
        fold = grouped_folds(groups, folds, seed * 1000 + rep)
        weights = {k: np.zeros(len(groups)) for k in per}
        for f in range(folds):
            tr, te = fold != f, fold == f
            weights["fixed_b"][te] = W2_FINE[fine_choice(test, tr)]
            for fs in FEATURE_SETS:
                router = fit_router(feats[fs][tr], hits[:, tr], groups[tr], seed + rep)
                weights[f"router_b_{fs}"][te] = np.asarray(grid)[router.route(feats[fs][te])]
        for k in per:
            per[k].append(figures(test, weights[k]))
    return {k: {m: float(np.mean([r[m] for r in v])) for m in ("r1", "rsum")} for k, v in per.items()}


def measure(runs_path: str, row: dict, val_data: dict, test_data: dict, grid, folds: int,
            repeats: int) -> dict:
    """Every figure of one run (fractions)."""
    heads = heads_of(runs_path, row, config_lib.with_overrides(config_lib.SdrayConfig(), row.get("overrides", {})))
    tau = head_tau(heads)
    val, test = t2i_queries(heads, val_data), t2i_queries(heads, test_data)
    n = len(test["dense"])
    out = {"name": row["name"], "seed": row["seed"], "n_val": len(val["dense"]), "n_test": n,
           "dense": figures(test, np.zeros(n)),
           "oracle_grid": {"r1": float(grid_hits(test, grid).any(0).mean())},
           "oracle_fine": {"r1": hits_per_weight(test["dense"], test["sparse"], test["relevant"]).any(0).float().mean().item()}}
    test_hits = grid_hits(test, grid)
    for fs in FEATURE_SETS:  # diagnostic: fit and score on the same queries (labels leak)
        choice = Router(1.0).fit(query_features(test, tau, fs), test_hits).route(query_features(test, tau, fs))
        out[f"router_in_{fs}"] = figures(test, np.asarray(grid)[choice])
    out.update(setup_val(val, test, tau, grid, row["seed"]))
    out.update(setup_cv(test, tau, grid, row["seed"], folds, repeats))
    return out


COLUMNS = (("dense", "joint dense"), ("fixed_a", "fixed w2 (val)"), ("router_a_shape", "router (a) shape"),
           ("router_a_content", "router (a) +content"), ("fixed_b", "fixed w2 (CV folds)"),
           ("router_b_shape", "router (b) shape"), ("router_b_content", "router (b) +content"),
           ("router_in_shape", "router in-sample shape (diag.)"),
           ("router_in_content", "router in-sample +content (diag.)"),
           ("oracle_grid", "oracle (router grid)"), ("oracle_fine", "oracle (fine grid)"))


def table(results: list[dict]) -> str:
    """Markdown: t2i R@1 (then t2i RSUM) per setting, mean ± std over seeds, and the (a)/(b)
    routers' gain over the joint dense per seed."""
    lines = ["t2i on the eval split (percent, mean ± std over seeds); (a) trained on val, (b) grouped "
             "K-fold over the eval split's concepts:", "",
             "| setting | seeds | figure | " + " | ".join(c for _, c in COLUMNS) + " |",
             "|---|---|---|" + "---|" * len(COLUMNS)]
    for name, rs in by_setting(results).items():
        seeds = ",".join(str(r["seed"]) for r in rs)
        for metric, label in (("r1", "R@1"), ("rsum", "R@1+5+10")):
            cells = [mean_std([r[k][metric] for r in rs]) if metric in rs[0][k] else "" for k, _ in COLUMNS]
            lines.append(f"| {name} | {seeds} | {label} | " + " | ".join(cells) + " |")
    lines += ["", "t2i R@1 gain over the joint dense, per seed (points):", ""]
    for name, rs in by_setting(results).items():
        for k, label in COLUMNS[1:]:
            gains = [100 * (r[k]["r1"] - r["dense"]["r1"]) for r in rs]
            lines.append(f"* {name} {label}: " + ", ".join(f"{g:+.1f}" for g in gains)
                         + f" (mean {np.mean(gains):+.1f})")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = saved_runs_parser(__doc__.splitlines()[0])
    p.add_argument("--grid", type=float, nargs="+", default=list(GRID), help="the router's sparse weights")
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--json", action="store_true", help="also print every run's figures as JSON lines")
    args = p.parse_args(argv)
    loaded = load_saved_runs(args, "val", "eval")
    if loaded is None:
        return 2
    rows, val, test = loaded
    results = measure_each(rows, lambda row: measure(args.runs, row, val, test, args.grid, args.folds,
                                                     args.repeats), args.json)
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
