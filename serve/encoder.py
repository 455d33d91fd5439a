"""The query encoder: backbone + trained heads turning a caption or an image into a query.

:class:`QueryEncoder` is the Serve deployment (``@serve.batch`` for captions and for images,
batch settings through ``user_config``); :class:`LocalEncoder` is the same thing inside the ingress
replica (``ServeConfig.encoder_in_ingress``: one network hop fewer for small deployments). Both
answer ``encode_text/encode_image(item, model_uri) -> {"dense", "sparse_ids", "sparse_vals",
"batch_size"}`` or ``{"error": ...}``, and ``info(model_uri)`` (vocabulary and fusion defaults).

On a GPU (``use_gpu`` and CUDA visible) the towers and heads run on ``cuda``; inputs are moved
there and the query vectors come back to the CPU.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from collections import OrderedDict
from typing import Any

import numpy as np
import torch
from ray import serve

log = logging.getLogger("sdray.serve")


def pick_device(use_gpu: bool) -> str:
    return "cuda" if use_gpu and torch.cuda.is_available() else "cpu"


class Models:
    """Models by URI, loaded once each (thread-safe) on ``device``, the newest ``keep`` kept."""

    def __init__(self, device: str = "cpu", keep: int = 2):
        self._models: OrderedDict[str, Any] = OrderedDict()
        self._lock = threading.Lock()
        self.device = device
        self.keep = keep

    def get(self, uri: str):
        m = self._models.get(uri)
        if m is not None:
            return m
        with self._lock:
            m = self._models.get(uri)
            if m is None:
                from sdray.model import RetrievalModel

                m = RetrievalModel.load(uri)
                _ = m.backbone, m.preprocessor  # load the frozen towers now, not on a request
                if self.device != "cpu":
                    m.backbone.to(self.device)
                    m.heads.to(self.device)
                self._models[uri] = m
                while len(self._models) > self.keep:
                    self._models.popitem(last=False)
            return m


@torch.no_grad()
def _encode(model, kind: str, items: list, device: str):
    """Encoded batch of captions (``list[str]``) or images (``list[PIL.Image]``) on ``device``."""
    if device == "cpu":
        return model.encode_texts(items) if kind == "text" else model.encode_images(items)
    pre = model.preprocessor
    if kind == "text":
        batch = pre.texts(items)
        feats = model.backbone.text_features(torch.from_numpy(batch["input_ids"]).to(device),
                                             torch.from_numpy(batch["attention_mask"]).to(device))
        return model.heads.encode_text(feats)
    pixels = torch.from_numpy(pre.images(items)).to(device)
    return model.heads.encode_image(model.backbone.image_features(pixels))


def _rows(enc) -> list[dict]:
    dense = enc.dense.detach().cpu().numpy().astype(np.float32)
    sparse = enc.sparse.detach().cpu().numpy()
    out = []
    for i in range(len(dense)):
        ids = np.flatnonzero(sparse[i]).astype(np.int32)
        out.append({"dense": dense[i], "sparse_ids": ids,
                    "sparse_vals": sparse[i][ids].astype(np.float32)})
    return out


def encode_batch(models: Models, kind: str, items: list, uris: list[str]) -> list[dict]:
    """Encode a mixed batch (grouped by model URI); failures come back per item as ``error``.

    Error texts are fixed phrases (the exception goes to the log), never exception messages.
    """
    from sdray.data.decode import decode_image

    out: list[dict | None] = [None] * len(items)
    for uri in dict.fromkeys(uris):
        idx = [i for i, u in enumerate(uris) if u == uri]
        try:
            model = models.get(uri)
            if kind == "text":
                rows = _rows(_encode(model, "text", [items[i] for i in idx], models.device))
            else:
                images, ok = [], []
                for i in idx:
                    im, reason = decode_image(items[i], 1 << 40)
                    if im is None:
                        out[i] = {"error": f"image cannot be decoded ({reason})"}
                    else:
                        images.append(im)
                        ok.append(i)
                idx = ok
                rows = _rows(_encode(model, "image", images, models.device)) if images else []
            for i, row in zip(idx, rows):
                out[i] = row | {"batch_size": len(items)}
        except Exception:  # noqa: BLE001 - reported to the caller, never crashes the replica
            log.exception("encoding failed")
            for i in idx:
                out[i] = {"error": "encoder failed"}
    return out


def model_info(model) -> dict:
    """Vocabulary and the model's own fusion defaults (method, w1, w2, tau, rrf_k)."""
    w1, w2 = model.config.fusion_weights()
    return {"vocabulary": list(model.vocabulary),
            "fusion": {"method": model.config.fusion.method, "w1": w1, "w2": w2,
                       "tau": model.tau, "rrf_k": model.config.fusion.rrf_k,
                       "normalize": model.config.fusion.normalize},
            "method": model.meta.get("method")}


class LocalEncoder:
    """The encoder inside the ingress replica: same calls as a QueryEncoder handle, awaited directly.

    Concurrent queries are encoded one batch at a time (a small in-process batcher), so eight
    concurrent captions cost about one forward pass of eight, not eight passes fighting for cores.
    """

    def __init__(self, model_uri: str, use_gpu: bool = False, max_batch_size: int = 16,
                 torch_threads: int | None = None, telemetry=None):
        self.models = Models(pick_device(use_gpu))
        self.models.get(model_uri)
        self.max_batch_size = max_batch_size
        self.telemetry = telemetry  # the ingress's serve.telemetry.Telemetry: batch sizes as Ray metrics
        self._pending: dict[str, list] = {"text": [], "image": []}
        self._busy: dict[str, bool] = {"text": False, "image": False}
        torch.set_num_threads(int(torch_threads or os.cpu_count() or 1))

    async def _submit(self, kind: str, item, uri: str) -> dict:
        fut = asyncio.get_running_loop().create_future()
        self._pending[kind].append((item, uri, fut))
        if not self._busy[kind]:  # a task of its own: a request cut short does not stop it
            self._busy[kind] = True
            asyncio.get_running_loop().create_task(self._drain(kind))
        return await fut

    async def _drain(self, kind: str) -> None:
        try:
            while self._pending[kind]:
                batch = self._pending[kind][: self.max_batch_size]
                del self._pending[kind][: len(batch)]
                if self.telemetry is not None:
                    self.telemetry.batch(len(batch), kind)
                rows = await asyncio.to_thread(encode_batch, self.models, kind,
                                               [b[0] for b in batch], [b[1] for b in batch])
                for (_, _, f), row in zip(batch, rows):
                    if not f.done():
                        f.set_result(row)
        finally:
            self._busy[kind] = False

    async def encode_text(self, text: str, uri: str) -> dict:
        return await self._submit("text", text, uri)

    async def encode_image(self, image: bytes, uri: str) -> dict:
        return await self._submit("image", image, uri)

    async def info(self, uri: str) -> dict:
        return model_info(await asyncio.to_thread(self.models.get, uri))

    async def prepare(self, uri: str) -> bool:
        await asyncio.to_thread(self.models.get, uri)
        return True


@serve.deployment(max_ongoing_requests=64)
class QueryEncoder:
    """Backbone + heads; batches concurrent queries (``@serve.batch``, settings via user_config)."""

    def __init__(self, model_uri: str, use_gpu: bool = False):
        from serve.telemetry import Telemetry

        self.models = Models(pick_device(use_gpu))
        self.default_uri = model_uri
        self.models.get(model_uri)
        self.telemetry = Telemetry()

    def reconfigure(self, cfg: dict) -> None:
        torch.set_num_threads(int(cfg.get("torch_threads") or os.cpu_count() or 1))
        for method in (self.encode_text, self.encode_image):
            if "max_batch_size" in cfg:
                method.set_max_batch_size(int(cfg["max_batch_size"]))
            if "batch_wait_timeout_s" in cfg:
                method.set_batch_wait_timeout_s(float(cfg["batch_wait_timeout_s"]))

    def check_health(self) -> None:
        if not self.models.get(self.default_uri):
            raise RuntimeError("model not loaded")

    async def ping(self) -> bool:
        return True

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def encode_text(self, texts: list[str], uris: list[str]) -> list[dict]:
        self.telemetry.batch(len(texts), "text")
        return await asyncio.to_thread(encode_batch, self.models, "text", texts, uris)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def encode_image(self, images: list[bytes], uris: list[str]) -> list[dict]:
        self.telemetry.batch(len(images), "image")
        return await asyncio.to_thread(encode_batch, self.models, "image", images, uris)

    async def prepare(self, uri: str) -> bool:
        await asyncio.to_thread(self.models.get, uri)
        return True

    async def info(self, uri: str) -> dict:
        return model_info(await asyncio.to_thread(self.models.get, uri))
