"""A small servable index from generated data, for tests, benchmarks and trying the app out.

:func:`build_demo_index` renders synthetic scenes (:mod:`sdray.data.synth`), writes them as a
WebDataset tar (or Parquet) corpus, encodes images and captions with an (untrained unless given)
model and publishes a sharded index through :func:`sdray.index.build_index` — the same layout
``sdray index`` writes. Index rows point back at the corpus (``<shard>#<key>`` and the image's
location in it, as the corpus reader reports them) for thumbnails.

No Ray needed. The untrained model's rankings are arbitrary; the point is the contract.
"""

from __future__ import annotations

import hashlib
import io
import os
from dataclasses import dataclass

from sdray import storage


@dataclass
class DemoIndex:
    index: str
    model: str
    corpus: str
    version: str
    image_ids: list[str]
    captions: list[str]


def demo_model(uri: str, topk: int = 48):
    """An untrained :class:`~sdray.model.RetrievalModel` (packaged backbone) saved at ``uri``."""
    from sdray.config import SdrayConfig, from_dict
    from sdray.model import RetrievalModel

    if storage.exists(storage.join(uri, "heads.safetensors")):
        return RetrievalModel.load(uri)
    cfg = from_dict({"heads": {"topk_text": topk, "topk_image": topk}}, SdrayConfig())
    model = RetrievalModel.create(cfg)
    model.save(uri)
    return model


def build_demo_index(workdir: str, n_images: int = 16, shards: int = 2, seed: int = 0,
                     model_uri: str | None = None, start: int = 0, captions_per_image: int = 2,
                     image_size: int = 96, corpus_format: str = "tar", row_group_size: int | None = None,
                     locations: bool = True, source_urls: bool = False) -> DemoIndex:
    """Corpus + model + published index under ``workdir`` (local path or s3:// prefix).

    Calling it again with other ``start``/``n_images`` publishes a new version of the same
    index (a hot-swap source). ``corpus_format``: ``tar`` or ``parquet`` (``row_group_size``
    rows per row group); ``locations=False`` leaves out the image locations (an index built
    before they were recorded); ``source_urls`` gives every sample an ``https://`` source url.
    """
    from sdray.data.formats import iter_shard_samples, parquet_shard_bytes, tar_shard_bytes
    from sdray.data.skips import SkipCounts
    from sdray.data.synth import generate_samples
    from sdray.evaluation import fusion_params
    from sdray.index import IndexConfig, ShardData, build_index
    from PIL import Image

    model_uri = model_uri or storage.join(workdir, "model")
    model = demo_model(model_uri)
    samples = list(generate_samples(seed, "test", n_images, image_size=image_size,
                                    captions_per_image=captions_per_image, start=start))
    if source_urls:
        for s in samples:
            s["meta"]["url"] = s["url"] = f"https://images.example/{s['key']}.jpg"
    corpus = storage.join(workdir, "corpus", f"{start:06d}-{n_images:06d}.{corpus_format}")
    if corpus_format == "parquet":
        data = parquet_shard_bytes([s | {"image_id": s["meta"]["image_id"]} for s in samples], row_group_size)
    else:
        data = tar_shard_bytes(samples)
    storage.write_bytes(corpus, data)

    images: dict[str, dict] = {}
    caps: dict[str, dict] = {}
    for s in iter_shard_samples(io.BytesIO(data), corpus, SkipCounts()):
        s["uri"] = f"{corpus}#{s['key']}"
        s["image_loc"] = s["image_loc"] if locations else None
        images.setdefault(s["image_id"], s)
        caps.setdefault(s["caption"], s)
    image_ids = list(images)
    captions = list(caps)

    def column(rows: list[dict], name: str) -> list:
        return [r[name] for r in rows]

    pil = [Image.open(io.BytesIO(images[i]["image"])).convert("RGB") for i in image_ids]
    enc_i = model.encode_images(pil)
    enc_t = model.encode_texts(captions)
    vocab = model.vocabulary
    sides = {
        side: ShardData(dense=enc.dense, sparse=enc.sparse, ids=ids, image_ids=column(rows, "image_id"),
                        captions=column(rows, "caption"), uris=column(rows, "uri"), urls=column(rows, "url"),
                        image_locs=column(rows, "image_loc"), vocab_size=len(vocab))
        for side, enc, ids, rows in (
            ("images", enc_i, image_ids, [images[i] for i in image_ids]),
            ("captions", enc_t, ["c" + hashlib.sha1(c.encode()).hexdigest()[:12] for c in captions],
             [caps[c] for c in captions]))
    }
    index = storage.join(workdir, "index")
    version = build_index(index, sides, n_shards=shards, config=IndexConfig(),
                          model=model_uri, vocabulary=vocab,
                          fusion=fusion_params(model.config, model.tau),
                          inputs={"start": start, "n": n_images, "seed": seed, "shards": shards,
                                  "nonce": os.urandom(4).hex()})
    return DemoIndex(index, model_uri, corpus, version, image_ids, captions)

