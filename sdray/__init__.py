"""sdray: joint sparse-dense text-image retrievers (Song et al., CIKM 2025) on Ray.

The Python API (imported lazily, so ``import sdray`` stays light)::

    from sdray import RetrievalModel, Retriever, __version__

    model = RetrievalModel.from_pretrained("sdray-demo/models/joint")  # folder, s3:// or Hub id
    emb = model.encode_texts(["a red circle"])      # Embeddings: dense (1, D), sparse (1, |V|)
    emb.top_terms(0, 5)                             # [(word piece, weight), ...]
    retriever = Retriever.load("sdray-demo/index", model=model)
    hits = retriever.search(text="a red circle", k=10, mode="hybrid")[0]

See docs/guide.md, "Python API".
"""

from __future__ import annotations

import importlib
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("sdray")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

_LAZY = {
    "RetrievalModel": "sdray.model",
    "Embeddings": "sdray.model",
    "Retriever": "sdray.index.retriever",
    "Hit": "sdray.index.retriever",
    "SdrayConfig": "sdray.config",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'sdray' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
