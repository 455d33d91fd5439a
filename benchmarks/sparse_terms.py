"""Are a model's sparse terms words of the text they encode? Top terms and lexical grounding.

Usage::

    python benchmarks/sparse_terms.py --features sdray-demo/features/test \\
        --model d2s=sdray-demo/models/d2s --model joint=sdray-demo/models/joint [--init joint]

For each model it prints the heaviest word pieces of a few queries, then, over the captions and
images of ``--features`` (one split of ``sdray featurize`` output):

- ``text own-mass``: share of a caption's sparse weight on the caption's own word pieces;
- ``text own@10``: share of a caption's 10 heaviest terms that are its own word pieces;
- ``image cap@10``: share of an image's 10 heaviest terms that occur in one of its captions;
- ``text nnz`` / ``image nnz``: mean non-zero terms.

``--init NAME`` adds a row for model NAME's sparse head at initialisation (its config, fresh
heads: the vocabulary projector copied from the word embeddings, the transform random), the
baseline any learned grounding is measured against. Pure PyTorch on cached features: no Ray.
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np
import torch

QUERIES = ("a red circle", "two small blue squares", "a yellow triangle on a striped background",
           "a green star")
SPECIAL = ("[CLS]", "[SEP]", "[PAD]", "<s>", "</s>", "<pad>")


def own_tokens(input_ids, vocabulary) -> set[int]:
    return {int(t) for t in input_ids if vocabulary[int(t)] not in SPECIAL}


def grounding(model, cols: dict, n_top: int = 10) -> dict[str, float]:
    """Lexical grounding of ``model``'s sparse vectors on a split's captions and images."""
    vocab = model.vocabulary
    first: dict[str, int] = {}
    for row, cap in enumerate(cols["caption"]):
        first.setdefault(cap, row)
    rows = list(first.values())
    with torch.no_grad():
        txt = model.encode_text_features(cols["text_features"][rows]).sparse
    mass, own10 = [], []
    for j, r in enumerate(rows):
        own = own_tokens(cols["input_ids"][r], vocab)
        w = txt[j]
        total = float(w.sum())
        mass.append(sum(float(w[t]) for t in own) / total if total > 0 else 0.0)
        top = [int(t) for t in torch.topk(w, n_top).indices if w[t] > 0]
        own10.append(sum(t in own for t in top) / n_top)
    caps_of: dict[str, set[int]] = {}
    img_row: dict[str, int] = {}
    for row, iid in enumerate(cols["image_id"]):
        caps_of.setdefault(iid, set()).update(own_tokens(cols["input_ids"][row], vocab))
        img_row.setdefault(iid, row)
    iids = list(img_row)
    with torch.no_grad():
        img = model.encode_image_features(cols["image_features"][[img_row[i] for i in iids]]).sparse
    cap10 = []
    for j, iid in enumerate(iids):
        top = [int(t) for t in torch.topk(img[j], n_top).indices if img[j][t] > 0]
        cap10.append(sum(t in caps_of[iid] for t in top) / n_top)
    return {"text_own_mass": float(np.mean(mass)), "text_own_at_10": float(np.mean(own10)),
            "image_caption_at_10": float(np.mean(cap10)),
            "text_nnz": float((txt > 0).sum(1).float().mean()), "image_nnz": float((img > 0).sum(1).float().mean()),
            "n_captions": len(rows), "n_images": len(iids)}


def top_terms(model, queries, n: int = 6) -> list[str]:
    enc = model.encode_texts(list(queries))
    return [", ".join(t for t, _ in enc.top_terms(i, n)) for i in range(len(queries))]


def main(argv=None) -> int:
    from pipelines.evaluate import read_feature_columns
    from sdray.model import RetrievalModel

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--features", required=True, help="one split of feature shards (sdray featurize)")
    p.add_argument("--model", action="append", required=True, metavar="NAME=URI", help="repeatable")
    p.add_argument("--init", default=None, metavar="NAME", help="also NAME's sparse head at initialisation")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", action="store_true", help="one JSON line per model last")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    cols = read_feature_columns(args.features)
    models = {}
    for item in args.model:
        name, uri = item.split("=", 1)
        models[name] = RetrievalModel.load(uri)
    if args.init:
        torch.manual_seed(0)
        base = models[args.init]
        models[f"{args.init}@init"] = RetrievalModel.create(base.config)
    results = {}
    for name, model in models.items():
        results[name] = grounding(model, cols)
        print(f"\n{name}")
        for q, terms in zip(QUERIES, top_terms(model, QUERIES)):
            print(f"  {q!r:46} -> {terms}")
    print("\n| model | text own-mass | text own@10 | image cap@10 | text nnz | image nnz |")
    print("|---|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['text_own_mass']:.3f} | {r['text_own_at_10']:.3f} | "
              f"{r['image_caption_at_10']:.3f} | {r['text_nnz']:.0f} | {r['image_nnz']:.0f} |")
    first = next(iter(results.values()))
    print(f"({first['n_captions']} unique captions, {first['n_images']} images of {args.features})")
    if args.json:
        for name, r in results.items():
            print(json.dumps({"model": name, **r}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
