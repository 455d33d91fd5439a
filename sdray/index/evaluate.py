"""Evaluate a retriever *through a published index* (``sdray eval --index URI``).

Same protocol and result shape as the brute-force :func:`sdray.evaluation.evaluate_features`
(DESIGN.md §4): images deduplicated by ``image_id``, captions by exact text, a caption relevant
to an image when some sample pairs them, R@1/5/10 and MRR@10 with the pessimistic tie rule of
:mod:`sdray.metrics`, sparsity and FLOPs of the query encodings. Queries are the split's captions
(text→image, searched against the index's ``images`` side) and images (image→text, against the
``captions`` side); a hit is relevant when its ``image_id`` (images side) or ``caption`` text
(captions side) is paired with the query in the split. Indexed items absent from the split count
as non-relevant.

Exactness: with a flat FAISS index and the exact sparse scorer (small shards, or
``sparse.kind='exact'``) dense and sparse numbers equal brute force on the same data. Hybrid
equals brute force when the candidate union (``candidates`` per index) holds every document that
can reach the top 10 — always true when ``candidates`` >= the side's document count. Ties: each
query's top list is extended until the tie at the relevant item's score is fully seen, so the
pessimistic rank is exact.

Pure NumPy/PyTorch (no Ray).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from sdray.index.retriever import MODES, Retriever

KS = (1, 5, 10)
MRR_K = 10


def _ranks(retriever: Retriever, side: str, mode: str, dense, sparse, relevant_keys: list[set],
           key_of, present: list[int], n_docs: int, candidates: int | None) -> np.ndarray:
    """Pessimistic 1-based rank of the first relevant document per query (0: none relevant;
    ``MRR_K + 1`` stands for "beyond the top 10")."""
    from sdray.index.csr import to_csr

    b = len(relevant_keys)
    ranks = np.zeros(b, np.int64)
    todo = [q for q in range(b) if present[q] > 0]
    k = min(max(KS + (MRR_K,)), max(n_docs, 1))
    sq = None if sparse is None else to_csr(sparse)
    while todo:
        qd = None if dense is None else dense[todo]
        qs = None if sq is None else sq.take(todo)
        hits = retriever.search(dense=qd, sparse=qs, k=k, mode=mode, side=side, candidates=candidates)
        again = []
        for q, lst in zip(todo, hits):
            rel = relevant_keys[q]
            flags = [key_of(h) in rel for h in lst]
            scores = np.asarray([h.score for h in lst], np.float64)
            if any(flags):
                j = flags.index(True)
                best = scores[j]
                est = 1 + int((scores > best).sum()) + int(sum(1 for s, f in zip(scores, flags) if s == best and not f))
                tie_open = len(lst) == k and k < n_docs and scores[-1] == best
                if est <= MRR_K and tie_open:
                    again.append(q)
                    continue
                ranks[q] = est if est <= MRR_K else MRR_K + 1
            elif len(lst) >= k or len(lst) >= MRR_K:
                ranks[q] = MRR_K + 1     # k listed documents all score >= every relevant one
            else:
                # fewer hits than asked: every unlisted document scored zero (sparse search lists
                # positive scores only) and the relevant ones are among them
                ranks[q] = min(MRR_K + 1, 1 + len(lst) + (n_docs - len(lst) - present[q]))
        todo = again
        if todo:
            k = min(k * 4, n_docs)
    return ranks


def _metrics(ranks: np.ndarray) -> dict[str, float]:
    from sdray.metrics import metrics_from_ranks

    return metrics_from_ranks(ranks, KS, MRR_K)


def evaluate_index(retriever: Retriever, heads: Any, data: dict[str, Any], cfg: Any = None,
                   *, modes: tuple[str, ...] = MODES, candidates: int | None = None,
                   fusion: dict | None = None) -> dict[str, Any]:
    """DESIGN.md §4 eval object of ``heads`` on a split, searching ``retriever`` (both sides).

    Args:
        retriever: a loaded index with ``images`` and/or ``captions`` sides (a missing side's
            direction is left out of the result).
        heads: the model's :class:`~sdray.heads.RetrieverHeads` (queries are encoded with it,
            exactly as brute-force evaluation encodes them).
        data: split feature columns ``text_features, image_features, image_id, caption``.
        cfg: the model config; its fusion is used when given (else the index manifest's).
        candidates: hybrid candidate depth per index (default: the index config's).
    """
    from sdray.evaluation import dedupe, encode, fusion_params
    from sdray.metrics import flops, mean_nnz

    image_ids = [str(x) for x in data["image_id"]]
    captions = [str(c) for c in data["caption"]]
    image_rows, text_rows, pairs = dedupe(image_ids, captions)
    u_images = [image_ids[r] for r in image_rows]
    u_caps = [captions[r] for r in text_rows]
    txt_dense, txt_sparse = encode(heads, np.asarray(data["text_features"], np.float32)[text_rows], "text")
    img_dense, img_sparse = encode(heads, np.asarray(data["image_features"], np.float32)[image_rows], "image")
    tau = float(heads.tau.detach())
    fparams = dict(fusion) if fusion else (fusion_params(cfg, tau) if cfg is not None else dict(retriever.fusion))

    caps_of_image: list[set] = [set() for _ in u_images]     # caption texts paired with image i
    images_of_cap: list[set] = [set() for _ in u_caps]       # image ids paired with caption j
    for i, j in pairs:
        caps_of_image[i].add(u_caps[j])
        images_of_cap[j].add(u_images[i])

    def indexed(side: str, col: str) -> set:
        return {v for shard in retriever.shards.get(side, []) for v in shard.meta[col]}

    def _np(x):
        return x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)

    def _csr(t):
        import scipy.sparse as sp

        t = t.to_sparse_csr() if t.layout != __import__("torch").sparse_csr else t
        return sp.csr_matrix((_np(t.values()), _np(t.col_indices()), _np(t.crow_indices())), shape=tuple(t.shape))

    result: dict[str, Any] = {"t2i": {}, "i2t": {}}
    jobs = []
    if "images" in retriever.shards:
        in_index = indexed("images", "image_id")
        present = [len(s & in_index) for s in images_of_cap]
        jobs.append(("t2i", "images", _np(txt_dense), _csr(txt_sparse), images_of_cap,
                     lambda h: h.image_id, present, retriever.count("images")))
    if "captions" in retriever.shards:
        in_index = indexed("captions", "caption")
        present = [len(s & in_index) for s in caps_of_image]
        jobs.append(("i2t", "captions", _np(img_dense), _csr(img_sparse), caps_of_image,
                     lambda h: h.caption, present, retriever.count("captions")))
    saved_fusion = retriever.fusion
    retriever.fusion = {**retriever.fusion, **fparams}
    try:
        for direction, side, dq, sq, rel, key_of, present, n_docs in jobs:
            if not any(present):
                continue
            for mode in modes:
                ranks = _ranks(retriever, side, mode, dq, sq, rel, key_of, present, n_docs, candidates)
                result[direction][mode] = _metrics(ranks)
    finally:
        retriever.fusion = saved_fusion
    result["sparsity"] = {"text_nnz": mean_nnz(txt_sparse), "image_nnz": mean_nnz(img_sparse),
                          "flops": flops(txt_sparse, img_sparse)}
    result["n_texts"] = len(u_caps)
    result["n_images"] = len(u_images)
    result["fusion"] = dict(fparams)
    result["tau"] = tau
    result["index"] = {"version": retriever.manifest.get("version"),
                       "counts": {s: retriever.count(s) for s in retriever.sides}}
    return result


def evaluate_index_uri(index_uri: str, model: Any, data: dict[str, Any], cfg: Any = None,
                       **kw: Any) -> dict[str, Any]:
    """Load the published index at ``index_uri`` and run :func:`evaluate_index`."""
    retriever = Retriever.load(index_uri)
    try:
        return evaluate_index(retriever, model.heads, data, cfg if cfg is not None else model.config, **kw)
    finally:
        retriever.close()
