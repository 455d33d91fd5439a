"""Old vs new index job on the same feature corpus: same documents, metadata and top-10 hits.

    python benchmarks/scale.py --sizes 20000 --featurize-sizes ''     # writes the corpus and model
    git archive main | tar -x -C /tmp/sdray-old
    python benchmarks/scale_equivalence.py [OLD_CHECKOUT] [WORKDIR]

Builds both indexes with 3 shards (exact sparse, flat dense), then 100 text and 100 image queries
per mode (dense, sparse, hybrid) against both; prints how many top-10 lists are identical.
"""
import os
import subprocess
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
OLD = sys.argv[1] if len(sys.argv) > 1 else "/tmp/sdray-old"
WORK = sys.argv[2] if len(sys.argv) > 2 else "/tmp/sdray-scale"
M, C, CFG = f"{WORK}/model", f"{WORK}/features-20000-s0", f"{WORK}/index-exact.json"
env = dict(os.environ, RAY_AUTH_MODE="disabled", RAY_DATA_DISABLE_PROGRESS_BARS="1")
for tag, cwd in (("new", ROOT), ("old", OLD)):
    out = f"{WORK}/cmp-{tag}"
    subprocess.run(["rm", "-rf", out])
    e = dict(env, PYTHONPATH=cwd) if tag == "old" else env
    subprocess.run([sys.executable, "-m", "pipelines.cli", "index", "--model", M, "--corpus", C, "--out", out,
                    "--shards", "3", "--config", CFG, "--batch-size", "2048"], cwd=cwd, env=e, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
from sdray.index import Retriever
from sdray.model import RetrievalModel
model = RetrievalModel.load(M)
g = torch.Generator().manual_seed(1)
with torch.no_grad():
    q = {"images": model.heads.encode_text(torch.randn(100, 384, generator=g)),
         "captions": model.heads.encode_image(torch.randn(100, 1280, generator=g))}
R = {t: Retriever.load(f"{WORK}/cmp-{t}") for t in ("old", "new")}
for side in ("images", "captions"):
    mo = {k: v for s in R["old"].shards[side] for k, v in zip(s.meta["id"], zip(s.meta["image_id"], s.meta["caption"], s.meta["uri"]))}
    mn = {k: v for s in R["new"].shards[side] for k, v in zip(s.meta["id"], zip(s.meta["image_id"], s.meta["caption"], s.meta["uri"]))}
    print(side, "documents old/new", len(mo), len(mn), "identical metadata:", mo == mn)
same = total = 0
maxdiff = 0.0
for side, enc in q.items():
    for mode in ("dense", "sparse", "hybrid"):
        with torch.no_grad():
            h = {t: r.search(dense=enc.dense, sparse=enc.sparse, k=10, mode=mode, side=side) for t, r in R.items()}
        for a, b in zip(h["old"], h["new"]):
            total += 1
            same += [x.id for x in a] == [x.id for x in b]
            maxdiff = max(maxdiff, max((abs(x.score - y.score) for x, y in zip(a, b)), default=0.0))
print(f"top-10 lists identical (ids, order): {same}/{total}; max |score diff| {maxdiff:.2e}")
