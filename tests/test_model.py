"""The model artifact: create from a backbone, save, load back (local and bad input)."""

import pytest
import torch

from sdray.backbones import save_tiny
from sdray.config import from_dict
from sdray.model import HEADS_FILE, RetrievalModel


@pytest.fixture(scope="module")
def tiny_cfg(tmp_path_factory):
    path = save_tiny("clip", tmp_path_factory.mktemp("tinyclip"))
    return from_dict({"backbone": {"name": "clip", "path": str(path), "image_size": 32,
                                   "max_text_length": 16}, "heads": {"topk_text": 4}})


def test_create_uses_the_backbones_own_final_layers(tiny_cfg):
    model = RetrievalModel.create(tiny_cfg)
    backbone = model.backbone
    assert torch.equal(model.heads.text_proj.linear.weight, backbone.model.text_projection.weight)
    assert torch.equal(model.heads.sparse.vocab_projector.weight, backbone.word_embeddings())


def test_save_load_round_trip_gives_identical_encodings(tiny_cfg, tmp_path):
    model = RetrievalModel.create(tiny_cfg)
    with torch.no_grad():
        model.heads.tau.fill_(0.05)
    model.meta["method"] = "joint"
    model.save(str(tmp_path / "m"))
    loaded = RetrievalModel.load(str(tmp_path / "m"))
    assert loaded.config == tiny_cfg and loaded.meta["method"] == "joint"
    assert loaded.tau == pytest.approx(0.05)
    feats = torch.randn(5, model.backbone.text_dim)
    a, b = model.encode_text_features(feats), loaded.encode_text_features(feats)
    assert torch.equal(a.dense, b.dense) and torch.equal(a.sparse, b.sparse)
    assert ((b.sparse > 0).sum(-1) <= 4).all()  # top-k pruning survives the round trip
    enc = loaded.encode_texts(["a red circle", "two blue squares"])
    assert enc.dense.shape == (2, model.backbone.proj_dim)
    assert enc.sparse.shape == (2, model.backbone.vocab_size)


def test_load_names_the_missing_file(tiny_cfg, tmp_path):
    RetrievalModel.create(tiny_cfg).save(str(tmp_path / "m"))
    (tmp_path / "m" / HEADS_FILE).unlink()
    with pytest.raises(FileNotFoundError, match=HEADS_FILE):
        RetrievalModel.load(str(tmp_path / "m"))
