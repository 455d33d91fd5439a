"""A trained retriever as one artifact: config + heads, with the frozen backbone loaded on demand.

Layout of a model URI (local folder or ``s3://`` prefix)::

    config.yaml          the SdrayConfig it was trained with
    heads.safetensors    RetrieverHeads weights (projections, sparse head, tau)
    model.json           method, dims, vocabulary size, training summary

    README.md            model card (``save_pretrained`` / ``sdray train``; see sdray.model_card)

No pickle anywhere: weights are safetensors, metadata YAML/JSON. ``from_pretrained`` also takes a
Hugging Face Hub id (``user/name``), fetched through ``huggingface_hub`` (its cache and
``HF_HUB_OFFLINE`` apply).

Example::

    >>> from sdray import RetrievalModel
    >>> model = RetrievalModel.from_pretrained("sdray-demo/models/joint")   # doctest: +SKIP
    >>> emb = model.encode_texts(["a red circle"], batch_size=32)           # doctest: +SKIP
    >>> emb.dense.shape, emb.sparse.shape      # (1, D) and (1, |V|)        # doctest: +SKIP
    >>> emb.top_terms(0, 3)                    # [(word piece, weight)] x 3  # doctest: +SKIP

(docs/guide.md §10 has the same examples in a form a test runs.)
"""

from __future__ import annotations

import io
import os
import tempfile
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from sdray import config as config_lib
from sdray import storage
from sdray.backbones import Backbone, load_backbone, load_preprocessor
from sdray.config import SdrayConfig
from sdray.devices import module_device, to_module_device
from sdray.heads import Encoded, RetrieverHeads
from sdray.progress import Progress
from sdray.rng import seeded

HEADS_FILE = "heads.safetensors"
CONFIG_FILE = "config.yaml"
META_FILE = "model.json"


ImageInput = Image.Image | str | os.PathLike | bytes


@dataclass
class Embeddings(Encoded):
    """Encodings of B inputs plus the vocabulary that names sparse dimensions.

    ``dense``: (B, D) float32, L2-normalised; ``sparse``: (B, V) float32, non-negative, V = |vocab|.
    """

    vocabulary: Sequence[str] | None = None

    def __len__(self) -> int:
        return int(self.dense.shape[0])

    def top_terms(self, i: int, n: int = 10) -> list[tuple[str, float]]:
        """The ``n`` heaviest non-zero terms of row ``i``'s sparse vector as ``(word piece, weight)``."""
        row = self.sparse[i]
        nnz = int((row > 0).sum())
        weights, ids = torch.topk(row, min(n, nnz)) if nnz else (row[:0], row[:0].long())
        names = self.vocabulary
        return [(names[j] if names is not None else str(j), float(w))
                for j, w in zip(ids.tolist(), weights.tolist())]

    def sparse_nnz(self) -> torch.Tensor:
        """(B,) number of non-zero terms per row."""
        return (self.sparse > 0).sum(dim=1)


def open_image(image: ImageInput) -> Image.Image:
    """A PIL image from a PIL image, a file path or encoded bytes (JPEG, PNG, WebP ...)."""
    if isinstance(image, Image.Image):
        return image
    if isinstance(image, (bytes, bytearray, memoryview)):
        with Image.open(io.BytesIO(bytes(image))) as im:
            return im.convert("RGB")
    if isinstance(image, (str, os.PathLike)):
        with Image.open(image) as im:
            return im.convert("RGB")
    raise TypeError(f"an image must be a PIL image, a path or bytes, not {type(image).__name__}")


def _batches(items: Sequence[Any], batch_size: int) -> Iterable[Sequence[Any]]:
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    for start in range(0, len(items), batch_size):
        yield items[start:start + batch_size]


def build_heads(cfg: SdrayConfig, backbone: Backbone) -> RetrieverHeads:
    """Fresh heads: the backbone's own final layers and its word embeddings (DESIGN.md §1).

    The fresh sparse head is drawn from ``cfg.optim.seed`` alone (:func:`sdray.rng.seeded`: the
    global RNG is neither read nor advanced, and threads building heads at once do not mix); the
    packaged backbone's fresh projections come from the seed it was loaded with
    (``load_backbone(..., seed=cfg.optim.seed)``).
    """
    text_proj, vision_proj = backbone.initial_projections()
    with seeded(cfg.optim.seed):
        return RetrieverHeads(
            text_proj,
            vision_proj,
            backbone.word_embeddings(),
            tau_init=cfg.heads.tau_init,
            tau_range=(cfg.heads.tau_min, cfg.heads.tau_max),
            topk=(cfg.heads.topk_text, cfg.heads.topk_image),
            sparse_hidden=cfg.heads.sparse_hidden,
            init_vocab_from_embeddings=cfg.heads.init_vocab_from_embeddings,
        )


def _heads_like(cfg: SdrayConfig, state: dict[str, torch.Tensor]) -> RetrieverHeads:
    """Empty heads shaped after a saved state dict (no backbone needed).

    The modules' initial draws, which ``state`` then replaces, are taken under
    :func:`sdray.rng.seeded` so that they never land inside another thread's seeded construction.
    """
    tw, vw = state["text_proj.linear.weight"], state["vision_proj.linear.weight"]
    emb = state["sparse.vocab_projector.weight"]
    with seeded(0):
        heads = RetrieverHeads(
            torch.nn.Linear(tw.shape[1], tw.shape[0], bias="text_proj.linear.bias" in state),
            torch.nn.Linear(vw.shape[1], vw.shape[0], bias="vision_proj.linear.bias" in state),
            torch.zeros_like(emb),
            tau_range=(cfg.heads.tau_min, cfg.heads.tau_max),
            topk=(cfg.heads.topk_text, cfg.heads.topk_image),
        )
    heads.load_state_dict(state)
    return heads


class RetrievalModel:
    """Frozen backbone + trained :class:`RetrieverHeads`; encodes captions and images.

    ``encode_*_features`` work on pre-projection features (from feature shards) and never load the
    backbone; ``encode_texts``/``encode_images`` load it on first use.
    """

    def __init__(self, cfg: SdrayConfig, heads: RetrieverHeads, meta: dict | None = None,
                 backbone: Backbone | None = None):
        self.config = cfg
        self.heads = heads.eval()
        self.meta = dict(meta or {})
        self._backbone = backbone
        self._preprocessor = None

    @classmethod
    def create(cls, cfg: SdrayConfig, backbone: Backbone | None = None) -> "RetrievalModel":
        """Untrained model from ``cfg``: the backbone's projections, fresh sparse head."""
        backbone = backbone or load_backbone(cfg.backbone, proj_dim=cfg.heads.dense_dim,
                                             seed=cfg.optim.seed)
        return cls(cfg, build_heads(cfg, backbone), {"method": "untrained"}, backbone)

    @property
    def tau(self) -> float:
        return float(self.heads.tau.detach().cpu())

    @property
    def backbone(self) -> Backbone:
        if self._backbone is None:  # loaded on first use, beside the heads
            self._backbone = load_backbone(self.config.backbone, proj_dim=self.config.heads.dense_dim)
            self._backbone.to(module_device(self.heads))
        return self._backbone

    def to(self, device: str | torch.device) -> "RetrievalModel":
        """Put the heads (and the backbone, if loaded) on ``device``; returns ``self``."""
        self.heads.to(device)
        if self._backbone is not None:
            self._backbone.to(device)
        return self

    @property
    def preprocessor(self):
        if self._preprocessor is None:
            self._preprocessor = load_preprocessor(self.config.backbone)
        return self._preprocessor

    @property
    def vocabulary(self) -> list[str]:
        return self.preprocessor.vocabulary

    @torch.no_grad()
    def encode_text_features(self, features: torch.Tensor) -> Encoded:
        """(B, text_dim) -> Encoded (dense (B, D), sparse (B, V)) on the heads' device."""
        return self.heads.encode_text(to_module_device(features, self.heads, torch.float32))

    @torch.no_grad()
    def encode_image_features(self, features: torch.Tensor) -> Encoded:
        """(B, image_dim) -> Encoded (dense (B, D), sparse (B, V)) on the heads' device."""
        return self.heads.encode_image(to_module_device(features, self.heads, torch.float32))

    def _device(self, device: str | torch.device | None) -> torch.device:
        dev = torch.device(device) if device is not None else next(self.heads.parameters()).device
        self.heads.to(dev)
        return dev

    @torch.no_grad()
    def _encode(self, items: Sequence[Any], batch_size: int, device, show_progress: bool, desc: str,
                features) -> Embeddings:
        dev = self._device(device)
        dense, sparse = [], []
        bar = Progress(desc, len(items), "inputs", enabled=show_progress)
        for batch in _batches(items, batch_size):
            enc = features(batch, dev)
            dense.append(enc.dense.cpu())
            sparse.append(enc.sparse.cpu())
            bar.update(len(batch))
        bar.close()
        if not dense:
            d = self.heads.text_proj.linear.out_features
            v = self.heads.sparse.vocab_projector.out_features
            dense, sparse = [torch.zeros(0, d)], [torch.zeros(0, v)]
        return Embeddings(torch.cat(dense), torch.cat(sparse), self.vocabulary)

    def encode_texts(self, texts: Sequence[str] | str, batch_size: int = 64,
                     device: str | torch.device | None = None, show_progress: bool = False) -> Embeddings:
        """Encode captions (or one caption) with the frozen text tower and the trained heads.

        Args:
            texts: B strings (a single string counts as a batch of one).
            batch_size: captions per forward pass.
            device: e.g. ``"cuda"``; default: where the heads are (CPU after loading).
            show_progress: print a progress bar / periodic lines to stderr.

        Returns:
            :class:`Embeddings` with ``dense`` (B, D) and ``sparse`` (B, V) on the CPU.
        """
        texts = [texts] if isinstance(texts, str) else list(texts)

        def features(batch, dev):
            enc = self.preprocessor.texts(list(batch))
            backbone = self.backbone.to(dev)
            feats = backbone.token_features(to_module_device(enc["input_ids"], backbone),
                                            to_module_device(enc["attention_mask"], backbone))
            return self.heads.encode_text(feats.float())

        return self._encode(texts, batch_size, device, show_progress, "encode texts", features)

    def encode_images(self, images: Sequence[ImageInput] | ImageInput, batch_size: int = 32,
                      device: str | torch.device | None = None, show_progress: bool = False) -> Embeddings:
        """Encode images with the frozen image tower and the trained heads.

        Args:
            images: B items, each a PIL image, a file path or encoded image bytes (one item alone
                counts as a batch of one).
            batch_size: images per forward pass.
            device: e.g. ``"cuda"``; default: where the heads are.
            show_progress: print a progress bar / periodic lines to stderr.

        Returns:
            :class:`Embeddings` with ``dense`` (B, D) and ``sparse`` (B, V) on the CPU.
        """
        single = isinstance(images, (Image.Image, str, bytes, bytearray, os.PathLike))
        images = [images] if single else list(images)

        def features(batch, dev):
            backbone = self.backbone.to(dev)
            pixels = to_module_device(self.preprocessor.pixels_uint8([open_image(x) for x in batch]),
                                      backbone)
            return self.heads.encode_image(backbone.pixel_features(pixels).float())

        return self._encode(images, batch_size, device, show_progress, "encode images", features)

    def save(self, uri: str) -> None:
        """Write config, heads and metadata to ``uri`` (local folder or s3:// prefix)."""
        state = {k: v.detach().contiguous() for k, v in self.heads.state_dict().items()}
        with tempfile.TemporaryDirectory() as tmp:
            save_file(state, os.path.join(tmp, HEADS_FILE))
            config_lib.save(self.config, os.path.join(tmp, CONFIG_FILE))
            storage.upload_dir(tmp, uri)
        storage.write_json(storage.join(uri, META_FILE), self.meta)

    @classmethod
    def load(cls, uri: str) -> "RetrievalModel":
        """Read a model written by :meth:`save`; errors name the missing or bad file."""
        for name in (HEADS_FILE, CONFIG_FILE, META_FILE):
            if not storage.exists(storage.join(uri, name)):
                raise FileNotFoundError(f"not a sdray model: {storage.join(uri, name)} is missing")
        cfg = config_lib.loads(storage.read_bytes(storage.join(uri, CONFIG_FILE)).decode("utf-8"))
        with tempfile.TemporaryDirectory() as tmp:
            local = os.path.join(tmp, HEADS_FILE)
            with open(local, "wb") as f:
                f.write(storage.read_bytes(storage.join(uri, HEADS_FILE)))
            state = load_file(local)
        return cls(cfg, _heads_like(cfg, state), storage.read_json(storage.join(uri, META_FILE)))

    # ---- Hub-style folders ----------------------------------------------------------------------
    def save_pretrained(self, directory: str, card: bool = True, **card_info: Any) -> None:
        """:meth:`save` plus a ``README.md`` model card (Hub layout; ``directory`` may be s3://).

        ``card_info`` goes to :func:`sdray.model_card.render` (``summary``, ``test``, ``data``).
        """
        from sdray.model_card import write_model_card

        self.save(directory)
        if card:
            write_model_card(directory, **card_info)

    @classmethod
    def from_pretrained(cls, name_or_path: str, revision: str | None = None,
                        cache_dir: str | None = None, token: str | bool | None = None) -> "RetrievalModel":
        """Load from a local folder, an ``s3://`` prefix or a Hugging Face Hub id (``user/name``).

        Hub ids go through ``huggingface_hub.snapshot_download`` (its cache, ``HF_HOME`` and
        ``HF_HUB_OFFLINE=1`` apply); the backbone named in the model's config is loaded when the
        model first encodes raw text or images.
        """
        if storage.is_remote(name_or_path) or os.path.isdir(name_or_path):
            return cls.load(name_or_path)
        if not _looks_like_hub_id(name_or_path):
            raise FileNotFoundError(f"{name_or_path}: no such model folder (and not a Hub id user/name)")
        from huggingface_hub import snapshot_download

        local = snapshot_download(name_or_path, revision=revision, cache_dir=cache_dir, token=token,
                                  allow_patterns=[HEADS_FILE, CONFIG_FILE, META_FILE, "README.md"])
        return cls.load(local)


def _looks_like_hub_id(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "/", "~"))
