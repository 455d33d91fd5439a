"""benchmarks/realdata.py on two tiny fake icon packages (no network): concepts shared by sets,
captions from names and tags, splits by concept, shards sdray reads with unique keys."""

from __future__ import annotations

import io
import json
import os
import sys
import tarfile

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
realdata = pytest.importorskip("realdata")
pytest.importorskip("resvg_py")

SVG = ('<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 24 24">'
       '<circle cx="12" cy="12" r="{r}" fill="black"/></svg>')
CONCEPTS = ["heart", "camera", "umbrella", "bell", "anchor", "rocket", "candle", "tree"]


def _tgz(path: str, files: dict[str, bytes]) -> None:
    with tarfile.open(path, "w:gz") as tf:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))


@pytest.fixture
def fake_sources(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    cache.mkdir()
    tabler = {"package/icons.json": json.dumps({
        c: {"name": c, "tags": [f"{c} tag", "shared term", "x"]} for c in CONCEPTS + ["tabler-only"]
    }).encode()}
    tabler.update({f"package/icons/outline/{c}.svg": SVG.format(r=3 + k).encode()
                   for k, c in enumerate(CONCEPTS + ["tabler-only"])})
    lucide = {"package/tags.json": json.dumps({c: ["shared term", "lucide word"] for c in CONCEPTS}).encode()}
    lucide.update({f"package/icons/{c}.svg": SVG.format(r=9 - k % 5).encode() for k, c in enumerate(CONCEPTS)})
    _tgz(str(cache / "tabler-icons-1.0.0.tgz"), tabler)
    _tgz(str(cache / "lucide-static-1.0.0.tgz"), lucide)
    monkeypatch.setattr(realdata, "SOURCES", (
        realdata.Source("tabler", "@tabler/icons", "1.0.0", realdata.read_tabler),
        realdata.Source("lucide", "lucide-static", "1.0.0", realdata.read_lucide)))
    return cache


def test_build_writes_shards_split_by_concept(fake_sources, tmp_path):
    from sdray.data.formats import iter_tar_samples
    from sdray.data.skips import SkipCounts

    out = tmp_path / "rd"
    assert realdata.main(["build", str(out), "--cache", str(fake_sources), "--image-size", "32",
                          "--train-fraction", "0.5", "--val-fraction", "0.2"]) == 0
    summary = json.loads((out / "realdata.json").read_text())
    splits = summary["splits"]
    # "tabler-only" is drawn by one set: dropped; every kept concept has both sets' images
    assert sum(splits[s]["concepts"] for s in ("train", "val", "test")) == len(CONCEPTS)
    assert sum(splits[s]["images"] for s in ("train", "val", "test")) == 2 * len(CONCEPTS)
    concept_split, keys, pairs = {}, set(), {}
    counts = SkipCounts()
    for split in ("train", "val", "test"):
        for shard in sorted((out / split).glob("*.tar")):
            with open(shard, "rb") as f:
                for s in iter_tar_samples(f, str(shard), counts):   # what sdray reads
                    concept = s["caption"].split(",")[0]
                    assert concept_split.setdefault(concept, split) == split
                    key = s["sample_id"].rsplit("/", 1)[-1]
                    assert key not in keys
                    keys.add(key)
                    pairs.setdefault(s["caption"], set()).add(s["image_id"])
    assert not counts, counts
    assert set(concept_split) == set(CONCEPTS)
    # two captions per concept (the name; the name with the shared terms first), each paired
    # with both sets' images: several relevant images per caption
    assert pairs["heart"] == {"tabler/heart", "lucide/heart"}
    assert pairs["heart, shared term, heart tag, lucide word"] == {"tabler/heart", "lucide/heart"}
    assert len(pairs) == 2 * len(CONCEPTS)
    assert realdata.split_of("heart", (0.5, 0.2)) == concept_split["heart"]


def test_normalised_names_and_concept_filter():
    assert realdata.normalise("Arrow-Big_Right") == "arrow big right"
    assert realdata.is_concept("arrow big right") and not realdata.is_concept("a b 2")
