"""The one interface every frozen backbone implements: :class:`Preprocessor` and :class:`Backbone`.

A backbone maps captions and images to the hidden vectors *just before* its final projection
layer (DESIGN.md §1); sdray trains only copies of those final layers plus a sparse head. The
preprocessor is the light half: tokenizer and image normalisation, no model weights, picklable,
so Ray Data workers can run it inside ``map_batches``.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
from PIL import Image
from torch import nn

from sdray.devices import backbone_autocast


class Preprocessor:
    """Tokenises captions and resizes + normalises images the way a backbone's weights expect.

    Images: RGB, resized to ``image_size`` square (or, with ``center_crop``, shortest edge to
    ``image_size`` then a central square crop), then per channel ``(pixel * rescale - mean) / std``
    with ``pixel`` the uint8 value in [0, 255].

    Args:
        tokenizer: a ``transformers`` tokenizer (pickles with its vocabulary).
        max_text_length: captions are truncated and padded to exactly this many tokens.
        image_size: side S of the square model input.
        vocab_size: rows of the text encoder's word-embedding table (the sparse vocabulary |V|).
        mean, std: per-channel normalisation constants (3 floats each), after ``rescale``.
        rescale: factor applied to uint8 pixels before normalising (1/255 for HF processors).
        resample: PIL resampling filter for the resize.
        center_crop: resize shortest edge then crop, instead of a direct (aspect-changing) resize.
    """

    def __init__(self, tokenizer, *, max_text_length: int, image_size: int, vocab_size: int,
                 mean, std, rescale: float, resample: int = Image.BICUBIC, center_crop: bool = False):
        self.tokenizer = tokenizer
        self.max_text_length = max_text_length
        self.image_size = image_size
        self.vocab_size = vocab_size
        self.mean = np.asarray(mean, np.float32).reshape(3, 1, 1)
        self.std = np.asarray(std, np.float32).reshape(3, 1, 1)
        self.rescale = float(rescale)
        self.resample = int(resample)
        self.center_crop = center_crop
        self.normalize_on_device = False
        self._vocabulary: list[str] | None = None

    def _resize(self, image: Image.Image) -> Image.Image:
        size = self.image_size
        image = image.convert("RGB")
        if not self.center_crop:
            return image.resize((size, size), self.resample)
        w, h = image.size
        scale = size / min(w, h)
        w, h = max(size, round(w * scale)), max(size, round(h * scale))
        image = image.resize((w, h), self.resample)
        left, top = (w - size) // 2, (h - size) // 2
        return image.crop((left, top, left + size, top + size))

    def pixels_uint8(self, images: list[Image.Image]) -> np.ndarray:
        """PIL images -> resized uint8 array (B, 3, S, S), not yet normalised.

        This is what crosses the object store and the host-to-device link (a quarter of the
        float32 bytes); :meth:`Backbone.normalize` finishes the job on the model's device.
        """
        out = np.empty((len(images), 3, self.image_size, self.image_size), np.uint8)
        for i, image in enumerate(images):
            out[i] = np.asarray(self._resize(image), np.uint8).transpose(2, 0, 1)
        return out

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 (or float) pixels (B, 3, S, S) in [0, 255] -> float32 ``(p·rescale − mean) / std``,
        computed on ``pixels``' device."""
        mean = torch.as_tensor(self.mean, device=pixels.device)
        std = torch.as_tensor(self.std, device=pixels.device)
        return (pixels.to(torch.float32) * self.rescale - mean) / std

    def images(self, images: list[Image.Image]) -> np.ndarray:
        """PIL images -> float32 array (B, 3, S, S), normalised for the backbone's weights
        (:meth:`pixels_uint8` then :meth:`normalize`, on the CPU)."""
        return self.normalize(torch.from_numpy(self.pixels_uint8(images))).numpy()

    def model_pixels(self, images: list[Image.Image]) -> np.ndarray:
        """What the decode stage ships to the model: uint8 (B, 3, S, S) when
        ``normalize_on_device`` (the consumer calls :meth:`Backbone.pixel_features`), else the
        normalised float32 of :meth:`images`."""
        if not images:
            dtype = np.uint8 if self.normalize_on_device else np.float32
            return np.zeros((0, 3, self.image_size, self.image_size), dtype)
        return self.pixels_uint8(images) if self.normalize_on_device else self.images(images)

    def for_device_normalization(self) -> "Preprocessor":
        """A copy whose decode output is uint8 pixels (normalised later, on the model's device)."""
        other = copy.copy(self)
        other.normalize_on_device = True
        return other

    def texts(self, captions: list[str]) -> dict[str, np.ndarray]:
        """Captions -> ``input_ids`` and ``attention_mask``, int64 (B, max_text_length)."""
        enc = self.tokenizer(list(captions), padding="max_length", truncation=True,
                             max_length=self.max_text_length, return_attention_mask=True,
                             return_tensors="np")
        return {k: np.asarray(enc[k], np.int64) for k in ("input_ids", "attention_mask")}

    @property
    def vocabulary(self) -> list[str]:
        """Token id -> word piece, ``vocab_size`` entries; ids the tokenizer lacks read ``[unusedN]``."""
        if self._vocabulary is None:
            pieces = self.tokenizer.convert_ids_to_tokens(list(range(self.vocab_size)))
            self._vocabulary = [p if p is not None else f"[unused{i}]" for i, p in enumerate(pieces)]
        return self._vocabulary

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_vocabulary": None}


class Backbone(nn.Module):
    """A frozen vision-language backbone: pre-projection features plus its final layers.

    Subclasses set the towers and ``_text_proj`` / ``_vision_proj`` (the final layers sdray
    re-trains) and implement :meth:`text_features`, :meth:`image_features` and
    :meth:`_word_embedding`. Call :meth:`_freeze` at the end of ``__init__``.

    Attributes:
        name: backbone kind (``packaged``, ``clip``, ``blip``, ``siglip``).
        text_dim, image_dim: sizes of the pre-projection text and image features.
        proj_dim: output size of the final projections.
        vocab_size: word-embedding rows, the sparse vocabulary |V|.
        preprocessor: the matching :class:`Preprocessor`.
    """

    name: str
    _text_proj: nn.Linear
    _vision_proj: nn.Linear
    #: the text tower reads the padding (SigLIP pools the last position): captions keep their
    #: fixed padded length instead of being cut to the longest one (:meth:`token_features`)
    fixed_length_text: bool = False
    #: captions per text-tower call in :meth:`token_features`, grouped by length
    text_chunk: int = 32

    def __init__(self, preprocessor: Preprocessor):
        super().__init__()
        self.preprocessor = preprocessor

    def _freeze(self) -> None:
        self.requires_grad_(False)
        self.eval()
        self.text_dim = self._text_proj.in_features
        self.image_dim = self._vision_proj.in_features
        self.proj_dim = self._text_proj.out_features
        self.vocab_size = self._word_embedding().num_embeddings

    def train(self, mode: bool = True) -> "Backbone":
        """Stays in eval mode whatever ``mode`` says: the backbone is frozen (no dropout)."""
        return super().train(False)

    def text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """int64 (B, L) ids and mask -> float (B, text_dim) pre-projection caption features."""
        raise NotImplementedError

    def image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """float (B, 3, S, S) normalised pixels -> float (B, image_dim) pre-projection features."""
        raise NotImplementedError

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 pixels (B, 3, S, S) -> the normalised float input of :meth:`image_features`, on
        ``pixels``' device (the preprocessor's constants; e.g. ``(p − 127) / 128`` for the
        packaged EfficientNet-Lite0)."""
        return self.preprocessor.normalize(pixels)

    def pixel_features(self, pixels: torch.Tensor, fp16: bool = True) -> torch.Tensor:
        """Pixels (B, 3, S, S) on the backbone's device -> float32 (B, image_dim) features.

        uint8 pixels (:meth:`Preprocessor.pixels_uint8`) are normalised there first; float pixels
        are taken as already normalised. The image tower runs under fp16 autocast on CUDA
        (``fp16``)."""
        x = self.normalize(pixels) if pixels.dtype == torch.uint8 else pixels.float()
        with backbone_autocast(pixels.device, fp16):
            return self.image_features(x).float()

    def token_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                       fp16: bool = True) -> torch.Tensor:
        """:meth:`text_features` under fp16 autocast on CUDA, as float32 (B, text_dim).

        Right-padded captions run in chunks of :attr:`text_chunk` similar lengths, each cut to
        its longest caption, unless :attr:`fixed_length_text`. Masked padding does not change a
        mask-aware tower's output, only its cost: the demo's captions take 15 of their 32 padded
        tokens at the median."""
        with backbone_autocast(input_ids.device, fp16):
            if self.fixed_length_text:
                return self.text_features(input_ids, attention_mask).float()
            return self._length_chunked_text_features(input_ids, attention_mask)

    def _length_chunked_text_features(self, input_ids: torch.Tensor,
                                      attention_mask: torch.Tensor) -> torch.Tensor:
        lengths = attention_mask.sum(1)
        order = torch.argsort(lengths, stable=True)
        out = None
        for rows in order.split(self.text_chunk):
            width = max(1, int(lengths[rows].max()))
            mask = attention_mask[rows]
            if bool(mask[:, width:].any()):  # not right-padded: keep the full width
                width = mask.shape[1]
            feats = self.text_features(input_ids[rows, :width], mask[:, :width]).float()
            if out is None:
                out = feats.new_empty((len(lengths), feats.shape[1]))
            out[rows] = feats
        return out if out is not None else self.text_features(input_ids, attention_mask).float()

    def _word_embedding(self) -> nn.Embedding:
        raise NotImplementedError

    def word_embeddings(self) -> torch.Tensor:
        """A detached copy of the text encoder's token embeddings, (vocab_size, E)."""
        return self._word_embedding().weight.detach().clone()

    def initial_projections(self) -> tuple[nn.Linear, nn.Linear]:
        """Fresh trainable copies of (text_proj: text_dim->proj_dim, vision_proj: image_dim->proj_dim)."""
        copies = copy.deepcopy(self._text_proj), copy.deepcopy(self._vision_proj)
        for layer in copies:
            layer.requires_grad_(True)
        return copies
