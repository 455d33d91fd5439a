"""A trained retriever as one artifact: config + heads, with the frozen backbone loaded on demand.

Layout of a model URI (local folder or ``s3://`` prefix)::

    config.yaml          the SdrayConfig it was trained with
    heads.safetensors    RetrieverHeads weights (projections, sparse head, tau)
    model.json           method, dims, vocabulary size, training summary

No pickle anywhere: weights are safetensors, metadata YAML/JSON.
"""

from __future__ import annotations

import os
import tempfile

import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from sdray import config as config_lib
from sdray import storage
from sdray.backbones import Backbone, load_backbone, load_preprocessor
from sdray.config import SdrayConfig
from sdray.heads import Encoded, RetrieverHeads

HEADS_FILE = "heads.safetensors"
CONFIG_FILE = "config.yaml"
META_FILE = "model.json"


def build_heads(cfg: SdrayConfig, backbone: Backbone) -> RetrieverHeads:
    """Fresh heads: the backbone's own final layers and its word embeddings (DESIGN.md §1).

    The fresh sparse head is drawn from ``cfg.optim.seed`` alone (a forked RNG: the global one is
    neither read nor advanced); the packaged backbone's fresh projections come from the seed it
    was loaded with (``load_backbone(..., seed=cfg.optim.seed)``).
    """
    text_proj, vision_proj = backbone.initial_projections()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.optim.seed)
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
    """Empty heads shaped after a saved state dict (no backbone needed)."""
    tw, vw = state["text_proj.linear.weight"], state["vision_proj.linear.weight"]
    emb = state["sparse.vocab_projector.weight"]
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
        return float(self.heads.tau.detach())

    @property
    def backbone(self) -> Backbone:
        if self._backbone is None:
            self._backbone = load_backbone(self.config.backbone, proj_dim=self.config.heads.dense_dim)
        return self._backbone

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
        """(B, text_dim) -> Encoded (dense (B, D), sparse (B, V))."""
        return self.heads.encode_text(torch.as_tensor(features, dtype=torch.float32))

    @torch.no_grad()
    def encode_image_features(self, features: torch.Tensor) -> Encoded:
        """(B, image_dim) -> Encoded (dense (B, D), sparse (B, V))."""
        return self.heads.encode_image(torch.as_tensor(features, dtype=torch.float32))

    @torch.no_grad()
    def encode_texts(self, captions: list[str]) -> Encoded:
        batch = self.preprocessor.texts(captions)
        feats = self.backbone.text_features(
            torch.from_numpy(batch["input_ids"]), torch.from_numpy(batch["attention_mask"])
        )
        return self.encode_text_features(feats)

    @torch.no_grad()
    def encode_images(self, images: list[Image.Image]) -> Encoded:
        pixels = torch.from_numpy(self.preprocessor.images(images))
        return self.encode_image_features(self.backbone.image_features(pixels))

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
