"""Sharded dense (FAISS) + sparse (Seismic / exact CSR) indexes, their on-storage layout and the
:class:`Retriever` that searches them. Pure NumPy/FAISS/Seismic: importable without Ray."""

from sdray.index.build import build_index, build_shard, shard_of, split
from sdray.index.config import DenseIndexConfig, IndexConfig, SparseIndexConfig
from sdray.index.csr import CSR, ExactSparseIndex, concat, to_csr
from sdray.index.dense import DenseIndex
from sdray.index.manifest import current_version, load_manifest, publish
from sdray.index.retriever import Hit, Retriever
from sdray.index.shard import IndexFileError, Shard, ShardData
from sdray.index.sparse import SeismicIndex

__all__ = [
    "CSR", "DenseIndex", "DenseIndexConfig", "ExactSparseIndex", "Hit", "IndexConfig", "IndexFileError",
    "Retriever", "SeismicIndex", "Shard", "ShardData", "SparseIndexConfig", "build_index", "build_shard",
    "concat", "current_version", "load_manifest", "publish", "shard_of", "split", "to_csr",
]
