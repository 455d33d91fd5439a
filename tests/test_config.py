"""Config validation, presets, round trips and CLI-style overrides."""

import pytest

from sdray import config as C


def test_defaults_validate_and_round_trip_yaml_and_json(tmp_path):
    cfg = C.SdrayConfig()
    for name in ("run.yaml", "run.json"):
        C.save(cfg, tmp_path / name)
        assert C.load(tmp_path / name) == cfg


@pytest.mark.parametrize(
    "name,w1,w2,l1,l2,q_reg,d_reg,lr",
    [
        ("blip-coco", 0.1, 0.1, 0.9, 0.3, 5e-4, 3e-5, 5e-5),
        ("blip-flickr", 0.1, 0.2, 0.7, 0.7, 1e-4, 2e-5, 1e-5),
        ("albef-coco", 0.2, 0.5, 0.9, 0.3, 1e-5, 3e-5, 5e-5),
        ("albef-flickr", 0.1, 0.2, 0.3, 0.3, 1e-4, 2e-5, 1e-5),
    ],
)
def test_official_presets_carry_the_papers_values(name, w1, w2, l1, l2, q_reg, d_reg, lr):
    cfg = C.preset(name)
    loss = cfg.loss
    assert (loss.w1, loss.w2, loss.lambda1, loss.lambda2) == (w1, w2, l1, l2)
    assert (loss.q_reg, loss.d_reg, cfg.optim.lr) == (q_reg, d_reg, lr)
    assert cfg.optim.batch_size == 256 and cfg.optim.weight_decay == 0.05


@pytest.mark.parametrize("name", ["blip-coco", "blip-flickr", "albef-coco", "albef-flickr"])
def test_official_presets_reproduce_the_official_behaviour(name):
    """Undetached teacher, official orientation, no sparsity budget, the fixed raw fusion with the
    loss weights, no expansion control, L1, one lr: what holi-lab/mm-sparse-retrieval does."""
    cfg = C.preset(name)
    assert cfg.loss.detach_teacher is False and cfg.loss.teacher_orientation == "official"
    assert cfg.loss.expansion_control is False and cfg.loss.regularizer == "l1"
    assert cfg.loss.d2s_regularizer == "l1"
    assert cfg.selection.max_nnz is None and cfg.selection.vectors == "uncapped"
    assert cfg.fusion.method == "raw" and cfg.fusion.calibrate is False and cfg.fusion.normalize is None
    assert cfg.fusion_weights() == (cfg.loss.w1, cfg.loss.w2)
    assert cfg.optim.method_lr == {} and cfg.optim.sparse_head_lr is None


@pytest.mark.parametrize("name", ["blip-coco", "blip-flickr", "albef-coco", "albef-flickr"])
def test_sdray_variants_keep_the_official_values_with_sdrays_choices(name):
    off, var = C.preset(name), C.preset(f"{name}-sdray")
    assert var.loss.model_dump(exclude={"detach_teacher", "teacher_orientation"}) == \
        off.loss.model_dump(exclude={"detach_teacher", "teacher_orientation"})
    assert var.optim == off.optim and var.backbone == off.backbone
    assert var.loss.detach_teacher is True and var.loss.teacher_orientation == "correct"
    assert var.selection.max_nnz == 256 and var.selection.vectors == "uncapped"
    assert var.fusion.method == "calibrated" and var.fusion.calibrate is True


def test_official_preset_through_the_evaluation_uses_fixed_raw_weights():
    """fusion.calibrate is off in the official presets: no w2 grid is searched."""
    import numpy as np
    import torch
    from torch import nn

    from sdray.evaluation import evaluate_and_calibrate
    from sdray.heads import RetrieverHeads

    torch.manual_seed(0)
    heads = RetrieverHeads(nn.Linear(6, 4), nn.Linear(5, 4), torch.randn(20, 3)).eval()
    rng = np.random.default_rng(0)
    data = {"text_features": rng.normal(size=(8, 6)).astype(np.float32),
            "image_features": rng.normal(size=(8, 5)).astype(np.float32),
            "image_id": [f"i{k}" for k in range(8)], "caption": [f"c{k}" for k in range(8)]}
    cfg = C.with_overrides(C.preset("blip-coco"), {"backbone.name": "packaged", "backbone.path": None})
    res, out = evaluate_and_calibrate(heads, data, cfg)
    assert "fusion_grid" not in res and out.fusion_weights() == (0.1, 0.1)
    assert res["fusion"]["method"] == "raw"
    res2, out2 = evaluate_and_calibrate(heads, data, C.with_overrides(
        C.preset("blip-coco-sdray"), {"backbone.name": "packaged", "backbone.path": None}))
    assert "fusion_grid" in res2 and out2.fusion.w1 == 1.0


def test_blip_presets_name_a_blip_backbone_and_default_is_packaged():
    assert C.preset("blip-coco").backbone.name == "blip"
    assert C.preset("default").backbone.name == "packaged"


def test_unknown_key_is_rejected_naming_the_key():
    with pytest.raises(C.ConfigError, match=r"loss\.w3"):
        C.from_dict({"loss": {"w3": 1.0}})


def test_out_of_range_value_is_rejected_naming_the_key():
    with pytest.raises(C.ConfigError, match=r"optim\.lr"):
        C.from_dict({"optim": {"lr": -1.0}})
    with pytest.raises(C.ConfigError, match=r"loss\.method"):
        C.loads("loss: {method: sparse-only}")


def test_cross_field_rules():
    with pytest.raises(C.ConfigError, match="tau_init"):
        C.from_dict({"heads": {"tau_init": 0.9, "tau_max": 0.5}})
    with pytest.raises(C.ConfigError, match="backbone.path"):
        C.from_dict({"backbone": {"name": "clip"}})


def test_dotted_overrides_apply_and_skip_none():
    cfg = C.with_overrides(C.preset("blip-coco"), {"optim.lr": 1e-3, "loss.method": "d2s", "optim.epochs": None})
    assert cfg.optim.lr == 1e-3 and cfg.loss.method == "d2s"
    assert cfg.optim.epochs == C.preset("blip-coco").optim.epochs
    with pytest.raises(C.ConfigError, match=r"optim\.batch_size"):
        C.with_overrides(cfg, {"optim.batch_size": 1})


def test_fusion_weights_fall_back_to_the_loss_weights():
    assert C.SdrayConfig().fusion_weights() == (1.0, 1.0)     # s_dense + s_sparse by default
    cfg = C.from_dict({"loss": {"w1": 0.3, "w2": 0.7}, "fusion": {"w1": None, "w2": None}})
    assert cfg.fusion_weights() == (0.3, 0.7)
    cfg = C.from_dict({"loss": {"w1": 0.3}, "fusion": {"w1": None, "w2": 2.0}})
    assert cfg.fusion_weights() == (0.3, 2.0)
    assert C.preset("blip-flickr").fusion_weights() == (0.1, 0.2)   # presets fuse with s_int's weights


def test_sparse_head_fields_validate():
    assert C.from_dict({"heads": {"sparse_hidden": 64, "init_vocab_from_embeddings": False}})
    with pytest.raises(C.ConfigError, match=r"heads\.sparse_hidden"):
        C.from_dict({"heads": {"sparse_hidden": 4}})


def test_unknown_preset_lists_the_choices():
    with pytest.raises(C.ConfigError, match="blip-coco"):
        C.preset("nope")


def test_real_images_preset_trains_the_swept_flops_setting():
    """``real-images`` is what docs/sweep.md measured as ``joint-flops-1e-1-served``, and only
    the sparsity regulariser and the selection differ from the defaults."""
    import os
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
    import sweep

    method, _, overrides = sweep.SETTINGS["joint-flops-1e-1-served"]
    swept = C.with_overrides(C.SdrayConfig(), {**overrides, "loss.method": method})
    real = C.with_overrides(C.preset("real-images"), {"loss.method": method})
    assert real == swept
    default = C.preset("default").model_dump()
    changed = {(section, key) for section, fields in real.model_dump().items() if isinstance(fields, dict)
               for key, value in fields.items() if default[section][key] != value}
    assert changed == {("loss", "regularizer"), ("loss", "q_reg"), ("loss", "d_reg"), ("selection", "vectors")}
