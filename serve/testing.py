"""A small servable index from generated data, for tests, benchmarks and trying the app out.

:func:`build_demo_index` renders synthetic scenes (:mod:`sdray.data.synth`), writes them as a
WebDataset tar corpus, encodes images and captions with an (untrained unless given) model and
publishes a sharded index through :func:`sdray.index.build_index` — the same layout
``sdray index`` writes. Index rows point back at the corpus (``<tar>#<key>``) for thumbnails.

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
                     image_size: int = 96) -> DemoIndex:
    """Corpus + model + published index under ``workdir`` (local path or s3:// prefix).

    Calling it again with other ``start``/``n_images`` publishes a new version of the same
    index (a hot-swap source).
    """
    from sdray.data.formats import tar_shard_bytes
    from sdray.data.synth import generate_samples
    from sdray.evaluation import fusion_params
    from sdray.index import IndexConfig, ShardData, build_index
    from PIL import Image

    model_uri = model_uri or storage.join(workdir, "model")
    model = demo_model(model_uri)
    samples = list(generate_samples(seed, "test", n_images, image_size=image_size,
                                    captions_per_image=captions_per_image, start=start))
    corpus = storage.join(workdir, "corpus", f"{start:06d}-{n_images:06d}.tar")
    storage.write_bytes(corpus, tar_shard_bytes(samples))

    images: dict[str, tuple[bytes, str, str]] = {}
    caps: dict[str, tuple[str, str]] = {}
    for s in samples:
        iid = s["meta"]["image_id"]
        images.setdefault(iid, (s["image"], s["caption"], f"{corpus}#{s['key']}"))
        caps.setdefault(s["caption"], (iid, f"{corpus}#{s['key']}"))
    image_ids = list(images)
    captions = list(caps)
    pil = [Image.open(io.BytesIO(images[i][0])).convert("RGB") for i in image_ids]
    enc_i = model.encode_images(pil)
    enc_t = model.encode_texts(captions)
    vocab = model.vocabulary
    sides = {
        "images": ShardData(dense=enc_i.dense, sparse=enc_i.sparse, ids=image_ids, image_ids=image_ids,
                            captions=[images[i][1] for i in image_ids],
                            uris=[images[i][2] for i in image_ids], vocab_size=len(vocab)),
        "captions": ShardData(dense=enc_t.dense, sparse=enc_t.sparse,
                              ids=["c" + hashlib.sha1(c.encode()).hexdigest()[:12] for c in captions],
                              image_ids=[caps[c][0] for c in captions], captions=captions,
                              uris=[caps[c][1] for c in captions], vocab_size=len(vocab)),
    }
    index = storage.join(workdir, "index")
    version = build_index(index, sides, n_shards=shards, config=IndexConfig(),
                          model=model_uri, vocabulary=vocab,
                          fusion=fusion_params(model.config, model.tau),
                          inputs={"start": start, "n": n_images, "seed": seed, "shards": shards,
                                  "nonce": os.urandom(4).hex()})
    return DemoIndex(index, model_uri, corpus, version, image_ids, captions)

