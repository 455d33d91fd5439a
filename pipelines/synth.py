"""``sdray synth``: the embedded default data, generated scenes as WebDataset shards at any URI.

Layout: ``OUT/{train,val,test}/shard-NNNNN.tar`` (img2dataset layout: ``KEY.jpg``, ``KEY.txt``,
``KEY.json`` with ``image_id``) and ``OUT/synth.json`` (seed, sizes, counts). ``--n`` is the
number of training pairs (image, caption); val and test sizes are in images. Deterministic:
the same arguments give byte-identical shards. Runs in-process (rendering is ~5 ms/image);
splits share no image.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time

from sdray import storage
from sdray.data.formats import tar_shard_bytes
from sdray.data.synth import SPLITS, generate_samples

DEFAULTS = {"n": 4000, "n_val": 500, "n_test": 500, "captions_per_image": 2, "image_size": 128,
            "shard_size": 500}


def synth(out: str, n: int = 4000, seed: int = 0, n_val: int = 500, n_test: int = 500,
          captions_per_image: int = 2, image_size: int = 128, shard_size: int = 500,
          splits: tuple[str, ...] = SPLITS, progress: bool = True) -> dict:
    """Write the splits under ``out``; returns the summary also written to ``OUT/synth.json``."""
    storage.check_access(out, write=True)
    t0 = time.time()
    images = {"train": max(1, math.ceil(n / captions_per_image)), "val": n_val, "test": n_test}
    summary = {"seed": seed, "image_size": image_size, "captions_per_image": captions_per_image,
               "shard_size": shard_size, "splits": {}}
    per_shard = max(1, shard_size // captions_per_image)    # images per shard
    for split in splits:
        n_img = images[split]
        n_pairs, files = 0, []
        for k, start in enumerate(range(0, n_img, per_shard)):
            count = min(per_shard, n_img - start)
            samples = list(generate_samples(seed, split, count, image_size, captions_per_image,
                                            start=start))
            if split == "train":   # --n is exact in pairs
                samples = samples[: max(0, n - n_pairs)]
            if not samples:
                break
            uri = storage.join(out, split, f"shard-{k:05d}.tar")
            storage.write_bytes_atomic(uri, tar_shard_bytes(samples))
            files.append(uri)
            n_pairs += len(samples)
        summary["splits"][split] = {"images": n_img, "pairs": n_pairs, "shards": files}
        if progress:
            print(f"synth: {split}: {n_img} images, {n_pairs} pairs, {len(files)} shards "
                  f"({time.time() - t0:.1f}s)", file=sys.stderr, flush=True)
    summary["seconds"] = round(time.time() - t0, 3)
    storage.write_json(storage.join(out, "synth.json"), summary)
    return summary


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="folder or s3:// prefix")
    parser.add_argument("--n", type=int, default=DEFAULTS["n"], help="training (image, caption) pairs")
    parser.add_argument("--seed", type=int, default=0, help="random seed of the generated scenes")
    parser.add_argument("--n-val", type=int, default=DEFAULTS["n_val"], help="validation images")
    parser.add_argument("--n-test", type=int, default=DEFAULTS["n_test"], help="test images")
    parser.add_argument("--captions-per-image", type=int, default=DEFAULTS["captions_per_image"],
                        help="captions written per image")
    parser.add_argument("--image-size", type=int, default=DEFAULTS["image_size"],
                        help="side of the rendered square images in pixels")
    parser.add_argument("--shard-size", type=int, default=DEFAULTS["shard_size"],
                        help="samples per shard")
    parser.add_argument("--splits", default=",".join(SPLITS),
                        help="comma-separated subset of train,val,test")
    parser.add_argument("--json", action="store_true", help="print the summary as one JSON line")


def main(args: argparse.Namespace) -> int:
    splits = tuple(s.strip() for s in args.splits.split(",") if s.strip())
    bad = [s for s in splits if s not in SPLITS]
    if bad:
        print(f"sdray synth: error: unknown split(s) {bad}; choose from {list(SPLITS)}",
              file=sys.stderr)
        return 2
    summary = synth(args.out, n=args.n, seed=args.seed, n_val=args.n_val, n_test=args.n_test,
                    captions_per_image=args.captions_per_image, image_size=args.image_size,
                    shard_size=args.shard_size, splits=splits)
    if args.json:
        print(json.dumps({"out": args.out, **{k: v for k, v in summary.items()}}))
    else:
        parts = ", ".join(f"{s}: {v['pairs']} pairs" for s, v in summary["splits"].items())
        print(f"wrote {parts} to {args.out}")
    return 0
