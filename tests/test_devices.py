"""Device placement: inputs follow the module's device (validation, calibration, eval, encoders).

The heads go on PyTorch's ``meta`` device (see ``tests/device_fakes.py``): mixing it with CPU
tensors raises just as mixing CUDA and CPU tensors does, so these tests catch on a CPU-only
machine the bug that crashed validation under ``--use-gpu --val`` (features built on the CPU fed
to heads on CUDA).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from sdray.config import from_dict
from sdray.devices import module_device, resolve_device
from sdray.evaluation import encode, evaluate_and_calibrate
from sdray.heads import RetrieverHeads
from tests.device_fakes import MetaHost

HT, HI, D, V = 10, 14, 8, 40


def meta_heads() -> RetrieverHeads:
    torch.manual_seed(0)
    return RetrieverHeads(nn.Linear(HT, D), nn.Linear(HI, D), torch.randn(V, 6)).to("meta")


def val_split(n: int = 12) -> dict:
    rng = np.random.default_rng(0)
    return {"text_features": rng.normal(size=(n, HT)).astype(np.float32),
            "image_features": rng.normal(size=(n, HI)).astype(np.float32),
            "image_id": [f"i{k // 2}" for k in range(n)], "caption": [f"c{k}" for k in range(n)]}


def test_the_fake_device_catches_cpu_inputs_to_device_heads():
    h = meta_heads()
    with pytest.raises(RuntimeError, match="device"):
        h.encode_text(torch.randn(3, HT))


def test_encode_moves_features_to_the_heads_device():
    with MetaHost() as host:
        dense, sparse = encode(meta_heads(), np.ones((5, HT), np.float32), "text", chunk=2)
    assert dense.device.type == "cpu" and dense.shape == (5, D)
    assert sparse.layout == torch.sparse_csr and sparse.shape == (5, V)
    assert host.copies >= 6  # dense + sparse of each of the 3 chunks came back to the host


def test_validation_with_calibration_runs_with_heads_on_a_device():
    cfg = from_dict({"loss": {"method": "joint"},
                     "fusion": {"method": "calibrated", "calibrate": True, "w2_grid": [0.5, 1.0]}})
    with MetaHost():
        result, chosen = evaluate_and_calibrate(meta_heads(), val_split(), cfg)
    assert result["n_images"] == 6 and result["n_texts"] == 12
    assert set(result["fusion_grid"]) == {0.5, 1.0}
    assert chosen.fusion.w2 in (0.5, 1.0)


def test_retrieval_model_feature_encoders_follow_the_heads():
    from sdray.model import RetrievalModel

    model = RetrievalModel(from_dict({}), meta_heads())
    out = model.encode_text_features(np.ones((2, HT), np.float32))
    assert out.dense.device.type == "meta"
    out = model.encode_image_features(torch.ones(3, HI))
    assert out.sparse.device.type == "meta" and out.sparse.shape == (3, V)


def test_module_device_and_resolve_device():
    assert module_device(nn.Linear(2, 2).to("meta")).type == "meta"
    assert module_device(nn.ReLU()).type == "cpu"
    assert resolve_device(False).type == "cpu"
    if not torch.cuda.is_available():
        assert resolve_device(None).type == "cpu"
        with pytest.raises(RuntimeError, match="no CUDA device"):
            resolve_device(True)


def test_index_encoder_keeps_inputs_on_the_device_of_its_heads(tmp_path):
    from pipelines.index import Encoder
    from sdray.model import RetrievalModel

    torch.manual_seed(0)
    cpu_heads = RetrieverHeads(nn.Linear(HT, D), nn.Linear(HI, D), torch.randn(V, 6))
    RetrievalModel(from_dict({}), cpu_heads, {"method": "joint"}).save(str(tmp_path / "m"))
    enc = Encoder(str(tmp_path / "m"), n_shards=1, pending=[0], sides=("images", "captions"))
    enc.model.heads.to("meta")
    enc.device = torch.device("meta")  # what a GPU actor has, with the heads moved there
    batch = {"image_features": np.ones((3, HI), np.float32), "text_features": np.ones((3, HT), np.float32)}
    with MetaHost():
        for side, encode in (("images", enc.model.heads.encode_image), ("captions", enc.model.heads.encode_text)):
            feats = enc._features(batch, side, [0, 2])
            assert feats.device.type == "meta"
            out = encode(feats)
            assert out.dense.shape == (2, D) and out.sparse.shape == (2, V)
