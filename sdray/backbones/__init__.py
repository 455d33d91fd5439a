"""Frozen vision-language backbones behind one interface (DESIGN.md §1, §5).

>>> from sdray.config import BackboneConfig
>>> backbone = load_backbone(BackboneConfig())            # packaged MiniLM-L6 + EfficientNet-Lite0
>>> pre = backbone.preprocessor                            # or load_preprocessor(cfg): no weights
>>> batch = pre.texts(["a red bus"])                       # input_ids, attention_mask (1, 32)
>>> h = backbone.text_features(*(torch.from_numpy(batch[k]) for k in ("input_ids", "attention_mask")))
>>> text_proj, vision_proj = backbone.initial_projections()   # trainable copies of the final layers

Kinds: ``packaged`` (embedded default), ``clip``, ``blip``, ``siglip`` (Hugging Face, by hub id
or local folder). :func:`save_tiny` writes tiny random HF checkpoints for tests.
"""

from __future__ import annotations

from sdray.backbones.base import Backbone, Preprocessor
from sdray.backbones.tiny import save_tiny
from sdray.config import BackboneConfig
from sdray.rng import seeded

__all__ = ["Backbone", "Preprocessor", "load_backbone", "load_preprocessor", "save_tiny"]


def load_preprocessor(cfg: BackboneConfig) -> Preprocessor:
    """The tokenizer + image normalisation of ``cfg``'s backbone, without loading model weights."""
    if cfg.name == "packaged":
        from sdray.backbones.packaged import packaged_preprocessor
        return packaged_preprocessor(cfg)
    from sdray.backbones.hf import hf_preprocessor
    return hf_preprocessor(cfg)


def load_backbone(cfg: BackboneConfig, proj_dim: int | None = None, seed: int = 0) -> Backbone:
    """Load the frozen backbone ``cfg`` names.

    Args:
        cfg: which backbone, its path, input image size and caption length.
        proj_dim: size of the final projections. ``packaged``: the fresh seeded layers' size
            (default 256). HF models keep their own projections, so ``None`` or their own size;
            any other value raises ``ValueError`` rather than silently disagreeing.
        seed: seeds the packaged backbone's fresh projections.

    The towers' modules draw initial weights from torch's global RNG before their saved weights
    replace them, so the whole construction runs under :func:`sdray.rng.seeded`: its draws can
    never land inside another thread's seeded construction (the demo loads two at once).
    """
    with seeded(seed):
        if cfg.name == "packaged":
            from sdray.backbones.packaged import PackagedBackbone
            return PackagedBackbone(cfg, proj_dim=256 if proj_dim is None else proj_dim, seed=seed)
        from sdray.backbones.hf import HFBackbone
        backbone = HFBackbone(cfg)
    if proj_dim is not None and proj_dim != backbone.proj_dim:
        raise ValueError(f"{cfg.name} backbone '{cfg.path}' projects to {backbone.proj_dim} "
                         f"dimensions, not {proj_dim}; set heads.dense_dim={backbone.proj_dim}")
    return backbone
