"""Forward time of the packaged backbone's frozen towers on this machine (CPU unless --device).

Images: batch 32 at 224 px through EfficientNet-Lite0 -> 1280-d pooled features.
Captions: batch 256 at 32 tokens through MiniLM-L6 -> 384-d mean-pooled features.
Prints the median over ``--runs`` timed runs (after one warm-up), per item and per second,
plus the feature sizes of every backbone kind (HF kinds from tiny random checkpoints).

    python benchmarks/backbone_forward.py [--runs 5] [--device cpu]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch
from PIL import Image

from sdray.backbones import load_backbone, save_tiny
from sdray.config import BackboneConfig


def median_seconds(fn, runs: int) -> tuple[float, float]:
    """Median (wall, process CPU) seconds of ``fn()`` over ``runs`` calls, after a warm-up call.

    CPU time (all threads) is the figure to compare on a shared machine, where wall time also
    counts waiting for cores other processes hold.
    """
    fn()
    wall, cpu = [], []
    for _ in range(runs):
        start, start_cpu = time.perf_counter(), time.process_time()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return statistics.median(wall), statistics.median(cpu)


def dims_table() -> list[str]:
    """One line per backbone kind: text_dim, image_dim, proj_dim, vocab_size."""
    rows = [("packaged", load_backbone(BackboneConfig()))]
    with tempfile.TemporaryDirectory() as tmp:
        for kind in ("clip", "blip", "siglip"):
            cfg = BackboneConfig(name=kind, path=str(save_tiny(kind, f"{tmp}/{kind}")), image_size=32)
            rows.append((f"{kind} (tiny)", load_backbone(cfg)))
    return [f"{name:15s} text_dim={b.text_dim:5d} image_dim={b.image_dim:5d} "
            f"proj_dim={b.proj_dim:4d} vocab={b.vocab_size}" for name, b in rows]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    backbone = load_backbone(BackboneConfig(image_size=224, max_text_length=32)).to(args.device)
    pre = backbone.preprocessor
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (300, 400, 3), dtype=np.uint8)) for _ in range(32)]
    pixels = torch.from_numpy(pre.images(images)).to(args.device)
    words = pre.vocabulary[2000:12000]
    captions = [" ".join(rng.choice(words, 40)) for _ in range(256)]  # truncated to 32 tokens
    batch = {k: torch.from_numpy(v).to(args.device) for k, v in pre.texts(captions).items()}

    rows = [("image forward (224 px, batch 32)", "image", 32,
             lambda: backbone.image_features(pixels)),
            ("text forward (32 tok, batch 256)", "caption", 256,
             lambda: backbone.text_features(**batch)),
            ("preprocess images (400x300 -> 224)", "image", 32, lambda: pre.images(images)),
            ("preprocess captions", "caption", 256, lambda: pre.texts(captions))]
    print(f"device={args.device} torch_threads={torch.get_num_threads()} runs={args.runs} "
          f"loadavg={os.getloadavg()[0]:.1f}")
    for label, unit, n, fn in rows:
        wall, cpu = median_seconds(fn, args.runs)
        print(f"{label:36s} {1e3 * wall / n:8.2f} ms/{unit} wall ({n / wall:7.1f}/s)  "
              f"{1e3 * cpu / n:8.2f} ms/{unit} cpu")
    print("\n".join(dims_table()))


if __name__ == "__main__":
    main()
