"""The demo's comparison report: a text table, ``report.md`` and its plots (matplotlib, Agg).

Pure: input is plain data — per-method eval results (the ``sdray eval --json`` shape, DESIGN.md
§4), per-method training histories (rows of ``metrics.jsonl``), stage timings and sample
queries — and output is files. No Ray, no torch.

>>> text = comparison_table({"dense": result_d, "joint": result_j}, direction="t2i")
>>> path = write_report("out/", methods, histories, timings, queries=[...])
"""

from __future__ import annotations

import math
import os
from typing import Any, Iterable

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

METHODS = ("dense", "d2s", "joint")
REPRESENTATIONS = ("dense", "sparse", "hybrid")
METRICS = ("R@1", "R@5", "R@10", "MRR@10")
COLORS = {"dense": "tab:blue", "sparse": "tab:orange", "hybrid": "tab:green",
          "d2s": "tab:red", "joint": "tab:purple"}


def _ordered(methods: dict[str, Any]) -> list[str]:
    return [m for m in METHODS if m in methods] + sorted(m for m in methods if m not in METHODS)


def comparison_rows(methods: dict[str, dict], direction: str = "t2i") -> list[dict[str, Any]]:
    """One row per (method, representation): the four metrics (percent), nnz and FLOPs."""
    rows = []
    for m in _ordered(methods):
        res = methods[m]
        sp = res.get("sparsity", {})
        for rep in REPRESENTATIONS:
            vals = res.get(direction, {}).get(rep)
            if not vals:
                continue
            row = {"method": m, "retrieval": rep, **{k: 100.0 * vals[k] for k in METRICS}}
            if rep == "dense":
                row.update(text_nnz=None, image_nnz=None, flops=None)
            else:
                row.update(text_nnz=sp.get("text_nnz"), image_nnz=sp.get("image_nnz"),
                           flops=sp.get("flops"))
            rows.append(row)
    return rows


def _fmt(v: Any, spec: str = ".1f") -> str:
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def comparison_table(methods: dict[str, dict], direction: str = "t2i", markdown: bool = False) -> str:
    """The method × retrieval table (percent), with nnz and FLOPs for sparse and hybrid."""
    head = ["method", "retrieval", *METRICS, "text nnz", "image nnz", "FLOPs"]
    body = [[r["method"], r["retrieval"], *(_fmt(r[k], ".2f") for k in METRICS),
             _fmt(r["text_nnz"]), _fmt(r["image_nnz"]), _fmt(r["flops"], ".2f")]
            for r in comparison_rows(methods, direction)]
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * 2 + "---:|" * (len(head) - 2)]
        lines += ["| " + " | ".join(row) + " |" for row in body]
        return "\n".join(lines)
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body)]
    fmt = lambda row: "  ".join(  # noqa: E731
        str(c).ljust(w) if i < 2 else str(c).rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
    lines = [fmt(head), "  ".join("-" * w for w in widths)]
    prev = None
    for row in body:
        if prev is not None and row[0] != prev:
            lines.append("")
        lines.append(fmt(row))
        prev = row[0]
    return "\n".join(lines)


def timings_table(timings: dict[str, float], reused: Iterable[str] = (), markdown: bool = False,
                  together: Iterable[Iterable[str]] = ()) -> str:
    """Stage, seconds, share of the total, and whether the stage was reused from an earlier run.

    ``together``: groups of stages that ran side by side; the total counts a group once, at its
    longest stage, and each member's row says so.
    """
    reused = set(reused)
    beside = {name: [o for o in group if o != name] for group in map(list, together) for name in group}
    total = _wall_total(timings, together)
    share = lambda v: f"{100.0 * v / total:.0f}%" if total > 0 else "-"
    note = lambda k: "reused" if k in reused else (
        "side by side with " + ", ".join(beside[k]) if k in beside else "")
    rows = [(k, f"{v:.1f}", share(v), note(k)) for k, v in timings.items()]
    rows.append(("total", f"{total:.1f}", "100%" if total > 0 else "-", ""))
    if markdown:
        return "\n".join(["| stage | seconds | share | |", "|---|---:|---:|---|"]
                         + [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows])
    w = max(len(r[0]) for r in rows)
    return "\n".join(f"{a.ljust(w)}  {b.rjust(8)}  {c.rjust(5)}  {d}".rstrip() for a, b, c, d in rows)


def _wall_total(timings: dict[str, float], together: Iterable[Iterable[str]]) -> float:
    """Sum of the stage times, each side-by-side group counted once at its longest stage."""
    groups = [[k for k in group if k in timings] for group in together]
    grouped = {k for g in groups for k in g}
    return (sum(v for k, v in timings.items() if k not in grouped)
            + sum(max(timings[k] for k in g) for g in groups if g))


# ----------------------------------------------------------------------------- plots

def plot_recall(methods: dict[str, dict], path: str, direction: str = "t2i") -> str:
    """Grouped bars: R@1/R@5/R@10 of each method's dense, sparse and hybrid retrieval."""
    names = _ordered(methods)
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.8), sharey=True)
    width = 0.8 / len(REPRESENTATIONS)
    for ax, k in zip(axes, ("R@1", "R@5", "R@10")):
        for j, rep in enumerate(REPRESENTATIONS):
            ys = [100 * methods[m].get(direction, {}).get(rep, {}).get(k, float("nan")) for m in names]
            xs = [i + (j - 1) * width for i in range(len(names))]
            ax.bar(xs, ys, width, label=rep, color=COLORS[rep])
        ax.set_xticks(range(len(names)), names)
        ax.set_title(f"{direction} {k}")
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylabel("%")
    axes[-1].legend(title="retrieval", fontsize=8)
    fig.suptitle("recall per training method")
    return _save(fig, path)


def plot_recall_vs_sparsity(methods: dict[str, dict], path: str, direction: str = "t2i") -> str:
    """Sparse R@1 against FLOPs (left) and against mean nnz per vector (right), one point per method;
    the dense R@1 of each method is a horizontal line for reference."""
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
    for m in _ordered(methods):
        res = methods[m]
        sp = res.get("sparsity", {})
        r1 = 100 * res.get(direction, {}).get("sparse", {}).get("R@1", float("nan"))
        nnz = 0.5 * (sp.get("text_nnz", float("nan")) + sp.get("image_nnz", float("nan")))
        c = COLORS.get(m, None)
        for ax, x in ((ax1, sp.get("flops", float("nan"))), (ax2, nnz)):
            if x and x > 0:
                ax.scatter([x], [r1], s=60, color=c, label=m, zorder=3)
                ax.annotate(m, (x, r1), textcoords="offset points", xytext=(5, 4), fontsize=8)
            dense = 100 * res.get(direction, {}).get("dense", {}).get("R@1", float("nan"))
            ax.axhline(dense, color=c, alpha=0.35, linestyle="--", linewidth=1)
    for ax, lab in ((ax1, "FLOPs per query–document pair (log)"), (ax2, "mean nnz per vector (log)")):
        ax.set_xscale("log")
        ax.set_xlabel(lab)
        ax.grid(alpha=0.3)
    ax1.set_ylabel(f"{direction} sparse R@1 (%)  — dashed: dense R@1")
    handles, labels = ax1.get_legend_handles_labels()
    if handles:
        ax1.legend(fontsize=8)
    fig.suptitle("recall against sparsity")
    return _save(fig, path)


def plot_training(histories: dict[str, list[dict]], path: str) -> str:
    """Training loss per step (left), validation RSUM per epoch (middle), mean nnz (right)."""
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(13, 3.8))
    for m in _ordered(histories):
        rows = histories[m] or []
        c = COLORS.get(m)
        train = [r for r in rows if r.get("type") == "train" and "loss" in r]
        val = [r for r in rows if r.get("type") == "val"]
        if train:
            ax1.plot([r["step"] for r in train], [r["loss"] for r in train], color=c, label=m)
        if val:
            key = "rsum_dense" if m == "dense" else "rsum_sparse"
            ax2.plot([r["epoch"] for r in val], [100 * r.get(key, float("nan")) for r in val],
                     marker="o", color=c, label=f"{m} ({key[5:]})")
            if m != "dense":
                ax3.plot([r["epoch"] for r in val],
                         [0.5 * (r.get("text_nnz", float("nan")) + r.get("image_nnz", float("nan")))
                          for r in val], marker="s", color=c, label=m)
    ax1.set(xlabel="step", ylabel="loss", title="training loss")
    ax2.set(xlabel="epoch", ylabel="RSUM (%)", title="validation RSUM")
    ax3.set(xlabel="epoch", ylabel="mean nnz per vector", title="validation sparsity")
    for ax in (ax1, ax3):  # losses of the three methods differ by orders of magnitude
        ys = [y for line in ax.get_lines() for y in line.get_ydata() if y == y]
        if ys and min(ys) > 0:
            ax.set_yscale("log")
    for ax in (ax1, ax2, ax3):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    return _save(fig, path)


def _save(fig, path: str) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------- report.md

def _query_md(q: dict) -> list[str]:
    lines = [f"**{q.get('kind', 'text')} query** `{q.get('query', '')}` "
             f"({q.get('mode', 'hybrid')}, {q.get('took_ms', 0):.0f} ms"
             + (f", relevant hit at rank {q['first_relevant']}" if q.get("first_relevant") else "")
             + ")", "", "| # | hit | score | dense | sparse | top shared terms (query × doc) |",
             "|---:|---|---:|---:|---:|---|"]
    for i, h in enumerate(q.get("hits", [])[:5], 1):
        terms = ", ".join(f"{t['term']} ({t['query']:.2f}×{t['doc']:.2f})"
                          for t in (h.get("explanation") or [])[:5])
        label = (h.get("caption") or h.get("id") or "").replace("|", "/")[:70]
        mark = " ✓" if h.get("relevant") else ""
        s = h.get("scores", {})
        lines.append(f"| {i} | {label}{mark} | {h.get('score', 0):.3f} | {s.get('dense', 0):.3f} | "
                     f"{s.get('sparse', 0):.2f} | {terms} |")
    return lines + [""]


def write_report(out_dir: str, methods: dict[str, dict], histories: dict[str, list[dict]],
                 timings: dict[str, float], *, reused: Iterable[str] = (),
                 queries: list[dict] | None = None, notes: dict[str, Any] | None = None,
                 extra_plots: dict[str, list[str]] | None = None,
                 together: Iterable[Iterable[str]] = ()) -> str:
    """Write ``out_dir/report.md`` and ``out_dir/plots/*.png``; returns the report's path.
    ``together``: groups of stages that ran side by side (see ``timings_table``)."""
    os.makedirs(out_dir, exist_ok=True)
    plots = os.path.join(out_dir, "plots")
    p_recall = plot_recall(methods, os.path.join(plots, "recall_per_method.png"))
    p_sparse = plot_recall_vs_sparsity(methods, os.path.join(plots, "recall_vs_sparsity.png"))
    p_train = plot_training(histories, os.path.join(plots, "training_curves.png"))
    rel = lambda p: os.path.relpath(p, out_dir)  # noqa: E731
    notes = notes or {}
    any_res = next(iter(methods.values()), {})
    lines = ["# sdray demo report", ""]
    if notes:
        lines += [", ".join(f"{k}: {v}" for k, v in notes.items()), ""]
    lines += [f"Test split: {any_res.get('n_texts', '?')} captions, {any_res.get('n_images', '?')} "
              "images. Recall in percent; nnz = mean non-zero terms per sparse vector; FLOPs = "
              "expected multiply-adds per query–document pair (Σ_v P(q_v≠0)·P(d_v≠0)).", ""]
    fusions = {m: r["fusion"] for m, r in methods.items() if r.get("fusion")}
    if fusions:   # each model fuses with its own weights (chosen on its val split)
        lines += ["Hybrid fusion per model: " + "; ".join(
            f"{m}: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in f.items())
            for m, f in fusions.items()) + ".", ""]
    for d, title in (("t2i", "Text → image"), ("i2t", "Image → text")):
        lines += [f"## {title}", "", comparison_table(methods, d, markdown=True), ""]
    lines += ["## Plots", "", f"![recall per method]({rel(p_recall)})", "",
              f"![recall against sparsity]({rel(p_sparse)})", "",
              f"![training curves]({rel(p_train)})", ""]
    for m, paths in (extra_plots or {}).items():
        if paths:
            lines.append(f"Per-run curves of `{m}`: " + ", ".join(
                f"[{os.path.basename(p)}]({rel(p)})" for p in paths))
    if extra_plots:
        lines.append("")
    if queries:
        lines += ["## Sample queries (served endpoint)", "",
                  "✓ marks a relevant hit. Explanations list the sparse terms shared by query and "
                  "hit, with their weight in each; their products sum to the sparse score.", ""]
        for q in queries:
            lines += _query_md(q)
    lines += ["## Stage timings (seconds)", "", timings_table(timings, reused, markdown=True, together=together), ""]
    path = os.path.join(out_dir, "report.md")
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines))
    return path
