"""The quality orderings of the three methods, through the user's commands (``sdray train`` + ``sdray eval``).

Usage::

    sdray synth --out DATA && sdray featurize --data DATA --out FEAT
    python benchmarks/orderings.py --features FEAT --out WORK [--eval-split test] [--set KEY=VALUE ...]
    sdray demo --workdir W --json > demo.json && python benchmarks/orderings.py --demo-json demo.json

``WORK`` is a local folder or an ``s3://`` prefix (S3 settings from the environment, as for every
sdray command). ``--local-s3 DIR`` starts a real S3 server (SeaweedFS, as in the tests) on
127.0.0.1, uploads the features and runs everything against ``s3://`` URIs (``--out`` is then a
prefix in its bucket). The script trains ``dense``, then ``d2s`` and ``joint`` from the dense model
(``--init``, as in the paper), all with the default config, evaluates each on
``FEAT/<eval-split>`` with ``sdray eval --json``, and prints RSUM (R@1+R@5+R@10 of both
directions, in percent, max 600) and the orderings the training issue asks for:

* joint sparse RSUM > d2s sparse RSUM;
* joint sparse RSUM >= 0.95 x the dense model's dense RSUM;
* joint hybrid RSUM >= joint dense RSUM (the default fusion);
* mean nnz <= 256 per caption and per image, for joint and d2s.

Training reuses a finished model at the same ``--out`` (``sdray train`` resumes), so a rerun
only evaluates. The last line of stdout is a JSON object with the per-method results, the
ordering verdicts and the wall-clock seconds of each stage.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

METHODS = ("dense", "d2s", "joint")
NNZ_BUDGET = 256.0


def join(uri: str, *parts: str) -> str:
    return "/".join([uri.rstrip("/"), *parts])


def sdray(*args: str) -> dict:
    """Run one ``sdray`` command (``--json``), streaming its stderr; return its JSON last line."""
    cmd = [sys.executable, "-m", "pipelines.cli", *args, "--json"]
    print("$ sdray " + " ".join(args), file=sys.stderr, flush=True)
    out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def rsum(result: dict, rep: str) -> float:
    return 100 * sum(result[d][rep][f"R@{k}"] for d in ("t2i", "i2t") for k in (1, 5, 10))


def orderings(res: dict) -> list[dict]:
    """Each ordering with both sides and whether it holds."""
    j, d2s, dense = res["joint"], res["d2s"], res["dense"]
    checks = [
        ("joint sparse > d2s sparse", rsum(j, "sparse"), rsum(d2s, "sparse"), ">"),
        ("joint sparse >= 0.95 x dense model's dense", rsum(j, "sparse"), 0.95 * rsum(dense, "dense"), ">="),
        ("joint hybrid >= joint dense", rsum(j, "hybrid"), rsum(j, "dense"), ">="),
    ]
    for m in ("joint", "d2s"):
        for side in ("text_nnz", "image_nnz"):
            checks.append((f"{m} {side} <= {NNZ_BUDGET:g}", res[m]["sparsity"][side], NNZ_BUDGET, "<="))
    ops = {">": lambda a, b: a > b, ">=": lambda a, b: a >= b, "<=": lambda a, b: a <= b}
    return [{"ordering": name, "left": round(a, 2), "right": round(b, 2), "holds": bool(ops[op](a, b))}
            for name, a, b, op in checks]


def print_tables(results: dict, split: str) -> list[dict]:
    """Print the RSUM table (with t2i R@1) and the orderings of ``results``; returns the orderings."""
    print(f"\nRSUM on {split} (max 600)\n| method | dense | sparse | hybrid | t2i R@1 dense | t2i R@1 hybrid | "
          "text nnz | image nnz |\n|---|---|---|---|---|---|---|---|")
    for m, r in results.items():
        print(f"| {m} | {rsum(r, 'dense'):.1f} | {rsum(r, 'sparse'):.1f} | {rsum(r, 'hybrid'):.1f} | "
              f"{100 * r['t2i']['dense']['R@1']:.1f} | {100 * r['t2i']['hybrid']['R@1']:.1f} | "
              f"{r['sparsity']['text_nnz']:.0f} | {r['sparsity']['image_nnz']:.0f} |")
    checks = orderings(results)
    print("\n| ordering | left | right | holds |\n|---|---|---|---|")
    for c in checks:
        print(f"| {c['ordering']} | {c['left']:.1f} | {c['right']:.1f} | {'yes' if c['holds'] else '**no**'} |")
    return checks


def from_demo(path: str) -> int:
    """The tables and orderings of a finished ``sdray demo --json`` (its last stdout line)."""
    with open(path, encoding="utf-8") as f:
        demo = json.loads(f.read().strip().splitlines()[-1])
    checks = print_tables(demo["methods"], "the demo's test split")
    print(f"\nstage seconds: {demo['timings']} (total {demo['total_seconds']:.0f})")
    return 0 if all(c["holds"] for c in checks) else 1


def on_local_s3(args: argparse.Namespace) -> int:
    """:func:`check` with ``s3://`` URIs against a SeaweedFS server on 127.0.0.1 (tests.s3server)."""
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root
    from sdray import storage
    from tests.s3server import S3Server

    with S3Server(args.local_s3) as s3:
        s3.export_env()  # the sdray subprocesses (and their Ray workers) inherit the S3 settings
        for split in ("train", "val", args.eval_split):
            storage.upload_dir(join(args.features, split), s3.uri("features", split))
        return check(argparse.Namespace(**{**vars(args), "features": s3.uri("features"),
                                           "out": s3.uri(args.out.strip("/"))}))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--features", help="featurize output with train/, val/ and the eval split")
    p.add_argument("--out", help="folder or s3:// prefix for the three models")
    p.add_argument("--demo-json", metavar="FILE", help="instead: the tables and orderings of a saved "
                   "`sdray demo --json` output (no training)")
    p.add_argument("--eval-split", default="test")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override for all methods")
    p.add_argument("--num-workers", type=int, default=1)
    p.add_argument("--local-s3", metavar="DIR", help="start a SeaweedFS S3 server on loopback (data in DIR), "
                   "upload --features there and use s3:// URIs for features and --out (a bucket-relative prefix)")
    args = p.parse_args(argv)
    if args.demo_json:
        return from_demo(args.demo_json)
    if not (args.features and args.out):
        p.error("--features and --out are required (or --demo-json)")
    return on_local_s3(args) if args.local_s3 else check(args)


def check(args: argparse.Namespace) -> int:
    """Train and evaluate the three methods, print the tables; 0 when every ordering holds."""
    sets = [a for s in args.set for a in ("--set", s)]
    results, seconds = {}, {}
    for method in METHODS:
        t = time.time()
        train = ["train", "--train", join(args.features, "train"), "--val", join(args.features, "val"),
                 "--out", join(args.out, method), "--method", method, "--num-workers", str(args.num_workers), *sets]
        if method != "dense":
            train += ["--init", join(args.out, "dense")]
        sdray(*train)
        seconds[f"train_{method}"] = round(time.time() - t, 1)
        t = time.time()
        results[method] = sdray("eval", "--model", join(args.out, method), "--data", join(args.features, args.eval_split))
        seconds[f"eval_{method}"] = round(time.time() - t, 1)
    checks = print_tables(results, args.eval_split)
    print(f"\nseconds: {seconds} (total {sum(seconds.values()):.0f})")
    print(json.dumps({"results": results, "orderings": checks, "seconds": seconds}))
    return 0 if all(c["holds"] for c in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
