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


def test_unknown_preset_lists_the_choices():
    with pytest.raises(C.ConfigError, match="blip-coco"):
        C.preset("nope")
