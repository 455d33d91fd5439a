"""Mean non-zeros per vector of saved sweep heads, served (top-k capped) and uncapped.

    python benchmarks/uncapped_nnz.py FEAT/test OUT.SETTING.e10.s0.safetensors [...]

Encodes a split's unique captions and images (as eval does) with each saved heads file, built on
the default config, and prints the mean nnz with the caps and without them
(:meth:`sdray.heads.RetrieverHeads.uncapped`): whether a regulariser or the cap sets the length.
"""

import sys

import numpy as np
import torch
from safetensors.torch import load_file

from pipelines.evaluate import read_feature_columns
from sdray import config as config_lib
from sdray.backbones import load_backbone
from sdray.evaluation import dedupe, encode
from sdray.model import build_heads


def mean_nnz(heads, feats: np.ndarray, side: str) -> float:
    """Mean non-zeros per sparse vector of ``feats`` encoded on ``side``."""
    sparse = encode(heads, feats, side)[1].to_dense()
    return float((sparse != 0).sum(1).float().mean())


def main(argv: list[str]) -> int:
    torch.set_num_threads(1)
    data = read_feature_columns(argv[0])
    image_rows, text_rows, _ = dedupe(list(data["image_id"]), [str(c) for c in data["caption"]])
    cfg = config_lib.SdrayConfig()
    for path in argv[1:]:
        heads = build_heads(cfg, load_backbone(cfg.backbone, proj_dim=cfg.heads.dense_dim, seed=0))
        heads.load_state_dict(load_file(path))
        parts = []
        for side, rows in (("text", text_rows), ("image", image_rows)):
            feats = np.asarray(data[f"{side}_features"], dtype=np.float32)[rows]
            served = mean_nnz(heads, feats, side)
            with heads.uncapped():
                uncapped = mean_nnz(heads, feats, side)
            parts.append(f"{side} served {served:.1f} uncapped {uncapped:.1f}")
        print(path.rsplit("/", 1)[-1], "|", "; ".join(parts), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
