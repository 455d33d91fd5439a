"""The Python API: lazy package import, batched encoding, top terms, Hub-style folders, the guide."""

import io
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from sdray.backbones import save_tiny
from sdray.config import from_dict
from sdray.model import RetrievalModel
from sdray.model_card import parse_front_matter

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    path = save_tiny("clip", tmp_path_factory.mktemp("tinyclip"))
    cfg = from_dict({"backbone": {"name": "clip", "path": str(path), "image_size": 32,
                                  "max_text_length": 16}, "heads": {"topk_text": 6, "topk_image": 6}})
    model = RetrievalModel.create(cfg)
    model.meta.update({"method": "joint", "tau": 0.05})
    return model


def test_import_sdray_is_light_and_exports_the_api():
    code = ("import sys, sdray; assert 'torch' not in sys.modules, 'torch imported eagerly'; "
            "from sdray import RetrievalModel, Retriever, __version__; print(__version__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert re.fullmatch(r"\d+\.\d+\.\d+\S*", out.stdout.strip())


def test_encode_texts_is_independent_of_batch_size(tiny_model):
    texts = ["a red cat", "two blue dogs", "the big tree", "a small boat sits on water", "sky"]
    one = tiny_model.encode_texts(texts, batch_size=1)
    all_ = tiny_model.encode_texts(texts, batch_size=64)
    assert one.dense.shape == (5, tiny_model.backbone.proj_dim)
    assert torch.allclose(one.dense, all_.dense, atol=1e-5)
    assert torch.allclose(one.sparse, all_.sparse, atol=1e-5)
    single = tiny_model.encode_texts("a red cat")
    assert torch.allclose(single.dense[0], all_.dense[0], atol=1e-5)
    assert tiny_model.encode_texts([]).dense.shape == (0, tiny_model.backbone.proj_dim)
    with pytest.raises(ValueError, match="batch_size"):
        tiny_model.encode_texts(texts, batch_size=0)


def test_top_terms_name_the_heaviest_nonzero_word_pieces(tiny_model):
    emb = tiny_model.encode_texts(["a red cat on the grass", "two blue boats"])
    vocab = tiny_model.vocabulary
    for i in range(2):
        terms = emb.top_terms(i, 100)
        nnz = int((emb.sparse[i] > 0).sum())
        assert len(terms) == nnz <= 6  # heads.topk_text
        weights = [w for _, w in terms]
        assert weights == sorted(weights, reverse=True) and all(w > 0 for w in weights)
        top_id = int(torch.argmax(emb.sparse[i]))
        assert terms[0] == (vocab[top_id], pytest.approx(float(emb.sparse[i, top_id])))
    assert emb.top_terms(0, 2) == emb.top_terms(0, 100)[:2]


def test_encode_images_accepts_pil_paths_and_bytes(tiny_model, tmp_path):
    img = Image.new("RGB", (40, 30), (200, 40, 40))
    img.putpixel((3, 3), (0, 255, 0))
    img.save(tmp_path / "a.png")
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    emb = tiny_model.encode_images([img, str(tmp_path / "a.png"), buf.getvalue(), tmp_path / "a.png"],
                                   batch_size=3)
    assert emb.dense.shape == (4, tiny_model.backbone.proj_dim)
    for j in range(1, 4):
        assert torch.allclose(emb.dense[0], emb.dense[j], atol=1e-5)
    other = tiny_model.encode_images(Image.new("RGB", (40, 30), (10, 10, 240)))
    assert other.dense.shape[0] == 1 and not torch.allclose(other.dense[0], emb.dense[0])
    with pytest.raises(TypeError, match="PIL image, a path or bytes"):
        tiny_model.encode_images([123])


def test_save_pretrained_writes_a_card_and_loads_back(tiny_model, tmp_path):
    summary = {"val": {"t2i": {"dense": {"R@1": 0.25, "R@5": 0.5, "R@10": 0.75, "MRR@10": 0.4}},
                       "i2t": {"sparse": {"R@1": 0.125, "R@5": 0.5, "R@10": 0.625, "MRR@10": 0.3}},
                       "sparsity": {"text_nnz": 5.0, "image_nnz": 6.0, "flops": 1.5}}}
    test = {"t2i": {"hybrid": {"R@1": 0.3, "R@5": 0.6, "R@10": 0.8, "MRR@10": 0.45}},
            "sparsity": {"text_nnz": 4.0, "image_nnz": 6.0, "flops": 1.25}}
    out = tmp_path / "m"
    tiny_model.save_pretrained(str(out), summary=summary, test=test, repo_id="me/tiny")
    card = (out / "README.md").read_text()
    front = parse_front_matter(card)
    assert front["library_name"] == "sdray" and front["method"] == "joint"
    assert front["backbone"]["name"] == "clip" and "sparse-retrieval" in front["tags"]
    assert "base_model" not in front  # a local backbone folder is no Hub id
    from sdray.config import with_overrides
    from sdray.model_card import metadata

    hub_cfg = with_overrides(tiny_model.config, {"backbone.path": "Salesforce/blip-itm-base-coco"})
    assert metadata(hub_cfg, {"method": "joint"})["base_model"] == "Salesforce/blip-itm-base-coco"
    assert front["metrics"]["val"]["t2i"]["dense"]["R@1"] == 0.25
    assert front["metrics"]["test"]["t2i"]["hybrid"]["R@10"] == 0.8
    assert front["sparsity"]["test"]["text_nnz"] == 4.0
    assert front["fusion"]["w2"] == tiny_model.config.fusion_weights()[1]
    assert 'RetrievalModel.from_pretrained("me/tiny")' in card
    assert "| t2i | dense | 25.0 | 50.0 | 75.0 | 40.0 |" in card
    loaded = RetrievalModel.from_pretrained(str(out))
    feats = torch.randn(3, tiny_model.backbone.text_dim)
    assert torch.equal(loaded.encode_text_features(feats).sparse, tiny_model.encode_text_features(feats).sparse)
    with pytest.raises(FileNotFoundError, match="no such model folder"):
        RetrievalModel.from_pretrained(str(tmp_path / "missing" / "deeper" / "x"))


def test_from_pretrained_reads_an_offline_hub_cache(tiny_model, tmp_path):
    """A Hub id resolves through huggingface_hub's cache layout with HF_HUB_OFFLINE=1."""
    folder = tmp_path / "src"
    tiny_model.save_pretrained(str(folder))
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hf" / "hub" / "models--someone--tiny-sdray"
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    for f in folder.iterdir():
        (snap / f.name).write_bytes(f.read_bytes())
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    code = ("import torch; from sdray import RetrievalModel; "
            "m = RetrievalModel.from_pretrained('someone/tiny-sdray'); "
            "print(m.meta['method'], m.config.backbone.name, round(m.tau, 4))")
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    env.pop("HF_HUB_CACHE", None)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["joint", "clip", f"{tiny_model.tau:.4f}".rstrip("0").rstrip(".")]
    env["HF_HOME"] = str(tmp_path / "empty")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT)
    assert out.returncode != 0


def _guide_blocks(section: str) -> list[str]:
    text = (ROOT / "docs" / "guide.md").read_text()
    start = text.index(f"## {section}")
    nxt = text.find("\n## ", start + 3)
    body = text[start: nxt if nxt > 0 else len(text)]
    return re.findall(r"```python\n(.*?)```", body, flags=re.S)


@pytest.mark.slow
def test_the_guides_python_api_examples_run(tmp_path, monkeypatch):
    """Every ``python`` block of guide §10, in order, against a small published index."""
    from serve.testing import build_demo_index

    blocks = _guide_blocks("10. Python API")
    assert len(blocks) >= 4
    monkeypatch.chdir(tmp_path)
    build_demo_index("sdray-demo", n_images=8, shards=2, model_uri="sdray-demo/models/joint")
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, "docs/guide.md", "exec"), namespace)
    assert os.path.exists("my-retriever/README.md")
