"""Every GPU path of sdray, once, on small generated data: the first thing to run on a GPU machine.

Paths (one JSON line each, ``{"path", "ok": true|false|"skipped", "seconds", "throughput",
"unit", "device", ...}``, then a summary line; exit status 0 iff no path failed):

- ``featurize``  the frozen backbone in a Ray Data actor pool: GPU + fp16 autocast, uint8 pixels
  normalised on the device (``--use-gpu``); samples/s.
- ``train``      ``sdray train --val`` (``--use-gpu``: AMP, one worker); validation runs on the
  GPU-resident heads at the end of every epoch, the path that crashed before; pairs/s.
- ``train_2gpu`` two workers with cross-worker negatives all-gathered over NCCL (needs 2 GPUs).
- ``eval``       the kept model's heads on the device, evaluated on the test split; queries/s.
- ``index``      ``sdray index`` (encoder actors on the GPU, IVF dense index, trained on the GPU
  when faiss has GPU support); documents/s.
- ``faiss_gpu``  IVF trained on the GPU and searched through :func:`sdray.index.dense.to_gpu`,
  checked against the CPU index (needs faiss with GPU support and a GPU); queries/s.
- ``serve``      the Serve app with a GPU query encoder (``DeploymentKnobs(num_gpus=1)``), 50
  text queries over HTTP; queries/s.

Without a GPU every path runs its CPU equivalent (``device: "cpu"``) and only the GPU-only ones
(``train_2gpu``, ``faiss_gpu``) are ``"skipped"``; CI runs that mode
(``tests/test_gpu_smoke.py``). On one GPU the whole run is sized to finish in under 6 minutes.

    python benchmarks/gpu_smoke.py                    # GPU when visible, else CPU mode
    python benchmarks/gpu_smoke.py --cpu --n 48       # force the CPU mode
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
import traceback
import urllib.request
from typing import Any, Callable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

SERVE_QUERIES = 50


class Smoke:
    """Runs the paths, prints one JSON line per path and keeps what later paths need."""

    def __init__(self, work: str, gpus: int, n: int, image_size: int, emit: Callable[[str], None] = print):
        self.work, self.gpus, self.n, self.image_size = work, gpus, n, image_size
        self.device = "cuda" if gpus else "cpu"
        self.emit = emit
        self.rows: list[dict[str, Any]] = []
        self.state: dict[str, Any] = {}

    def run(self, path: str, fn: Callable[[], dict], needs: str | None = None) -> dict:
        """Run ``fn`` as ``path`` unless ``needs`` says what is missing (then "skipped").

        ``fn`` returns extra fields; ``items`` (things processed) becomes ``throughput`` =
        items per second of the path's wall time, unless it gives ``throughput`` itself.
        """
        row: dict[str, Any] = {"path": path, "device": self.device}
        if needs is not None:
            row.update(ok="skipped", seconds=0.0, throughput=None, reason=needs)
        else:
            t0 = time.perf_counter()
            try:
                with contextlib.redirect_stdout(sys.stderr):  # stdout carries only the JSON lines
                    extra = fn()
                row["ok"] = True
            except Exception as err:  # noqa: BLE001 - a failed path is reported, the others still run
                extra = {"error": f"{type(err).__name__}: {err}",
                         "trace": traceback.format_exc(limit=6)[-1500:]}
                row["ok"] = False
            row["seconds"] = round(time.perf_counter() - t0, 3)
            items = extra.pop("items", None)
            row["throughput"] = extra.pop("throughput", None) if items is None else round(
                items / max(row["seconds"], 1e-9), 2)
            row.update(extra)
        self.rows.append(row)
        self.emit(json.dumps(row))
        return row

    def summary(self, seconds: float) -> dict[str, Any]:
        counts = {k: sum(1 for r in self.rows if r["ok"] is v) for k, v in
                  (("ok", True), ("failed", False))}
        counts["skipped"] = sum(1 for r in self.rows if r["ok"] == "skipped")
        return {"summary": True, "device": self.device, "gpus": self.gpus, "n": self.n,
                "seconds": round(seconds, 1), **counts}

    # ---- paths ------------------------------------------------------------------------------

    def _p(self, *parts: str) -> str:
        return os.path.join(self.work, *parts)

    def data(self) -> None:
        from pipelines.synth import synth

        n_eval = max(16, self.n // 4)
        synth(self._p("data"), n=self.n, n_val=n_eval, n_test=n_eval, image_size=64,
              shard_size=max(32, self.n // 2), progress=False)

    def featurize(self) -> dict:
        from pipelines.featurize import featurize
        from sdray.config import BackboneConfig

        m = featurize(self._p("data"), self._p("feat"), BackboneConfig(image_size=self.image_size),
                      batch_size=32, use_gpu=bool(self.gpus), fp16=True, progress=False)
        if m["n_samples"] < self.n:
            raise RuntimeError(f"featurized {m['n_samples']} samples, expected at least {self.n}")
        if m["preprocessing"]["image_size"] != self.image_size:
            raise RuntimeError(f"manifest preprocessing {m['preprocessing']} lacks image size {self.image_size}")
        return {"items": m["n_samples"], "unit": "samples/s",
                "fp16": bool(self.gpus)}

    def _train(self, out: str, workers: int) -> dict:
        from pipelines import train as train_job

        parser = argparse.ArgumentParser()
        train_job.add_arguments(parser)
        argv = ["--train", self._p("feat", "train"), "--val", self._p("feat", "val"), "--out", out,
                "--method", "joint", "--epochs", "2", "--batch-size", str(16 * workers),
                "--num-workers", str(workers), "--log-every", "1", "--max-failures", "0",
                "--set", f"backbone.image_size={self.image_size}", "--set", "selection.max_nnz=null"]
        if self.gpus:
            argv.append("--use-gpu")
        summary = train_job.run(parser.parse_args(argv))
        if not summary.get("val"):
            raise RuntimeError("training finished without a validation result")
        return summary

    def train(self) -> dict:
        summary = self._train(self._p("model"), 1)
        self.state["model"] = self._p("model")
        pairs = 2 * self.n
        return {"items": pairs, "unit": "pairs/s (incl. start-up)",
                "amp": bool(self.gpus), "val_rsum_dense": round(
                    sum(summary["val"][d]["dense"][f"R@{k}"] for d in ("t2i", "i2t") for k in (1, 5, 10)), 4)}

    def train_2gpu(self) -> dict:
        out = self._p("model-2gpu")
        summary = self._train(out, 2)
        dist = summary.get("dist") or {}
        if dist.get("backend") != "nccl" or dist.get("world_size") != 2:
            raise RuntimeError(f"expected 2 workers over NCCL, got {dist}")
        with open(os.path.join(out, "metrics.jsonl")) as f:
            rows = [json.loads(line) for line in f]
        if not any("gather_k" in r for r in rows if r.get("type") == "train"):
            raise RuntimeError("no train step reports gathered cross-worker negatives (gather_k)")
        pairs = 2 * self.n
        return {"items": pairs, "unit": "pairs/s (incl. start-up)", **dist}

    def eval(self) -> dict:
        import torch

        from pipelines.evaluate import load_split
        from sdray.evaluation import evaluate_features
        from sdray.model import RetrievalModel

        model = RetrievalModel.load(self.state["model"]).to(self.device)
        data = load_split(self._p("feat", "test"))
        result = evaluate_features(model.heads, data, model.config)
        if torch.device(self.device).type != next(model.heads.parameters()).device.type:
            raise RuntimeError("the heads left the device")
        queries = result["n_texts"] + result["n_images"]
        return {"items": queries, "unit": "queries/s",
                "t2i_dense_R@1": result["t2i"]["dense"]["R@1"]}

    def index(self) -> dict:
        from pipelines.index import run_index
        from sdray.index import IndexConfig

        cfg = IndexConfig.model_validate({"dense": {"kind": "ivf", "nlist": 4, "nprobe": 4},
                                          "sparse": {"kind": "exact"}})
        summary = run_index(self.state["model"], self._p("feat", "test"), self._p("index"), shards=2,
                            config=cfg, use_gpu=bool(self.gpus), progress=False)
        self.state["index"] = self._p("index")
        docs = sum(summary["counts"].values())
        return {"items": docs, "unit": "documents/s"}

    def faiss_gpu(self) -> dict:
        import numpy as np

        from sdray.index.config import DenseIndexConfig
        from sdray.index.dense import DenseIndex, to_gpu

        rng = np.random.default_rng(0)
        x = rng.standard_normal((100_000, 256)).astype(np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        cfg = DenseIndexConfig(kind="ivf", nlist=1024, nprobe=32)
        t0 = time.perf_counter()
        gpu_built = DenseIndex.build(x, cfg)
        build_s = time.perf_counter() - t0
        idx = to_gpu(gpu_built)
        if not idx.on_gpu:
            raise RuntimeError("to_gpu left the index on the CPU")
        q = x[:2000] + 0.01 * rng.standard_normal((2000, 256)).astype(np.float32)
        t0 = time.perf_counter()
        _, got = idx.search(q, 10)
        search_s = time.perf_counter() - t0
        hit = float(np.mean(got[:, 0] == np.arange(2000)))
        if hit < 0.9:
            raise RuntimeError(f"GPU IVF finds the source vector first for only {hit:.2f} of queries")
        return {"throughput": round(2000 / max(search_s, 1e-9), 1), "unit": "queries/s (batch 2000)",
                "ivf_build_s": round(build_s, 3), "top1_is_source": hit}

    def serve(self) -> dict:
        import socket

        from ray import serve

        from serve.app import deploy
        from serve.config import DeploymentKnobs, ServeConfig

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        fields: dict[str, Any] = {"index": self.state["index"], "port": port}
        if self.gpus:  # the GPU knob of the Serve encoder
            fields["encoder"] = DeploymentKnobs(num_gpus=1)
        url = deploy(ServeConfig(**fields), wait_s=240)
        try:
            t0 = time.perf_counter()
            for i in range(SERVE_QUERIES):
                body = json.dumps({"text": f"a red circle number {i}", "k": 5}).encode()
                req = urllib.request.Request(f"{url}/v1/search", body, {"Content-Type": "application/json"})
                with urllib.request.urlopen(req, timeout=60) as r:
                    hits = json.loads(r.read())["hits"]
                if not hits:
                    raise RuntimeError(f"query {i} returned no hits")
            qps = SERVE_QUERIES / (time.perf_counter() - t0)
        finally:
            serve.shutdown()
        return {"throughput": round(qps, 2), "unit": "queries/s (sequential, after start-up)",
                "queries": SERVE_QUERIES}


def gpu_count(force_cpu: bool) -> int:
    import torch

    return 0 if force_cpu else torch.cuda.device_count()


def run_all(work: str, gpus: int, n: int, image_size: int, emit: Callable[[str], None] = print) -> Smoke:
    """Run every path in ``work``; Ray must be initialised (or is started here)."""
    from pipelines.datasets import ensure_ray
    from sdray.index.dense import gpu_available

    smoke = Smoke(work, gpus, n, image_size, emit)
    ensure_ray(num_cpus=max(4, os.cpu_count() or 1))
    import ray

    ray.data.DataContext.get_current().enable_progress_bars = False
    with contextlib.redirect_stdout(sys.stderr):
        smoke.data()
    smoke.run("featurize", smoke.featurize)
    trained = smoke.run("train", smoke.train)["ok"] is True
    smoke.run("train_2gpu", smoke.train_2gpu, needs=None if gpus >= 2 else "needs 2 GPUs")
    no_model = None if trained else "no trained model (train failed)"
    smoke.run("eval", smoke.eval, needs=no_model)
    indexed = smoke.run("index", smoke.index, needs=no_model)["ok"] is True
    smoke.run("faiss_gpu", smoke.faiss_gpu,
              needs=None if gpus and gpu_available() else "needs faiss with GPU support and a GPU")
    smoke.run("serve", smoke.serve, needs=None if indexed else "no index (index failed)")
    return smoke


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cpu", action="store_true", help="CPU mode even when a GPU is visible")
    ap.add_argument("--n", type=int, default=None, help="training pairs (default 512 on GPU, 64 on CPU)")
    ap.add_argument("--image-size", type=int, default=None, help="backbone input (default 224 GPU, 64 CPU)")
    ap.add_argument("--workdir", default=None, help="keep the outputs here (default: a temp folder)")
    args = ap.parse_args(argv)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    gpus = gpu_count(args.cpu)
    n = args.n or (512 if gpus else 64)
    image_size = args.image_size or (224 if gpus else 64)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="sdray-gpu-smoke-") as tmp:
        work = args.workdir or tmp
        os.makedirs(work, exist_ok=True)
        smoke = run_all(work, gpus, n, image_size)
    summary = smoke.summary(time.perf_counter() - t0)
    print(json.dumps(summary), flush=True)
    return 0 if summary["failed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
