"""Frozen backbones: the packaged default (real weights) and tiny random CLIP / BLIP / SigLIP."""

import os
import pickle

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
from PIL import Image

from sdray.backbones import load_backbone, load_preprocessor, save_tiny
from sdray.backbones.tiny import PROJ_DIM, TEXT_DIM, VISION_DIM, VOCAB
from sdray.config import BackboneConfig

HF_KINDS = ["clip", "blip", "siglip"]
CAPTIONS = ["a red cat sits on the table", "two dogs", "a small white boat on the blue water in the park"]


def _t(batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.from_numpy(batch["input_ids"]), torch.from_numpy(batch["attention_mask"])


def _images(n: int, size=(40, 56)) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (*size[::-1], 3), dtype=np.uint8)) for _ in range(n)]


@pytest.fixture(scope="module")
def packaged():
    return load_backbone(BackboneConfig())


@pytest.fixture(scope="module")
def tiny_paths(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {kind: save_tiny(kind, root / kind) for kind in HF_KINDS}


@pytest.fixture(scope="module")
def tiny(tiny_paths):
    return {kind: load_backbone(_tiny_cfg(kind, tiny_paths)) for kind in HF_KINDS}


def _tiny_cfg(kind, paths, **kw):
    return BackboneConfig(**{"name": kind, "path": str(paths[kind]), "image_size": 32,
                             "max_text_length": 16, **kw})


# ---------------------------------------------------------------- packaged (real weights)

def test_packaged_dims_and_vocabulary(packaged):
    assert (packaged.name, packaged.text_dim, packaged.image_dim) == ("packaged", 384, 1280)
    assert (packaged.proj_dim, packaged.vocab_size) == (256, 30522)
    assert packaged.word_embeddings().shape == (30522, 384)
    vocab = packaged.preprocessor.vocabulary
    assert len(vocab) == 30522 and vocab[101] == "[CLS]" and vocab[vocab.index("cat")] == "cat"
    # sparse dimension j is token id j: the names top_terms/explanations give are the tokens the
    # tokenizer produces (and the rows of the word embeddings the projector is copied from)
    enc = packaged.preprocessor.texts(["a red circle", "unreadable"])
    names = [[vocab[int(t)] for t, m in zip(ids, mask) if m] for ids, mask in
             zip(enc["input_ids"], enc["attention_mask"])]
    assert names == [["[CLS]", "a", "red", "circle", "[SEP]"], ["[CLS]", "un", "##rea", "##dable", "[SEP]"]]


def test_packaged_image_normalisation_is_tflite_convention():
    pre = load_preprocessor(BackboneConfig(image_size=64))
    pixels = pre.images([Image.new("RGB", (80, 50), (255, 127, 0))])
    assert pixels.shape == (1, 3, 64, 64) and pixels.dtype == np.float32
    np.testing.assert_allclose(pixels[0, :, 10, 10], [1.0, 0.0, -127 / 128])


def test_packaged_sees_chelsea_as_a_cat(packaged):
    skimage_data = pytest.importorskip("skimage.data")
    pixels = torch.from_numpy(packaged.preprocessor.images([Image.fromarray(skimage_data.chelsea())]))
    feature = packaged.image_features(pixels)
    assert feature.shape == (1, 1280)
    probs = packaged.image_tower._fc(feature).softmax(-1)[0]
    assert 281 <= int(probs.argmax()) <= 285 and probs[281:286].sum() > 0.8


def test_packaged_text_mean_pooling_ignores_padding(packaged):
    short = load_preprocessor(BackboneConfig(max_text_length=12))
    alone = packaged.text_features(*_t(short.texts(CAPTIONS[:1])))
    batched = packaged.text_features(*_t(packaged.preprocessor.texts(CAPTIONS)))
    assert batched.shape == (3, 384)
    torch.testing.assert_close(alone[0], batched[0], atol=1e-5, rtol=1e-5)
    e = torch.nn.functional.normalize(packaged.text_features(*_t(packaged.preprocessor.texts(
        ["a cat on a mat", "a kitten lying on a rug", "the stock market crashed"]))), dim=-1)
    assert e[0] @ e[1] > 0.5 > e[0] @ e[2] + 0.3


def test_packaged_frozen_and_projections_are_fresh_copies(packaged):
    assert not any(p.requires_grad for p in packaged.parameters())
    packaged.train()
    assert not packaged.training and not packaged.text_tower.training
    ids, mask = _t(packaged.preprocessor.texts(CAPTIONS[:2]))
    h = packaged.text_features(ids, mask)
    assert h.grad_fn is None and torch.equal(h, packaged.text_features(ids, mask))
    text_proj, vision_proj = packaged.initial_projections()
    assert (text_proj.in_features, text_proj.out_features) == (384, 256)
    assert (vision_proj.in_features, vision_proj.out_features) == (1280, 256)
    assert text_proj.weight.requires_grad and vision_proj.weight.requires_grad
    with torch.no_grad():
        text_proj.weight.add_(1.0)
    again, _ = packaged.initial_projections()
    assert not torch.equal(again.weight, text_proj.weight)
    embeddings = packaged.word_embeddings()
    embeddings.zero_()
    assert packaged.word_embeddings().abs().sum() > 0


def test_packaged_projections_are_seeded():
    a = load_backbone(BackboneConfig(), proj_dim=16, seed=3)
    b_text, b_vision = load_backbone(BackboneConfig(), proj_dim=16, seed=3).initial_projections()
    assert torch.equal(a.initial_projections()[0].weight, b_text.weight)
    assert torch.equal(a.initial_projections()[1].weight, b_vision.weight)


def test_preprocessor_pickles_and_pads_to_max_length():
    pre = load_preprocessor(BackboneConfig(max_text_length=8))
    clone = pickle.loads(pickle.dumps(pre))
    batch, again = pre.texts(CAPTIONS), clone.texts(CAPTIONS)
    assert batch["input_ids"].shape == (3, 8) and batch["input_ids"].dtype == np.int64
    assert batch["attention_mask"].dtype == np.int64 and batch["attention_mask"][1].sum() == 4
    for key in batch:
        np.testing.assert_array_equal(batch[key], again[key])
    np.testing.assert_array_equal(pre.images(_images(2)), clone.images(_images(2)))


# ---------------------------------------------------------------- tiny HF models

@pytest.mark.parametrize("kind", HF_KINDS)
def test_tiny_dims_and_shapes(tiny, kind):
    bb = tiny[kind]
    proj = VISION_DIM if kind == "siglip" else PROJ_DIM
    assert (bb.name, bb.text_dim, bb.image_dim, bb.proj_dim) == (kind, TEXT_DIM, VISION_DIM, proj)
    assert bb.vocab_size == len(VOCAB) == len(bb.preprocessor.vocabulary)
    assert bb.preprocessor.vocabulary == VOCAB
    assert bb.word_embeddings().shape == (len(VOCAB), TEXT_DIM)
    assert bb.text_features(*_t(bb.preprocessor.texts(CAPTIONS))).shape == (3, TEXT_DIM)
    pixels = torch.from_numpy(bb.preprocessor.images(_images(2)))
    assert pixels.shape == (2, 3, 32, 32)
    features = bb.image_features(pixels)
    assert features.shape == (2, VISION_DIM) and torch.equal(features, bb.image_features(pixels))


@pytest.mark.parametrize("kind", HF_KINDS)
def test_tiny_features_and_projections_reproduce_the_model(tiny, kind):
    bb, m = tiny[kind], tiny[kind].model
    ids, mask = _t(bb.preprocessor.texts(CAPTIONS))
    pixels = torch.from_numpy(bb.preprocessor.images(_images(2)))
    text_proj, vision_proj = bb.initial_projections()
    with torch.no_grad():
        t, v = text_proj(bb.text_features(ids, mask)), vision_proj(bb.image_features(pixels))
        if kind == "blip":
            n = torch.nn.functional.normalize
            own = m(input_ids=ids, attention_mask=mask, pixel_values=pixels[:1], use_itm_head=False)
            torch.testing.assert_close(n(v[:1], dim=-1) @ n(t, dim=-1).T, own.itm_score)
            own_text_proj, own_vision_proj = m.text_proj, m.vision_proj
        else:
            own_t = m.get_text_features(input_ids=ids, attention_mask=None if kind == "siglip" else mask)
            torch.testing.assert_close(t, own_t.pooler_output)
            torch.testing.assert_close(v, m.get_image_features(pixel_values=pixels).pooler_output)
            own_text_proj = m.text_projection if kind == "clip" else m.text_model.head
            own_vision_proj = m.visual_projection if kind == "clip" else None
    torch.testing.assert_close(text_proj.weight, own_text_proj.weight)
    assert text_proj.weight.data_ptr() != own_text_proj.weight.data_ptr()
    if own_vision_proj is None:  # SigLIP: identity-initialised vision projection
        torch.testing.assert_close(vision_proj.weight, torch.eye(VISION_DIM))
    else:
        torch.testing.assert_close(vision_proj.weight, own_vision_proj.weight)
    torch.testing.assert_close(bb.word_embeddings(), bb._word_embedding().weight)


@pytest.mark.parametrize("kind", ["clip", "blip"])
def test_tiny_padding_does_not_change_a_caption(tiny, tiny_paths, kind):
    bb = tiny[kind]
    alone = bb.text_features(*_t(load_preprocessor(_tiny_cfg(kind, tiny_paths, max_text_length=8))
                                 .texts(CAPTIONS[1:2])))
    batched = bb.text_features(*_t(bb.preprocessor.texts(CAPTIONS)))
    torch.testing.assert_close(alone[0], batched[1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", HF_KINDS)
def test_tiny_frozen_and_copies(tiny, kind):
    bb = tiny[kind]
    assert not any(p.requires_grad for p in bb.parameters())
    bb.train()
    assert not bb.training and not bb.model.training
    text_proj, vision_proj = bb.initial_projections()
    assert text_proj.weight.requires_grad and vision_proj.weight.requires_grad
    with torch.no_grad():
        vision_proj.weight.add_(1.0)
    assert not torch.equal(bb.initial_projections()[1].weight, vision_proj.weight)


def test_tiny_image_normalisation_follows_processor_config(tiny):
    red = [Image.new("RGB", (48, 32), (255, 0, 0))]
    clip = tiny["clip"].preprocessor.images(red)[0, :, 5, 5]
    np.testing.assert_allclose(clip, (np.array([1.0, 0, 0]) - [0.48145466, 0.4578275, 0.40821073])
                               / [0.26862954, 0.26130258, 0.27577711], rtol=1e-5)
    np.testing.assert_allclose(tiny["siglip"].preprocessor.images(red)[0, :, 5, 5], [1.0, -1.0, -1.0])


def test_hf_proj_dim_mismatch_and_long_captions_rejected(tiny_paths):
    with pytest.raises(ValueError, match="projects to 24"):
        load_backbone(_tiny_cfg("clip", tiny_paths), proj_dim=256)
    with pytest.raises(ValueError, match="max_text_length"):
        load_backbone(_tiny_cfg("blip", tiny_paths, max_text_length=128))
    assert load_backbone(_tiny_cfg("clip", tiny_paths), proj_dim=PROJ_DIM).proj_dim == PROJ_DIM


@pytest.mark.parametrize("kind", ["clip", "blip", "siglip"])
def test_token_features_cut_padding_only_where_the_tower_ignores_it(tiny, kind, monkeypatch):
    """Captions run in length-sorted chunks cut to their longest caption (same features, in the
    input's order); SigLIP, whose text tower reads the padding, keeps the full padded width."""
    bb = tiny[kind]
    captions = CAPTIONS * 3 + ["a"]
    ids, mask = _t(bb.preprocessor.texts(captions))
    widths = []
    full = bb.text_features

    def spy(i, m):
        widths.append(i.shape[1])
        return full(i, m)

    monkeypatch.setattr(bb, "text_chunk", 4)
    monkeypatch.setattr(bb, "text_features", spy)
    chunked = bb.token_features(ids, mask, fp16=False)
    monkeypatch.setattr(bb, "text_features", full)
    torch.testing.assert_close(chunked, full(ids, mask).float(), atol=1e-5, rtol=1e-5)
    if kind == "siglip":
        assert widths == [ids.shape[1]]
    else:
        assert len(widths) == 3 and max(widths) == int(mask.sum(1).max()) and min(widths) < max(widths)


def test_token_features_keep_the_width_of_left_padded_rows(packaged):
    ids, mask = _t(packaged.preprocessor.texts(CAPTIONS))
    left_ids, left_mask = torch.flip(ids, [1]), torch.flip(mask, [1])  # padding first
    got = packaged.token_features(left_ids, left_mask, fp16=False)
    torch.testing.assert_close(got, packaged.text_features(left_ids, left_mask), atol=1e-5, rtol=1e-5)
