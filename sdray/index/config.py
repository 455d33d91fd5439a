"""Index knobs: which FAISS index, Seismic build/search parameters and the hybrid candidate depth.

The lead hooks :class:`IndexConfig` into :class:`sdray.config.SdrayConfig` as ``index``; it is
also stored in every manifest so that a reader searches with the parameters the index was built for.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


#: documents per shard from which ``auto`` builds IVF instead of flat (benchmarks/dense_kind.py)
IVF_MIN_DOCS = 20_000


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DenseIndexConfig(_Strict):
    """FAISS inner-product index over L2-normalised vectors (cosine)."""

    kind: Literal["auto", "flat", "ivf", "hnsw"] = Field(
        "auto", description="auto: flat below ivf_min_docs documents per shard, ivf from there.")
    ivf_min_docs: int = Field(
        IVF_MIN_DOCS, ge=1,
        description="auto switches to IVF at this many documents per shard (measured: "
        "benchmarks/dense_kind.py, docs/guide.md).")
    gpu: bool = Field(
        True, description="Train and fill IVF indexes on a GPU when faiss has GPU support and one "
        "is visible (a no-op otherwise).")
    nlist: int = Field(1024, ge=1, description="IVF lists (capped at n_docs/39 per shard).")
    nprobe: int = Field(32, ge=1, description="IVF lists probed per query.")
    M: int = Field(32, ge=2, le=256, description="HNSW neighbours per node.")
    ef_construction: int = Field(200, ge=1, description="HNSW build beam.")
    ef_search: int = Field(128, ge=1, description="HNSW search beam.")


class SparseIndexConfig(_Strict):
    """Seismic (pyseismic-lsr) build and search parameters; ``kind='exact'`` uses only the CSR scorer."""

    kind: Literal["seismic", "exact"] = "seismic"
    n_postings: int = Field(
        0, ge=0, description="Seismic n_postings; 0: mean posting-list length of the shard (at least 500)."
    )
    centroid_fraction: float = Field(0.1, gt=0.0, le=1.0)
    min_cluster_size: int = Field(2, ge=1)
    summary_energy: float = Field(0.4, gt=0.0, le=1.0)
    max_fraction: float = Field(1.5, ge=1.0)
    doc_cut: int = Field(15, ge=1)
    query_cut: int = Field(20, ge=1, description="Query terms kept (heaviest first) at search time.")
    heap_factor: float = Field(0.8, gt=0.0, le=1.0, description="Seismic block-skipping factor.")
    min_docs: int = Field(
        1000, ge=0, description="Shards with fewer documents use the exact CSR scorer (Seismic gains nothing)."
    )


class IndexConfig(_Strict):
    """Everything the index build and the :class:`~sdray.index.retriever.Retriever` need."""

    dense: DenseIndexConfig = DenseIndexConfig()
    sparse: SparseIndexConfig = SparseIndexConfig()
    candidates: int = Field(
        100, ge=1, description="Hybrid candidate depth k' per index (dense and sparse), before exact rescoring."
    )
    threads: int = Field(0, ge=0, description="Search threads per shard; 0: library default.")
    verify_checksums: bool = Field(True, description="Check sha256 of every shard file on load.")
    max_docs_per_shard: int = Field(
        200_000, ge=1,
        description="Build: shards = ceil(corpus samples / this) when no shard count is given, so a "
        "shard side holds about this many documents or fewer. Sized for <= 2 GB of files per shard "
        "side at the 256-term nnz budget: ~9.7 KB a document (1 KB FAISS flat + 2 KB stored CSR + "
        "~6.6 KB Seismic at 25.7 B/term, measured at 1M; docs/benchmarks.md).")
