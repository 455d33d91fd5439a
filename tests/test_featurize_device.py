"""The featurize actor on its device: uint8 pixels in, normalised there, same features as the
float path; the actor-pool bounds behind --num-actors / --min-actors / --max-actors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines.featurize import Featurizer, actor_pool_bounds
from sdray.config import BackboneConfig


def test_uint8_pixels_give_the_features_of_normalised_floats():
    cfg = BackboneConfig(image_size=64)
    actor = Featurizer(cfg.model_dump(mode="json"), use_gpu=False)
    pre = actor.backbone.preprocessor
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (40 + 9 * i, 50, 3), dtype=np.uint8)) for i in range(3)]
    uint8 = pre.pixels_uint8(images)
    assert uint8.dtype == np.uint8 and uint8.shape == (3, 3, 64, 64)
    # packaged EfficientNet-Lite0: (p - 127) / 128 on uint8 p
    np.testing.assert_allclose(pre.images(images), (uint8.astype(np.float32) - 127) / 128, atol=1e-6)
    got = actor._image_features(["a", "b", "c"], uint8)
    with torch.no_grad():
        expected = actor.backbone.image_features(torch.from_numpy(pre.images(images))).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
    assert actor.device.type == "cpu" and not actor.fp16


def test_decode_for_device_normalisation_ships_uint8():
    from sdray.backbones import load_preprocessor

    pre = load_preprocessor(BackboneConfig(image_size=32)).for_device_normalization()
    img = Image.new("RGB", (20, 30), (255, 0, 10))
    px = pre.model_pixels([img])
    assert px.dtype == np.uint8 and px[0, :, 0, 0].tolist() == [255, 0, 10]
    assert pre.model_pixels([]).dtype == np.uint8
    assert not load_preprocessor(BackboneConfig(image_size=32)).normalize_on_device


def test_actor_pool_bounds():
    assert actor_pool_bounds(1, None, None) == (1, 1)
    assert actor_pool_bounds(3, None, None) == (3, 3)
    assert actor_pool_bounds(1, 2, 8) == (2, 8)
    assert actor_pool_bounds(4, 2, None) == (2, 4)
    with pytest.raises(ValueError, match="min-actors"):
        actor_pool_bounds(1, 4, 2)
    with pytest.raises(ValueError):
        actor_pool_bounds(1, 0, 2)
