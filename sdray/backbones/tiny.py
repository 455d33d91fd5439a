"""Tiny random CLIP / BLIP / SigLIP checkpoints, for tests and offline smoke runs.

``save_tiny(kind, folder)`` writes what a hub checkpoint holds — ``config.json``, safetensors
weights, a tokenizer and ``preprocessor_config.json`` — so the folder loads back through
:func:`sdray.backbones.load_backbone` exactly like a real model. Sizes are deliberately all
different (text 32, vision 48, projection 24, vocabulary 105) so swapped dimensions fail loudly.
Weights are random (seeded); features carry no meaning.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import transformers as tf

from sdray.rng import seeded

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
WORDS = ("a an the of on in with and is are red green blue yellow black white small big two three "
         "cat dog bird horse car bus boat tree house man woman child ball sits runs flies stands "
         "street park beach field water sky grass table photo picture").split()
LETTERS = list("bcdefghijklmnopqrstuvwxyz")  # "a" is already a word
VOCAB = SPECIALS + WORDS + LETTERS + [f"##{c}" for c in "a" + "".join(LETTERS)] + [".", ","]
TEXT_DIM, VISION_DIM, PROJ_DIM, IMAGE_SIZE, MAX_POSITIONS = 32, 48, 24, 32, 64

CLIP_MEAN, CLIP_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]
# Mirrors of the real checkpoints' preprocessor_config.json, scaled down to IMAGE_SIZE.
IMAGE_PROCESSORS = {
    "clip": {"image_processor_type": "CLIPImageProcessor", "do_resize": True,
             "size": {"shortest_edge": IMAGE_SIZE}, "resample": 3, "do_center_crop": True,
             "crop_size": {"height": IMAGE_SIZE, "width": IMAGE_SIZE}, "do_rescale": True,
             "rescale_factor": 1 / 255, "do_normalize": True,
             "image_mean": CLIP_MEAN, "image_std": CLIP_STD},
    "blip": {"image_processor_type": "BlipImageProcessor", "do_resize": True,
             "size": {"height": IMAGE_SIZE, "width": IMAGE_SIZE}, "resample": 3, "do_rescale": True,
             "rescale_factor": 1 / 255, "do_normalize": True,
             "image_mean": CLIP_MEAN, "image_std": CLIP_STD},
    "siglip": {"image_processor_type": "SiglipImageProcessor", "do_resize": True,
               "size": {"height": IMAGE_SIZE, "width": IMAGE_SIZE}, "resample": 2,
               "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
               "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]},
}


def _text_config(**extra) -> dict:
    return {"vocab_size": len(VOCAB), "hidden_size": TEXT_DIM, "intermediate_size": 64,
            "num_hidden_layers": 2, "num_attention_heads": 4,
            "max_position_embeddings": MAX_POSITIONS, **extra}


def _vision_config(**extra) -> dict:
    return {"hidden_size": VISION_DIM, "intermediate_size": 96, "num_hidden_layers": 2,
            "num_attention_heads": 4, "image_size": IMAGE_SIZE, "patch_size": 8, **extra}


def _model(kind: str) -> torch.nn.Module:
    ids = {t: VOCAB.index(t) for t in ("[PAD]", "[CLS]", "[SEP]")}
    if kind == "clip":
        text = _text_config(pad_token_id=ids["[PAD]"], bos_token_id=ids["[CLS]"],
                            eos_token_id=ids["[SEP]"])
        config = tf.CLIPConfig(text_config=text, vision_config=_vision_config(),
                               projection_dim=PROJ_DIM)
        return tf.CLIPModel(config)
    if kind == "blip":
        text = _text_config(encoder_hidden_size=VISION_DIM, pad_token_id=ids["[PAD]"],
                            sep_token_id=ids["[SEP]"], bos_token_id=ids["[CLS]"])
        config = tf.BlipConfig(text_config=text, vision_config=_vision_config(),
                               image_text_hidden_size=PROJ_DIM)
        return tf.BlipForImageTextRetrieval(config)
    if kind == "siglip":
        # SigLIP compares text-head outputs with pooled image states directly: same size.
        text = _text_config(projection_size=VISION_DIM, pad_token_id=ids["[PAD]"],
                            bos_token_id=ids["[CLS]"], eos_token_id=ids["[SEP]"])
        return tf.SiglipModel(tf.SiglipConfig(text_config=text, vision_config=_vision_config()))
    raise ValueError(f"unknown tiny backbone '{kind}'; choose clip, blip or siglip")


def save_tiny(kind: str, folder: str | Path, seed: int = 0) -> Path:
    """Write a tiny random ``kind`` checkpoint (clip | blip | siglip) into ``folder``; return it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with seeded(seed):
        _model(kind).save_pretrained(folder)
    tokenizer = tf.BertTokenizer(vocab={t: i for i, t in enumerate(VOCAB)}, do_lower_case=True)
    tokenizer.save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps(IMAGE_PROCESSORS[kind], indent=2))
    return folder
