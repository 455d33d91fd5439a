"""``sdray index`` on Ray, end to end on the S3 test server: raw corpus → sharded index, both
directions, representatives = smallest sample_id, shard count from --max-docs-per-shard,
N shards = 1 shard, interrupted build resumes without touching the published index,
index-based evaluation == brute-force evaluation."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest

from sdray import storage

pytestmark = pytest.mark.slow

# small shards use the exact sparse scorer (Seismic has a fixed build cost); flat FAISS: exact
CFG = {"sparse": {"min_docs": 100000}, "dense": {"kind": "flat"}}


@pytest.fixture(scope="module")
def setup(ray_session, s3_server, tmp_path_factory):
    from pipelines.synth import synth
    from sdray.backbones import save_tiny
    from sdray.config import from_dict
    from sdray.model import RetrievalModel

    tmp = tmp_path_factory.mktemp("indexjob")
    tiny = save_tiny("clip", tmp / "tinyclip")
    cfg = from_dict({"backbone": {"name": "clip", "path": str(tiny), "image_size": 32, "max_text_length": 64},
                     "heads": {"topk_text": 8, "topk_image": 8}})
    root = s3_server.uri("indexjob")
    model_uri = storage.join(root, "model")
    RetrievalModel.create(cfg).save(model_uri)
    # 12 images x 2 captions in 2 tar shards, plus one caption shared by two images (dedup)
    synth(storage.join(root, "data"), n=24, n_val=0, n_test=0, image_size=32, shard_size=12,
          splits=("train",), progress=False)
    return {"root": root, "model": model_uri, "corpus": storage.join(root, "data", "train")}


def _run(setup, out, shards=None, **kw):
    from pipelines.index import run_index

    return run_index(setup["model"], setup["corpus"], out, shards, CFG, batch_size=16, progress=False, **kw)


def _all_hits(uri, model, texts, images, version=None):
    from sdray.index import Retriever

    r = Retriever.load(uri, version=version)
    try:
        out = {}
        for mode in ("dense", "sparse", "hybrid"):
            for q in (r.search_text(model, texts, k=50, mode=mode), r.search_images(model, images, k=50, mode=mode)):
                out.setdefault(mode, []).append([[(h.id, h.score) for h in hits] for hits in q])
        return out
    finally:
        r.close()


def _same_hits(a, b):
    for mode in a:
        for qa, qb in zip(a[mode], b[mode]):
            for la, lb in zip(qa, qb):
                # encoding batches differ between builds: equal up to float32 noise (which may
                # reorder exact ties)
                assert np.allclose([s for _, s in la], [s for _, s in lb], atol=1e-5), mode
                da, db = dict(la), dict(lb)
                assert set(da) == set(db), mode
                assert np.allclose([da[i] for i in da], [db[i] for i in da], atol=1e-5), mode


def test_index_job_both_sides_shards_resume_and_eval(setup, capsys):
    import io

    from PIL import Image

    from pipelines import index as job
    from pipelines.datasets import list_shards
    from pipelines.evaluate import load_split
    from sdray.data.formats import iter_shard_samples
    from sdray.data.skips import SkipCounts
    from sdray.evaluation import evaluate_features
    from sdray.index import Retriever, current_version, load_manifest
    from sdray.index.evaluate import evaluate_index, evaluate_index_uri
    from sdray.model import RetrievalModel
    from serve.images import read_image_bytes

    root = setup["root"]
    model = RetrievalModel.load(setup["model"])

    # --- one shard, through the CLI entry point (flags, --config, --json)
    cfg_file = storage.join(root, "index.yaml")
    storage.write_bytes(cfg_file, json.dumps(CFG).encode())
    parser = argparse.ArgumentParser()
    job.add_arguments(parser)
    one = storage.join(root, "idx1")
    args = parser.parse_args(["--model", setup["model"], "--corpus", setup["corpus"], "--out", one,
                              "--shards", "1", "--config", cfg_file, "--batch-size", "16", "--json"])
    assert job.main(args) == 0
    summary1 = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary1["shards"] == 1 and summary1["samples"] == 24

    samples = []
    for shard in list_shards(setup["corpus"]):
        with storage.open_uri(shard, "rb") as f:
            samples += list(iter_shard_samples(f, shard, SkipCounts()))
    n_images = len({s["image_id"] for s in samples})
    n_caps = len({s["caption"] for s in samples})
    assert summary1["counts"] == {"images": n_images, "captions": n_caps}

    # --- image rows point back at the corpus in a form serve/images.py reads
    r1 = Retriever.load(one)
    meta = r1.shards["images"][0].meta
    by_id = {s["image_id"]: s["image"] for s in samples}
    for iid, uri, loc in list(zip(meta["image_id"], meta["uri"], meta["image_loc"]))[:3]:
        assert "#" in uri and uri.startswith(setup["corpus"]) and loc.startswith("bytes=")
        assert read_image_bytes(uri, loc) == by_id[iid]     # one member, by its recorded range
    assert set(r1.shards["captions"][0].meta["caption"]) == {s["caption"] for s in samples}
    assert r1.vocabulary is not None and len(r1.vocabulary) == r1.shards["images"][0].docs.dim
    # dedupe is exact and each document's metadata comes from its smallest sample_id
    first_of_image, first_of_caption = {}, {}
    for s in sorted(samples, key=lambda s: s["sample_id"]):
        first_of_image.setdefault(s["image_id"], s)
        first_of_caption.setdefault(s["caption"], s)
    assert sorted(meta["image_id"]) == sorted(first_of_image)
    for iid, cap, uri in zip(meta["image_id"], meta["caption"], meta["uri"]):
        rep = first_of_image[iid]
        assert cap == rep["caption"] and uri.endswith("#" + rep["sample_id"].partition("/")[2])
    cmeta = r1.shards["captions"][0].meta
    for cap, iid in zip(cmeta["caption"], cmeta["image_id"]):
        assert iid == first_of_caption[cap]["image_id"]
    assert len(set(r1.shards["images"][0].doc_no)) == n_images
    r1.close()

    # --- rebuild the same OUT with <= 10 documents per shard (24 samples: 3 shards), interrupted
    # after one shard: the published (1-shard) index is untouched; running it again resumes and
    # publishes the 3-shard version
    from pipelines.index import Interrupted

    v_old = current_version(one)
    assert v_old == summary1["version"]
    with pytest.raises(Interrupted):
        _run(setup, one, max_docs_per_shard=10, interrupt_after=1)
    assert current_version(one) == v_old                         # still the old version
    assert storage.exists(storage.join(one, "_building.json"))
    Retriever.load(one).close()                                  # and it still loads
    resumed = _run(setup, one, max_docs_per_shard=10)
    assert resumed["shards"] == 3 and resumed["estimate"] == {"samples": 24, "exact": True}
    assert resumed["resumed"] and len(resumed["reused"]) >= 1 and resumed["version"] != v_old
    assert sum(resumed["encoded"].values()) < n_images + n_caps   # reused shards not re-encoded
    assert current_version(one) == resumed["version"]
    assert not storage.exists(storage.join(one, "_building.json"))
    m = load_manifest(one)
    assert len(m["shards"]) == 3 and m["sides"]["images"]["count"] == n_images
    assert m["sides"]["captions"]["count"] == n_caps

    # --- N shards == 1 shard, both directions, every mode
    texts = sorted({s["caption"] for s in samples})[:5]
    imgs = [Image.open(io.BytesIO(s["image"])).convert("RGB") for s in samples[:4]]
    _same_hits(_all_hits(one, model, texts, imgs, version=v_old), _all_hits(one, model, texts, imgs))

    # --- index-based evaluation == brute force on the same data
    data = load_split(setup["corpus"], model)
    brute = evaluate_features(model.heads, data, model.config)
    r = Retriever.load(one, version=v_old)
    results = {v_old: evaluate_index(r, model.heads, data, model.config)}
    r.close()
    results[resumed["version"]] = evaluate_index_uri(one, model, data)   # the published one
    for version, via in results.items():
        for d in ("t2i", "i2t"):
            for rep in ("dense", "sparse", "hybrid"):
                assert via[d][rep] == pytest.approx(brute[d][rep], abs=1e-12), (version, d, rep)
        assert via["sparsity"] == pytest.approx(brute["sparsity"])
        assert (via["n_texts"], via["n_images"]) == (brute["n_texts"], brute["n_images"])
    # per-query fusions (z-scores, RRF ranks) equal brute force once the candidates cover each side
    tau = float(model.heads.tau.detach())
    per_query = {"zscore": {"method": "calibrated", "w1": 1.0, "w2": 0.3, "tau": tau, "normalize": "zscore"},
                 "rrf": {"method": "rrf", "k_rrf": 60.0},
                 "confidence": {"method": "calibrated", "w1": 1.0, "w2": 0.3, "tau": tau, "confidence_power": 1.0,
                                "cosine_slope": 5.0, "cosine_pivot": 0.2}}
    brute = evaluate_features(model.heads, data, model.config, extra_fusions=per_query)
    r = Retriever.load(one)
    for name, fusion in per_query.items():
        via = evaluate_index(r, model.heads, data, model.config, fusion=fusion,
                             candidates=max(brute["n_texts"], brute["n_images"]))
        for d in ("t2i", "i2t"):
            assert via[d]["hybrid"] == pytest.approx(brute[d][f"hybrid_{name}"], abs=1e-12), (name, d)
    r.close()


def test_index_job_on_feature_shards_dedupes_across_files(setup, tmp_path):
    """Feature shards (as featurize writes them) with copies of images and captions spread over
    files: exact dedupe across shards, representatives' metadata, eval through the index ==
    brute force. Local folder, so both storage back-ends run the job."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipelines.evaluate import load_split
    from sdray.evaluation import evaluate_features
    from sdray.index import Retriever
    from sdray.index.evaluate import evaluate_index_uri
    from sdray.model import RetrievalModel

    model = RetrievalModel.load(setup["model"])
    td, idim = model.backbone.text_dim, model.backbone.image_dim
    rng = np.random.default_rng(3)
    img_feats = rng.standard_normal((10, idim)).astype(np.float32)
    cap_feats = rng.standard_normal((14, td)).astype(np.float32)
    corpus = tmp_path / "features"
    corpus.mkdir()
    rows = []   # (sample_id, image, caption): every image twice, captions 0-3 shared by two images
    for s in range(20):
        rows.append((f"part-{s % 3}/{s:04d}", s % 10, s % 14))
    for f in range(3):
        part = [r for r in rows if r[0].startswith(f"part-{f}/")]
        pq.write_table(pa.table({
            "sample_id": [r[0] for r in part], "image_id": [f"img{r[1]}" for r in part],
            "caption": [f"caption number {r[2]}" for r in part],
            "text_features": pa.FixedSizeListArray.from_arrays(pa.array(cap_feats[[r[2] for r in part]].ravel()), td),
            "image_features": pa.FixedSizeListArray.from_arrays(pa.array(img_feats[[r[1] for r in part]].ravel()), idim),
        }), corpus / f"part-{f}.parquet")
    out = str(tmp_path / "index")
    summary = _run({**setup, "corpus": str(corpus)}, out, max_docs_per_shard=8)
    assert summary["shards"] == 3 and summary["samples"] == 20
    assert summary["counts"] == {"images": 10, "captions": 14}
    r = Retriever.load(out)
    firsts = {}
    for sid, img, cap in sorted(rows):
        firsts.setdefault(("images", f"img{img}"), f"caption number {cap}")
        firsts.setdefault(("captions", f"caption number {cap}"), f"img{img}")
    for shard in r.shards["images"]:
        for iid, cap in zip(shard.meta["image_id"], shard.meta["caption"]):
            assert cap == firsts[("images", iid)]
    for shard in r.shards["captions"]:
        for cap, iid in zip(shard.meta["caption"], shard.meta["image_id"]):
            assert iid == firsts[("captions", cap)]
    r.close()
    data = load_split(str(corpus), model)
    brute = evaluate_features(model.heads, data, model.config)
    via = evaluate_index_uri(out, model, data)
    for d in ("t2i", "i2t"):
        for rep in ("dense", "sparse", "hybrid"):
            assert via[d][rep] == pytest.approx(brute[d][rep], abs=1e-12), (d, rep)


def test_tar_corpus_size_is_estimated_from_a_sample_of_shards(setup):
    """More tars than sampled: one tar is read and the count scaled by bytes (S3 listing sizes);
    with every tar sampled the count is exact."""
    from pipelines.corpus_size import raw_corpus_size

    est = raw_corpus_size(setup["corpus"], sample_shards=1)
    assert not est.exact and abs(est.rows - 24) <= 3, est
    assert raw_corpus_size(setup["corpus"], sample_shards=2) == type(est)(24, True)
