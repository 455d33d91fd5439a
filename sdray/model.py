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
from sdray.devices import module_device, to_module_device
from sdray.heads import Encoded, RetrieverHeads

HEADS_FILE = "heads.safetensors"
CONFIG_FILE = "config.yaml"
META_FILE = "model.json"


def build_heads(cfg: SdrayConfig, backbone: Backbone) -> RetrieverHeads:
    """Fresh heads: the backbone's own final layers and its word embeddings (DESIGN.md §1)."""
    text_proj, vision_proj = backbone.initial_projections()
    return RetrieverHeads(
        text_proj,
        vision_proj,
        backbone.word_embeddings(),
        tau_init=cfg.heads.tau_init,
        tau_range=(cfg.heads.tau_min, cfg.heads.tau_max),
        topk=(cfg.heads.topk_text, cfg.heads.topk_image),
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
        backbone = backbone or load_backbone(cfg.backbone, proj_dim=cfg.heads.dense_dim)
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

    @torch.no_grad()
    def encode_texts(self, captions: list[str]) -> Encoded:
        """Captions -> Encoded; the backbone runs on its own device (fp16 autocast on CUDA)."""
        batch = self.preprocessor.texts(captions)
        backbone = self.backbone
        feats = backbone.token_features(to_module_device(batch["input_ids"], backbone),
                                        to_module_device(batch["attention_mask"], backbone))
        return self.encode_text_features(feats)

    @torch.no_grad()
    def encode_images(self, images: list[Image.Image]) -> Encoded:
        """PIL images -> Encoded: uint8 pixels go to the backbone's device and are normalised there."""
        backbone = self.backbone
        pixels = to_module_device(self.preprocessor.pixels_uint8(images), backbone)
        return self.encode_image_features(backbone.pixel_features(pixels))

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
