"""Hugging Face CLIP, BLIP (image-text retrieval) and SigLIP behind the :class:`Backbone` interface.

Each loads by hub id or local folder (``BackboneConfig.path``; offline, from the local cache),
with the tokenizer and ``preprocessor_config.json`` of the same path. The final layers are the
model's own projections, so ``proj_dim`` is the model's:

==========  =============================================  =====================================
backbone    pre-projection feature                         final layers (text, vision)
==========  =============================================  =====================================
clip        ``text_model`` / ``vision_model`` pooler        ``text_projection``,
            outputs (EOS token; post-LN [CLS])             ``visual_projection`` (no bias)
blip        [CLS] last hidden state of ``text_encoder``     ``text_proj``, ``vision_proj``
            (unimodal) / ``vision_model``                   (the ITC heads of BLIP retrieval)
siglip      text: last position of the final-LN states;    ``text_model.head``; vision: an
            image: the MAP-pooling head output             identity-initialised Linear
==========  =============================================  =====================================

SigLIP has no linear layer after its attention-pooling (MAP) head: its image embedding *is*
the pooled vector. To keep a trainable final layer on both sides without changing the model's
function at initialisation, the vision projection is ``Linear(d, d)`` with weight I and bias 0.
SigLIP's text tower pools the *last* position, padding included, and was trained on captions
padded to a fixed length with no attention mask (HF docs: ``padding="max_length"``), so its
text features ignore ``attention_mask`` and depend on ``max_text_length`` (use the model's, 64
for the base checkpoints).

When ``BackboneConfig.image_size`` differs from the checkpoint's, position embeddings are
interpolated (``interpolate_pos_encoding=True``).
"""

from __future__ import annotations

import json

import torch
import transformers
from torch import nn
from transformers import AutoConfig, AutoTokenizer
from transformers.utils import cached_file

from sdray.backbones.base import Backbone, Preprocessor
from sdray.config import BackboneConfig

MODEL_CLASSES = {"clip": "CLIPModel", "blip": "BlipForImageTextRetrieval", "siglip": "SiglipModel"}


def _read_json(path: str, filename: str) -> dict:
    with open(cached_file(path, filename)) as f:
        return json.load(f)


def hf_preprocessor(cfg: BackboneConfig) -> Preprocessor:
    """Tokenizer of ``cfg.path`` + the normalisation, resample and crop of its image processor."""
    proc = _read_json(cfg.path, "preprocessor_config.json")
    vocab_size = AutoConfig.from_pretrained(cfg.path).text_config.vocab_size  # hub configs omit defaults
    return Preprocessor(
        AutoTokenizer.from_pretrained(cfg.path), max_text_length=cfg.max_text_length,
        image_size=cfg.image_size, vocab_size=vocab_size,
        mean=proc["image_mean"], std=proc["image_std"], rescale=proc.get("rescale_factor", 1 / 255),
        resample=proc.get("resample", 3), center_crop=bool(proc.get("do_center_crop", False)))


def _identity_linear(dim: int) -> nn.Linear:
    layer = nn.Linear(dim, dim)
    nn.init.eye_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer


class HFBackbone(Backbone):
    """A frozen ``transformers`` CLIP / BLIP-retrieval / SigLIP model; the model is ``self.model``."""

    def __init__(self, cfg: BackboneConfig):
        super().__init__(hf_preprocessor(cfg))
        self.name = cfg.name
        self.fixed_length_text = cfg.name == "siglip"
        model_class = getattr(transformers, MODEL_CLASSES[cfg.name])  # imported on use: heavy
        self.model = model_class.from_pretrained(cfg.path, dtype=torch.float32)
        max_positions = self.model.config.text_config.max_position_embeddings
        if cfg.max_text_length > max_positions:
            raise ValueError(f"backbone.max_text_length {cfg.max_text_length} exceeds the "
                             f"{cfg.name} text encoder's {max_positions} positions")
        self._interpolate = cfg.image_size != self.model.config.vision_config.image_size
        self._text_proj, self._vision_proj = self._final_layers()
        self._freeze()

    def _final_layers(self) -> tuple[nn.Linear, nn.Linear]:
        m = self.model
        if self.name == "clip":
            return m.text_projection, m.visual_projection
        if self.name == "blip":
            return m.text_proj, m.vision_proj
        return m.text_model.head, _identity_linear(m.config.vision_config.hidden_size)

    @torch.no_grad()
    def text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, L) ids and mask -> (B, text_dim); see the module docstring for the pooling."""
        m = self.model
        if self.name == "clip":
            return m.text_model(input_ids=input_ids, attention_mask=attention_mask).pooler_output
        if self.name == "blip":
            out = m.text_encoder(input_ids=input_ids, attention_mask=attention_mask)
            return out.last_hidden_state[:, 0]
        return m.text_model(input_ids=input_ids).last_hidden_state[:, -1]

    @torch.no_grad()
    def image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) -> (B, image_dim): CLIP/SigLIP pooler output, BLIP [CLS] state."""
        out = self.model.vision_model(pixel_values=pixels, interpolate_pos_encoding=self._interpolate)
        return out.last_hidden_state[:, 0] if self.name == "blip" else out.pooler_output

    def _word_embedding(self) -> nn.Embedding:
        if self.name == "blip":
            return self.model.text_encoder.embeddings.word_embeddings
        return self.model.text_model.embeddings.token_embedding
