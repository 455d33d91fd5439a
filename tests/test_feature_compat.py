"""Feature manifests record backbone and preprocessing; ``sdray train`` and ``sdray index`` refuse
features made for another config, naming both values (before any Ray work starts)."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from pipelines import cli
from sdray.backbones.compat import FeatureMismatch, check_features, feature_signature, find_feature_manifest
from sdray.config import BackboneConfig, SdrayConfig


def _feature_dir(root, backbone: BackboneConfig, split: str = "train"):
    """A featurize output as far as train/index look before reading rows: manifest + a shard."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    (root / split).mkdir(parents=True)
    pq.write_table(pa.table({"image_features": pa.array([[0.0, 1.0]], pa.list_(pa.float32()))}),
                   root / split / "shard-00000.parquet")
    manifest = {"kind": "sdray.features", "text_dim": 384, "image_dim": 1280,
                "backbone": backbone.model_dump(mode="json"),
                "preprocessing": feature_signature(backbone)}
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


def test_check_names_both_values_and_the_fix():
    made = BackboneConfig(name="blip", path="Salesforce/blip-itm-base-coco")
    wanted = made.model_copy(update={"image_size": 384, "max_text_length": 35})
    with pytest.raises(FeatureMismatch) as err:
        check_features({"preprocessing": feature_signature(made)}, wanted, "s3://b/feat", "the training config")
    msg = str(err.value)
    assert "image_size 224 in the features vs 384 in the training config" in msg
    assert "max_text_length 32 in the features vs 35" in msg
    assert "--image-size 384" in msg and "s3://b/feat" in msg
    check_features({"preprocessing": feature_signature(wanted)}, wanted, "x", "y")  # agrees: no error


def test_manifests_from_before_the_preprocessing_block_are_checked_by_their_backbone():
    old = {"backbone": BackboneConfig(image_size=96).model_dump(mode="json")}
    with pytest.raises(FeatureMismatch, match="image_size 96 in the features vs 224"):
        check_features(old, BackboneConfig(), "f", "the model's config")
    with pytest.raises(FeatureMismatch, match="records no backbone"):
        check_features({"kind": "sdray.features"}, BackboneConfig(), "f", "u")


def test_a_split_finds_the_manifest_of_its_featurize_output(tmp_path):
    _feature_dir(tmp_path / "feat", BackboneConfig())
    uri, m = find_feature_manifest(str(tmp_path / "feat" / "train"))
    assert uri == str(tmp_path / "feat" / "manifest.json") and m["kind"] == "sdray.features"
    assert find_feature_manifest(str(tmp_path)) is None


def test_sdray_train_refuses_mismatched_features(tmp_path, capsys):
    feat = _feature_dir(tmp_path / "feat", BackboneConfig(image_size=96))
    code = cli.main(["train", "--train", str(feat / "train"), "--out", str(tmp_path / "model")])
    err = capsys.readouterr().err
    assert code == cli.EXIT_CONFIG
    assert "image_size 96 in the features vs 224 in the training config" in err


def test_sdray_index_refuses_features_of_another_backbone(tmp_path, capsys):
    from sdray.model import RetrievalModel

    torch.manual_seed(0)
    heads = __import__("sdray.heads", fromlist=["RetrieverHeads"]).RetrieverHeads(
        nn.Linear(384, 8), nn.Linear(1280, 8), torch.randn(30522, 4))
    RetrievalModel(SdrayConfig(), heads, {"method": "dense"}).save(str(tmp_path / "model"))
    feat = _feature_dir(tmp_path / "feat", BackboneConfig(max_text_length=16))
    code = cli.main(["index", "--model", str(tmp_path / "model"), "--corpus", str(feat),
                     "--out", str(tmp_path / "index")])
    err = capsys.readouterr().err
    assert code == cli.EXIT_CONFIG
    assert "max_text_length 16 in the features vs 32 in the model's config" in err
