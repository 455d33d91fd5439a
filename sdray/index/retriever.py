"""`Retriever`: load a sharded index (all shards or a subset) from any URI and search it.

Modes (DESIGN.md §1 scoring): ``dense`` = cosine, ``sparse`` = dot product, ``hybrid`` = fusion
of both through :mod:`sdray.fusion` (``raw``, ``calibrated`` or ``rrf``).

Shards are merged exactly. Every score that decides a ranking is recomputed exactly from the
stored vectors (FAISS vectors, stored CSR), and ties are broken by the global ``doc_no``, so an
index split into N shards returns what one shard returns whenever the per-shard indexes are exact
(FAISS flat, exact sparse scorer). Hybrid search:

1. each shard returns its dense top-k' and sparse top-k' (k' = ``config.candidates``);
2. these are merged into the global dense top-k' and the global sparse top-k';
3. their union is rescored exactly (cosine and sparse dot product for every candidate), fused,
   and the top-k kept. With exact per-index search this equals the exact fused top-k whenever
   the exact top-k lies in the union — which is capped by k' (measure it: benchmarks/index.py).

Direction: the ``images`` side answers text queries, the ``captions`` side image queries.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from sdray import storage
from sdray.index import manifest as mf
from sdray.index.config import IndexConfig
from sdray.index.csr import CSR, to_csr
from sdray.index.shard import SIDES, IndexFileError, Shard, read_index_json

MODES = ("dense", "sparse", "hybrid")


@dataclass
class Hit:
    """One search result."""

    id: str
    score: float
    scores: dict[str, float]
    image_id: str | None = None
    caption: str | None = None
    uri: str | None = None
    url: str | None = None
    doc_no: int = -1
    shard: int = -1
    row: int = -1
    explanation: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {
            "id": self.id,
            "image_id": self.image_id,
            "caption": self.caption,
            "uri": self.uri,
            "url": self.url,
            "score": self.score,
            "scores": self.scores,
            "explanation": self.explanation,
        }


class Retriever:
    """Search over shards of one or both sides.

    Build one with :meth:`load` (from a published index) or :meth:`from_shards` (in memory).
    """

    def __init__(
        self,
        shards: dict[str, list[Shard]],
        config: IndexConfig | None = None,
        fusion: dict | None = None,
        vocabulary: list[str] | None = None,
        manifest: dict | None = None,
        shard_ids: dict[str, list[int]] | None = None,
        model: Any = None,
    ):
        self.model = model
        self.shards = {s: v for s, v in shards.items() if v}
        self.config = config or IndexConfig()
        self.fusion = dict(fusion or {"method": "calibrated", "w1": 1.0, "w2": 1.0, "tau": 0.07})
        self.vocabulary = vocabulary
        self.manifest = manifest or {}
        self.shard_ids = shard_ids or {s: list(range(len(v))) for s, v in self.shards.items()}
        workers = max(1, min(8, max((len(v) for v in self.shards.values()), default=1)))
        self._pool = ThreadPoolExecutor(workers) if workers > 1 else None

    # ---- construction -----------------------------------------------------------------------
    @classmethod
    def from_shards(cls, shards: dict[str, list[Shard]], **kw: Any) -> "Retriever":
        return cls(shards, **kw)

    @classmethod
    def load(
        cls,
        uri: str,
        shards: Sequence[int] | None = None,
        sides: Sequence[str] | None = None,
        version: str | None = None,
        config: IndexConfig | dict | None = None,
        verify: bool | None = None,
        model: Any = None,
    ) -> "Retriever":
        """Load the published version at ``uri`` (or ``uri`` = a version folder, or ``version``).

        ``shards``: indices of the shards to load (default all); ``sides``: ``images``,
        ``captions`` or both (default: what the index has). ``config`` overrides search-time
        knobs (candidates, nprobe, efSearch, query_cut, heap_factor); build-time ones are ignored.
        ``model``: the :class:`sdray.model.RetrievalModel` that encodes ``search(text=|image=)``
        queries (default: loaded on first use from the model URI the manifest names).
        """
        out, v = mf.index_root(uri)
        version = version or v
        manifest = mf.load_manifest(out, version)
        version = manifest["version"]
        cfg = IndexConfig.model_validate(manifest.get("config") or {})
        if config is not None:
            over = config.model_dump() if isinstance(config, IndexConfig) else dict(config)
            cfg = IndexConfig.model_validate(_deep_merge(cfg.model_dump(), over))
        entries = manifest["shards"]
        wanted = list(range(len(entries))) if shards is None else [int(i) for i in shards]
        for i in wanted:
            if not 0 <= i < len(entries):
                raise ValueError(f"shard {i} does not exist (index has {len(entries)} shards)")
        side_list = list(sides) if sides else list(manifest.get("sides", {}))
        jobs = [(side, i) for side in side_list for i in wanted if side in entries[i]["sides"]]

        def load_one(job):
            side, i = job
            return Shard.load(
                mf.shard_uri(out, version, entries[i]["name"], side),
                cfg,
                expected=entries[i]["sides"][side],
                verify=verify,
                name=entries[i]["name"],
            )

        with ThreadPoolExecutor(max(1, min(8, len(jobs)))) as pool:
            loaded = list(pool.map(load_one, jobs))
        by_side: dict[str, list[Shard]] = {s: [] for s in side_list}
        ids: dict[str, list[int]] = {s: [] for s in side_list}
        for (side, i), shard in zip(jobs, loaded):
            by_side[side].append(shard)
            ids[side].append(i)
        vocab = None
        if manifest.get("vocab"):
            vocab = read_index_json(storage.join(out, version, manifest["vocab"]))
        return cls(by_side, cfg, manifest.get("fusion") or None, vocab, manifest, ids, model)

    # ---- searching ----------------------------------------------------------------------------
    @property
    def sides(self) -> list[str]:
        return list(self.shards)

    def count(self, side: str) -> int:
        return sum(len(s) for s in self.shards.get(side, []))

    def _map(self, fn, items):
        if self._pool is None or len(items) < 2:
            return [fn(x) for x in items]
        return list(self._pool.map(fn, items))

    def search(
        self,
        dense: Any = None,
        sparse: Any = None,
        k: int = 10,
        mode: str = "hybrid",
        side: str = "images",
        candidates: int | None = None,
        fusion: dict | None = None,
        explain: int = 0,
        *,
        text: str | Sequence[str] | None = None,
        image: Any = None,
    ) -> list[list[Hit]]:
        """Top-``k`` hits per query, from raw queries or encoded ones.

        Raw: ``text`` (a caption or B captions; searches the images) or ``image`` (a PIL image,
        path or bytes, or a list of B; searches the captions), encoded with :attr:`model`.
        Encoded: ``dense (B, D)`` L2-normalised and/or ``sparse (B, V)`` (tensor, array, scipy or
        CSR) on ``side``: ``images`` (text queries) or ``captions`` (image queries).
        ``mode``: ``dense``, ``sparse`` or ``hybrid``. ``explain`` > 0 adds that many shared
        sparse terms per hit. Returns B lists of at most ``k`` :class:`Hit`, best first.

        Example (docs/guide.md §10 runs it)::

            retriever = Retriever.load("sdray-demo/index")   # model: the one the manifest names
            hits = retriever.search(text="a red circle", k=3)[0]
        """
        if text is not None or image is not None:
            if text is not None and image is not None:
                raise ValueError("give text= or image=, not both")
            if dense is not None or sparse is not None:
                raise ValueError("give raw queries (text=/image=) or encoded ones (dense=/sparse=), not both")
            model = self.query_model()
            if text is not None:
                enc, side = model.encode_texts(text), "images"
            else:
                enc, side = model.encode_images(image), "captions"
            dense, sparse = enc.dense, enc.sparse
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if side not in self.shards:
            raise ValueError(f"this index has no '{side}' side (it has {self.sides})")
        shards = self.shards[side]
        dq = None if dense is None else _as_f32(dense)
        sq = None if sparse is None else to_csr(sparse, dim=shards[0].docs.dim)
        if mode in ("dense", "hybrid") and dq is None:
            raise ValueError(f"mode '{mode}' needs dense query vectors")
        if mode in ("sparse", "hybrid") and sq is None:
            raise ValueError(f"mode '{mode}' needs sparse query vectors")
        b = len(dq) if dq is not None else sq.n_rows
        if dq is not None and sq is not None and sq.n_rows != b:
            raise ValueError(f"{b} dense queries but {sq.n_rows} sparse queries")
        fusion = {**self.fusion, **(fusion or {})}
        kc = max(k, candidates or self.config.candidates)

        if mode == "dense":
            per = self._map(lambda s: s.search_dense(dq, k), shards)
            lists = self._merge(per, b, k, lambda si, r, ids: shards[si].score_dense(dq[r], ids), shards)
            out = [[(loc, {"dense": sc}, sc) for loc, sc in lst] for lst in lists]
        elif mode == "sparse":
            per = self._map(lambda s: s.search_sparse(sq, k), shards)
            lists = self._merge(per, b, k, lambda si, r, ids: shards[si].score_sparse(sq.take([r]), ids), shards)
            out = [[(loc, {"sparse": sc}, sc) for loc, sc in lst] for lst in lists]
        else:
            out = self._hybrid(dq, sq, b, k, kc, fusion, shards)
        return [[self._hit(side, loc, scores, score, sq, r, explain) for loc, scores, score in q] for r, q in enumerate(out)]

    def _merge(self, per, b, k, rescore, shards):
        """Global top-k per query from per-shard candidates, rescored exactly, ties by doc_no."""
        shards_n = len(per)
        results = []
        for r in range(b):
            locs, scores, keys = [], [], []
            for si in range(shards_n):
                ids = per[si][1][r]
                ids = ids[ids >= 0]
                if not len(ids):
                    continue
                sc = rescore(si, r, ids)
                locs.extend((si, int(i)) for i in ids)
                scores.append(sc)
                keys.append(shards[si].doc_no[ids])
            if not locs:
                results.append([])
                continue
            scores = np.concatenate(scores)
            keys = np.concatenate(keys)
            order = np.lexsort((keys, -scores))[:k]
            results.append([(locs[j], float(scores[j])) for j in order])
        return results

    def _hybrid(self, dq, sq, b, k, kc, fusion, shards):
        from sdray.fusion import fuse_candidates

        per_d = self._map(lambda s: s.search_dense(dq, kc), shards)
        per_s = self._map(lambda s: s.search_sparse(sq, kc), shards)
        d_lists = self._merge(per_d, b, kc, lambda si, r, ids: shards[si].score_dense(dq[r], ids), shards)
        s_lists = self._merge(per_s, b, kc, lambda si, r, ids: shards[si].score_sparse(sq.take([r]), ids), shards)
        params = {key: fusion[key] for key in ("w1", "w2", "tau", "normalize", "k_rrf", "confidence_power", "cosine_slope", "cosine_pivot") if key in fusion}
        out = []
        for r in range(b):
            dense_known = {loc: sc for loc, sc in d_lists[r]}
            sparse_known = {loc: sc for loc, sc in s_lists[r]}
            union = list(dict.fromkeys([loc for loc, _ in d_lists[r]] + [loc for loc, _ in s_lists[r]]))
            if not union:
                out.append([])
                continue
            dvals = np.zeros(len(union), np.float32)
            svals = np.zeros(len(union), np.float32)
            q_sparse = sq.take([r])
            by_shard: dict[int, list[int]] = {}
            for j, loc in enumerate(union):
                if loc in dense_known:
                    dvals[j] = dense_known[loc]
                if loc in sparse_known:
                    svals[j] = sparse_known[loc]
                by_shard.setdefault(loc[0], []).append(j)
            for si, js in by_shard.items():
                rows = np.array([union[j][1] for j in js], np.int64)
                need_d = [n for n, j in enumerate(js) if union[j] not in dense_known]
                need_s = [n for n, j in enumerate(js) if union[j] not in sparse_known]
                if need_d:
                    dvals[np.array(js)[need_d]] = shards[si].score_dense(dq[r], rows[need_d])
                if need_s:
                    svals[np.array(js)[need_s]] = shards[si].score_sparse(q_sparse, rows[need_s])
            keys = np.array([shards[loc[0]].doc_no[loc[1]] for loc in union], np.int64)
            ids, fused = fuse_candidates(
                [keys], [dvals.astype(np.float64)], [svals.astype(np.float64)], method=fusion.get("method", "calibrated"), k=k, **params
            )[0]
            pos = {int(key): j for j, key in enumerate(keys)}
            out.append(
                [
                    (union[pos[int(key)]], {"dense": float(dvals[pos[int(key)]]), "sparse": float(svals[pos[int(key)]])}, float(f))
                    for key, f in zip(ids, fused)
                ]
            )
        return out

    def _hit(self, side, loc, scores, score, sq, r, explain) -> Hit:
        si, row = loc
        shard = self.shards[side][si]
        meta = shard.row_meta(row)
        hit = Hit(
            id=meta["id"],
            score=float(score),
            scores=scores,
            image_id=meta["image_id"],
            caption=meta["caption"],
            uri=meta["uri"],
            url=meta.get("url"),
            doc_no=int(shard.doc_no[row]),
            shard=self.shard_ids[side][si],
            row=row,
        )
        if explain and sq is not None:
            hit.explanation = shard.explain(sq.take([r]), row, self.vocabulary, explain)
        return hit

    # ---- model-level conveniences -------------------------------------------------------------
    def query_model(self) -> Any:
        """The model that encodes raw queries: the one given, else the manifest's model URI."""
        if self.model is None:
            uri = self.manifest.get("model")
            if not uri:
                raise ValueError("this index names no model; pass model= to Retriever.load")
            from sdray.model import RetrievalModel

            self.model = RetrievalModel.load(uri)
        return self.model

    def search_encoded(self, encoded: Any, query_modality: str, **kw: Any) -> list[list[Hit]]:
        """Search with an ``Encoded`` (``.dense``, ``.sparse``): text queries hit the images side."""
        side = {"text": "images", "image": "captions"}[query_modality]
        return self.search(dense=encoded.dense, sparse=encoded.sparse, side=side, **kw)

    def search_text(self, model: Any, texts: list[str], **kw: Any) -> list[list[Hit]]:
        """Encode captions with ``model`` (``sdray.model.RetrievalModel``) and search the images."""
        return self.search_encoded(model.encode_texts(list(texts)), "text", **kw)

    def search_images(self, model: Any, images: list[Any], **kw: Any) -> list[list[Hit]]:
        """Encode PIL images with ``model`` and search the captions."""
        return self.search_encoded(model.encode_images(list(images)), "image", **kw)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False)


def _as_f32(x) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    x = np.ascontiguousarray(x, dtype=np.float32)
    return x[None] if x.ndim == 1 else x


def _deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for key, val in over.items():
        out[key] = _deep_merge(out[key], val) if isinstance(val, dict) and isinstance(out.get(key), dict) else val
    return out
