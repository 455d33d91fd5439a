"""Featurize throughput: the Ray Data job against a plain in-process PyTorch loop.

Same shards (generated, one caption per image so every sample costs one image forward), same
backbone and image size, same torch thread count, in the same run. Ray is started before
timing; each side's time includes loading the backbone (the Ray job loads it in its actor).

    python benchmarks/featurize.py --n 384 --image-size 128 --threads 2 [--json]

Prints images/s for both and the ratio ray/plain (target: >= 0.85 on 2 cores).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402


def plain_loop(shards: list[str], backbone_cfg, batch_size: int, threads: int) -> tuple[int, float]:
    """Read, decode, preprocess and embed every sample in this process; (n, seconds)."""
    import torch

    from sdray import storage
    from sdray.backbones import load_backbone, load_preprocessor
    from sdray.data import SkipCounts, decode_batch, iter_shard_samples

    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    backbone = load_backbone(backbone_cfg).eval()
    pre = load_preprocessor(backbone_cfg)
    n = 0
    for uri in shards:
        counts = SkipCounts()
        rows = list(iter_shard_samples(io.BytesIO(storage.read_bytes(uri)), uri, counts))
        for i in range(0, len(rows), batch_size):
            chunk = rows[i:i + batch_size]
            batch = {k: np.asarray([r[k] for r in chunk], dtype=object)
                     for k in ("sample_id", "image_id", "caption", "image")}
            out = decode_batch(batch, pre, counts, 40_000_000)
            with torch.inference_mode():
                img = backbone.image_features(torch.from_numpy(out["pixels"]))
                txt = backbone.text_features(torch.from_numpy(out["input_ids"]),
                                             torch.from_numpy(out["attention_mask"]))
            assert img.shape[0] == txt.shape[0] == len(chunk)
            n += len(chunk)
    return n, time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=384, help="images (= samples)")
    ap.add_argument("--image-size", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2, help="torch threads on both sides")
    ap.add_argument("--num-actors", type=int, default=1)
    ap.add_argument("--shard-size", type=int, default=64)
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    from pipelines.datasets import ensure_ray, list_shards
    from pipelines.featurize import featurize
    from pipelines.synth import synth
    from sdray.config import BackboneConfig

    work = args.workdir or tempfile.mkdtemp(prefix="sdray-bench-")
    data = os.path.join(work, "data")
    synth(data, n=args.n, n_val=0, n_test=0, captions_per_image=1, image_size=args.image_size,
          shard_size=args.shard_size, splits=("train",), progress=False)
    shards = list_shards(os.path.join(data, "train"))
    cfg = BackboneConfig(image_size=args.image_size)

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    ensure_ray()
    # warm caches (files, tokenizer) once on a shard so neither side pays first-touch costs
    plain_loop(shards[:1], cfg, args.batch_size, args.threads)

    n_plain, s_plain = plain_loop(shards, cfg, args.batch_size, args.threads)
    t0 = time.perf_counter()
    m = featurize(os.path.join(data, "train"), os.path.join(work, f"feat-{time.time_ns()}"), cfg,
                  batch_size=args.batch_size, num_actors=args.num_actors,
                  threads=max(1, args.threads // args.num_actors), progress=False)
    s_ray = time.perf_counter() - t0
    n_ray = m["n_samples"]
    assert n_ray == n_plain, (n_ray, n_plain)
    res = {"images": n_plain, "image_size": args.image_size, "threads": args.threads,
           "num_actors": args.num_actors, "cpus": os.cpu_count(),
           "plain_images_per_s": round(n_plain / s_plain, 2),
           "ray_images_per_s": round(n_ray / s_ray, 2),
           "ratio": round((n_ray / s_ray) / (n_plain / s_plain), 3),
           "plain_s": round(s_plain, 2), "ray_s": round(s_ray, 2),
           "load_avg_1m": round(os.getloadavg()[0], 2)}
    print(f"plain loop: {res['plain_images_per_s']} images/s ({s_plain:.1f}s); "
          f"ray featurize: {res['ray_images_per_s']} images/s ({s_ray:.1f}s); "
          f"ratio {res['ratio']}", file=sys.stderr)
    if args.json:
        print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
