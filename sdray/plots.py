"""Training curves as PNG (matplotlib, Agg backend): loss, recall and sparsity per step/epoch.

Input: the rows of ``metrics.jsonl`` written by ``sdray train`` — ``{"type": "train", "step",
"loss", "tau", "nnz_text", "nnz_image", ...}`` and ``{"type": "val", "epoch", "step",
"rsum_dense", "rsum_sparse", "rsum_hybrid", "text_nnz", "image_nnz", "flops", ...}``.
"""

from __future__ import annotations

import os
from typing import Iterable

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_history(rows: Iterable[dict], out_dir: str) -> list[str]:
    """Write ``loss.png``, ``recall.png`` and ``nnz.png`` into ``out_dir``; returns their paths."""
    rows = list(rows)
    train = [r for r in rows if r.get("type") == "train"]
    val = [r for r in rows if r.get("type") == "val"]
    os.makedirs(out_dir, exist_ok=True)
    paths = []

    fig, ax = plt.subplots(figsize=(6, 4))
    if train:
        ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss")
        if any("tau" in r for r in train):
            ax2 = ax.twinx()
            ax2.plot([r["step"] for r in train], [r.get("tau", float("nan")) for r in train],
                     color="tab:gray", linestyle=":", label="τ")
            ax2.set_ylabel("τ")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title("training loss")
    ax.legend(loc="upper right")
    paths.append(_save(fig, out_dir, "loss.png"))

    fig, ax = plt.subplots(figsize=(6, 4))
    for rep in ("dense", "sparse", "hybrid"):
        key = f"rsum_{rep}"
        if any(key in r for r in val):
            ax.plot([r["epoch"] for r in val], [100 * r[key] for r in val], marker="o", label=rep)
    for r in val:
        if r.get("selected"):
            ax.axvline(r["epoch"], color="tab:green", alpha=0.3)
    ax.set_xlabel("epoch")
    ax.set_ylabel("RSUM (R@1+5+10, both directions, %)")
    ax.set_title("validation recall (green: kept checkpoint)")
    ax.legend()
    paths.append(_save(fig, out_dir, "recall.png"))

    fig, ax = plt.subplots(figsize=(6, 4))
    if train and any("nnz_text" in r for r in train):
        ax.plot([r["step"] for r in train], [r.get("nnz_text", float("nan")) for r in train],
                alpha=0.5, label="train text nnz")
        ax.plot([r["step"] for r in train], [r.get("nnz_image", float("nan")) for r in train],
                alpha=0.5, label="train image nnz")
    if val:
        ax.plot([r["step"] for r in val], [r.get("text_nnz", float("nan")) for r in val], marker="o",
                label="val text nnz")
        ax.plot([r["step"] for r in val], [r.get("image_nnz", float("nan")) for r in val], marker="s",
                label="val image nnz")
    ax.set_yscale("symlog")
    ax.set_xlabel("step")
    ax.set_ylabel("mean non-zeros per vector")
    ax.set_title("sparsity")
    ax.legend()
    paths.append(_save(fig, out_dir, "nnz.png"))
    return paths


def _save(fig, out_dir: str, name: str) -> str:
    path = os.path.join(out_dir, name)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
