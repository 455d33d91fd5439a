"""The synthetic scene generator and ``sdray synth`` (no Ray)."""

from __future__ import annotations

import hashlib
import io
from collections import Counter

from sdray import storage
from sdray.data import SkipCounts, iter_shard_samples
from sdray.data.synth import generate_image, generate_samples


def _split_rows(root: str, split: str) -> list[dict]:
    rows = []
    for uri in storage.list_files(storage.join(root, split), (".tar",)):
        counts = SkipCounts()
        rows += list(iter_shard_samples(io.BytesIO(storage.read_bytes(uri)), uri, counts))
        assert not counts
    return rows


def test_generator_is_deterministic_and_varied():
    a = list(generate_samples(7, "train", 30, image_size=64))
    b = list(generate_samples(7, "train", 30, image_size=64))
    assert [s["image"] for s in a] == [s["image"] for s in b]
    assert [s["caption"] for s in a] == [s["caption"] for s in b]
    c = list(generate_samples(8, "train", 30, image_size=64))
    assert [s["image"] for s in a] != [s["image"] for s in c]
    caps = [s["caption"] for s in a]
    assert len(set(caps)) > 0.8 * len(caps)
    words = Counter(w for c in caps for w in c.split())
    assert len(words) > 40                         # templates and synonyms vary
    im, caps2, scene = generate_image(7, "val", 3, image_size=96, captions_per_image=3)
    assert im.size == (96, 96) and len(caps2) == 3 and 1 <= len(scene.groups) <= 2


def test_some_captions_describe_several_images():
    caps = [s["caption"] for s in generate_samples(0, "train", 400, image_size=32,
                                                     captions_per_image=2)]
    by_caption = Counter(caps)
    assert by_caption.most_common(1)[0][1] >= 2


def test_synth_cli_writes_disjoint_splits(tmp_path):
    from pipelines import synth as job
    import argparse

    parser = argparse.ArgumentParser()
    job.add_arguments(parser)
    out = str(tmp_path / "syn")
    args = parser.parse_args(["--out", out, "--n", "60", "--n-val", "12", "--n-test", "10",
                              "--shard-size", "20", "--image-size", "48", "--seed", "3"])
    assert job.main(args) == 0
    meta = storage.read_json(storage.join(out, "synth.json"))
    assert meta["splits"]["train"]["pairs"] == 60
    rows = {s: _split_rows(out, s) for s in ("train", "val", "test")}
    assert len(rows["train"]) == 60 and len(rows["val"]) == 24 and len(rows["test"]) == 20
    hashes = {s: {hashlib.sha1(r["image"]).hexdigest() for r in rs} for s, rs in rows.items()}
    ids = {s: {r["image_id"] for r in rs} for s, rs in rows.items()}
    for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
        assert not hashes[a] & hashes[b] and not ids[a] & ids[b]
    assert len(ids["val"]) == 12
    # same arguments: byte-identical shards
    out2 = str(tmp_path / "syn2")
    assert job.main(parser.parse_args(["--out", out2, "--n", "60", "--n-val", "12", "--n-test",
                                       "10", "--shard-size", "20", "--image-size", "48",
                                       "--seed", "3"])) == 0
    for f in storage.list_files(out, (".tar",)):
        assert storage.read_bytes(f) == storage.read_bytes(f.replace(out, out2))
