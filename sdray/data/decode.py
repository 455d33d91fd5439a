"""Decoding raw samples into model inputs, counting every bad image by reason (no Ray)."""

from __future__ import annotations

import io
import warnings
from typing import Any, Sequence

import numpy as np
from PIL import Image, ImageFile

from sdray.data import skips as S
from sdray.data.skips import SkipCounts

ImageFile.LOAD_TRUNCATED_IMAGES = False


def decode_image(data: bytes, max_pixels: int, draft_size: int | None = None
                 ) -> tuple[Image.Image | None, str | None]:
    """``(RGB image, None)`` or ``(None, reason)``; never raises.

    The pixel limit is checked from the header, before any pixel is decoded, so a
    decompression bomb costs nothing. ``draft_size`` lets JPEG decode at reduced scale.
    """
    if not data:
        return None, S.IMAGE_EMPTY
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
            w, h = im.size
            if w * h > max_pixels or w <= 0 or h <= 0:
                return None, S.IMAGE_TOO_LARGE
            if draft_size and im.format == "JPEG":
                im.draft("RGB", (draft_size, draft_size))
            im.load()
            if im.mode != "RGB":
                if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
                    im = im.convert("RGBA")
                    bg = Image.new("RGB", im.size, (255, 255, 255))
                    bg.paste(im, mask=im.split()[-1])
                    im = bg
                else:
                    im = im.convert("RGB")
            return im, None
    except Image.DecompressionBombError:
        return None, S.IMAGE_TOO_LARGE
    except Exception as err:  # PIL raises OSError/SyntaxError/ValueError/... on bad data
        msg = str(err).lower()
        if "truncated" in msg or "broken data stream" in msg or "premature end" in msg:
            return None, S.IMAGE_TRUNCATED
        return None, S.IMAGE_UNDECODABLE


def resize_square(im: Image.Image, size: int) -> Image.Image:
    """Resize the shorter side to ``size`` and centre-crop to ``size``×``size``."""
    w, h = im.size
    if (w, h) == (size, size):
        return im
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    im = im.resize((nw, nh), Image.BICUBIC, reducing_gap=2.0)
    left, top = (nw - size) // 2, (nh - size) // 2
    return im.crop((left, top, left + size, top + size))


def to_pixels(images: Sequence[Image.Image], size: int) -> np.ndarray:
    """Fallback preprocessing: float32 (B,3,S,S) in [0,1] (used without a backbone preprocessor)."""
    out = np.zeros((len(images), 3, size, size), np.float32)
    for i, im in enumerate(images):
        out[i] = np.asarray(resize_square(im, size), np.float32).transpose(2, 0, 1) / 255.0
    return out


def decode_batch(batch: dict[str, Any], preprocessor: Any | None, counts: SkipCounts,
                 max_pixels: int, image_size: int | None = None,
                 dropped: list | None = None) -> dict[str, Any]:
    """Raw sample columns (``sample_id``, ``image_id``, ``caption``, ``image`` bytes) -> model inputs.

    With a preprocessor: ``pixels`` float32 (B,3,S,S) (uint8 if its ``normalize_on_device``), ``input_ids``/``attention_mask`` int64
    (B,L). Without one: ``pixels`` in [0,1] at ``image_size`` (if given) and no tokens.
    Undecodable/truncated/oversized images are dropped and counted; the other columns
    (``key``, ``url``, ``image_loc``, ``shard`` too, when present) are kept for the rows that remain.
    ``dropped``, if given, receives ``(row index, reason)`` for every dropped row.
    """
    size = image_size or getattr(preprocessor, "image_size", None)
    keep: list[int] = []
    images: list[Image.Image] = []
    for i, data in enumerate(batch["image"]):
        im, reason = decode_image(bytes(data), max_pixels, draft_size=size)
        if im is None:
            counts.add(reason)
            if dropped is not None:
                dropped.append((i, reason))
            continue
        keep.append(i)
        images.append(im)
    out: dict[str, Any] = {
        k: np.asarray([batch[k][i] for i in keep], dtype=object)
        for k in ("sample_id", "image_id", "caption", "key", "url", "image_loc", "shard") if k in batch
    }
    captions = [str(c) for c in out.get("caption", [])]
    if preprocessor is not None:
        if getattr(preprocessor, "normalize_on_device", False):
            out["pixels"] = preprocessor.model_pixels(images)  # uint8: normalised on the model's device
        else:
            out["pixels"] = np.asarray(preprocessor.images(images), np.float32) if images else (
                np.zeros((0, 3, size or 1, size or 1), np.float32))
        if captions:
            tok = preprocessor.texts(captions)
            out["input_ids"] = np.asarray(tok["input_ids"], np.int64)
            out["attention_mask"] = np.asarray(tok["attention_mask"], np.int64)
        else:
            out["input_ids"] = np.zeros((0, 1), np.int64)
            out["attention_mask"] = np.zeros((0, 1), np.int64)
    elif size:
        out["pixels"] = to_pixels(images, size)
    else:
        out["image"] = np.asarray([bytes(batch["image"][i]) for i in keep], dtype=object)
    return out
