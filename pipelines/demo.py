"""``sdray demo``: the whole pipeline on the embedded defaults, in one process and one Ray instance.

    sdray demo [--workdir DIR] [--json] [--size small|full] [--n N] [--epochs E] [--port P]

Stages (each one is the library/job function the matching ``sdray`` subcommand runs)::

    synth       generated scenes -> WebDataset shards          WORK/data/{train,val,test}
    featurize   packaged MiniLM + EfficientNet-Lite0 features  WORK/features/{train,val,test}
    train       dense, then d2s and joint from the dense model WORK/models/{dense,d2s,joint}
    eval        each model on the test split                   WORK/eval/{method}.json
    index       the joint model over the test corpus           WORK/index
    serve       Ray Serve endpoint, sample text and image queries with explanations, shutdown
    report      comparison table, WORK/report.md and WORK/plots/*.png

A local Ray instance is started once (or ``RAY_ADDRESS`` is joined) and shut down at the end.
``WORK/demo_state.json`` records every finished stage with a fingerprint of the settings it
depends on; a re-run with the same ``--workdir`` reuses the finished stages whose fingerprint
still matches (and whose outputs exist), and redoes the rest. ``--json`` prints
``{"methods": {"dense": EVAL, "d2s": EVAL, "joint": EVAL}, "timings": {...}, ...}`` as the last
line of stdout (EVAL: the ``sdray eval --json`` object, DESIGN.md §4).
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import json
import os
import shutil
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

METHODS = ("dense", "d2s", "joint")
STATE = "demo_state.json"

# Sizes: `full` is the default demo; `small` is what the test runs. `dense_epochs`: the dense
# model's validation RSUM is flat after its 4th epoch (docs/benchmarks.md, "The embedded demo").
# `epochs`, d2s's and joint's equal budget: joint's validation sparse RSUM is flat from its 5th
# epoch; d2s would still gain (test sparse RSUM 301.2 at 6 epochs, 307.8 at 8), but the demo must
# end within 10 minutes on a 2-core machine 2.75x slower than the docs' one, and joint's sparse
# side leads d2s's by more than 30 RSUM at either length.
SIZES: dict[str, dict[str, Any]] = {
    "full": {"n": 4000, "n_val": 250, "n_test": 500, "epochs": 6, "dense_epochs": 5,
             "batch_size": 256, "image_size": 96, "shards": 2},
    "small": {"n": 512, "n_val": 48, "n_test": 64, "epochs": 2, "dense_epochs": 2,
              "batch_size": 128, "image_size": 96, "shards": 2},
}
CAPTIONS_PER_IMAGE = 2
# Per-method settings of the demo on top of the config defaults (the user's --set wins). Empty:
# the defaults are tuned for the packaged backbone on generated data (docs/sweep.md).
METHOD_SETS: dict[str, list[str]] = {"dense": [], "d2s": [], "joint": []}


def log(msg: str) -> None:
    logging.getLogger("pipelines.demo").info(msg)


def _fp(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


class Stages:
    """Runs named stages once per fingerprint; remembers timings in ``WORK/demo_state.json``."""

    def __init__(self, workdir: str, fresh: bool = False):
        self.workdir = workdir
        self.path = os.path.join(workdir, STATE)
        self.state: dict[str, Any] = {"stages": {}}
        if not fresh and os.path.exists(self.path):
            try:
                with open(self.path, encoding="utf-8") as f:
                    self.state = json.load(f)
            except (OSError, ValueError):
                self.state = {"stages": {}}
        self.timings: dict[str, float] = {}
        self.reused: list[str] = []
        self.ran: list[str] = []
        self.together: list[list[str]] = []
        self.n_total = 0
        self.n_done = 0
        self._lock = threading.Lock()

    def _save(self) -> None:
        tmp = self.path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(self.state, f, indent=2, sort_keys=True)
        os.replace(tmp, self.path)

    def run(self, name: str, fingerprint: str, outputs: list[str], fn: Callable[[], Any],
            reusable: bool = True) -> Any:
        """Run ``fn`` unless a finished run with this fingerprint left all ``outputs`` behind."""
        prog = self._next(name)
        if reusable and self._reuse(name, fingerprint, outputs, prog):
            return self.state["stages"][name].get("result")
        result = self._execute(name, fingerprint, outputs, fn, prog)
        self.ran.append(name)
        return result

    def run_together(self, stages: list[tuple[str, str, list[str], Callable[[int], Any]]],
                     cpus: int, side_by_side: bool = True) -> list[Any]:
        """Run independent stages side by side, each ``fn(cpus_share)`` on an equal share of
        ``cpus``; a stage that can be reused is, and a single stage left to run gets every CPU
        (as does each stage with ``side_by_side=False``: one after the other).

        Two trainings of one worker each keep two cores busier than one training of two threads
        (the data loading, validation and Ray Train's start-up of one overlap the other's steps),
        so the demo trains d2s and joint this way. ``timings`` keeps each stage's own wall time;
        ``together`` records that they overlapped (``sdray.report.timings_table`` counts such a
        group once, at its longest stage).
        """
        progs = [self._next(name) for name, *_ in stages]
        todo = [(stage, prog) for stage, prog in zip(stages, progs)
                if not self._reuse(stage[0], stage[1], stage[2], prog)]
        share = max(1, cpus // max(1, len(todo)))
        if side_by_side and len(todo) > 1 and cpus >= len(todo):
            with ThreadPoolExecutor(len(todo)) as pool:
                futures = [pool.submit(self._execute, name, fp, outputs, lambda fn=fn: fn(share), prog)
                           for (name, fp, outputs, fn), prog in todo]
                for f in futures:
                    f.result()
            self.together.append([stage[0] for stage, _ in todo])
        else:
            for (name, fp, outputs, fn), prog in todo:
                self._execute(name, fp, outputs, lambda fn=fn: fn(cpus), prog)
        self.ran.extend(stage[0] for stage, _ in todo)
        return [self.state["stages"][name].get("result") for name, *_ in stages]

    def _next(self, name: str) -> str:
        self.n_done += 1
        return f"({self.n_done}/{self.n_total}) {name}"

    def _reuse(self, name: str, fingerprint: str, outputs: list[str], prog: str) -> bool:
        rec = self.state["stages"].get(name)
        if not (rec and rec.get("fingerprint") == fingerprint and rec.get("done")
                and all(os.path.exists(p) for p in outputs)):
            return False
        self.timings[name] = float(rec.get("seconds", 0.0))
        self.reused.append(name)
        log(f"{prog}: reused from {self.workdir} (took {self.timings[name]:.1f}s when it ran)")
        return True

    def _execute(self, name: str, fingerprint: str, outputs: list[str], fn: Callable[[], Any],
                 prog: str) -> Any:
        log(f"{prog} ...")
        for p in outputs:  # a stage redone starts from a clean output (no stale resume)
            if os.path.isdir(p):
                shutil.rmtree(p)
            elif os.path.exists(p):
                os.remove(p)
        self._record(name, {"fingerprint": fingerprint, "done": False})
        t0 = time.time()
        result = fn()
        seconds = time.time() - t0
        self.timings[name] = seconds
        self._record(name, {"fingerprint": fingerprint, "done": True,
                            "seconds": round(seconds, 3), "result": result})
        log(f"{prog}: done in {seconds:.1f}s")
        return result

    def _record(self, name: str, rec: dict[str, Any]) -> None:
        with self._lock:
            self.state["stages"][name] = rec
            self._save()


# ----------------------------------------------------------------------------- stages

def _train_args(argv: list[str]) -> argparse.Namespace:
    from pipelines import train as train_job

    p = argparse.ArgumentParser(prog="sdray train")
    train_job.add_arguments(p)
    return p.parse_args(argv)


def _train(work: str, method: str, s: dict, extra_sets: list[str], cpus: int) -> dict:
    """``sdray train`` of one method on the demo's features, one worker of ``cpus`` CPUs."""
    from pipelines import train as train_job

    argv = ["--train", os.path.join(work, "features", "train"),
            "--val", os.path.join(work, "features", "val"),
            "--out", os.path.join(work, "models", method), "--method", method,
            "--epochs", str(s["dense_epochs"] if method == "dense" else s["epochs"]),
            "--batch-size", str(s["batch_size"]),
            "--num-workers", "1", "--cpus-per-worker", str(cpus),
            "--set", f"backbone.image_size={s['image_size']}",
            "--log-every", "5"]
    if method != "dense":
        argv += ["--init", os.path.join(work, "models", "dense")]
    for item in [*METHOD_SETS.get(method, []), *extra_sets]:
        argv += ["--set", item]
    summary = train_job.run(_train_args(argv))
    return {"model": summary["model"], "seconds": summary["seconds"],
            "best_epoch": summary["selection"]["best_epoch"], "kept_from": summary["kept_from"],
            "epochs_run": summary["epochs_run"]}


def _index(work: str, s: dict) -> dict:
    """The joint model over the test corpus, via ``sdray index``'s job: from its feature split
    (the backbone ran once, in featurize); thumbnails are read from the raw shards the featurize
    manifest names."""
    from pipelines.index import run_index

    summary = run_index(os.path.join(work, "models", "joint"), os.path.join(work, "features", "test"),
                        os.path.join(work, "index"), shards=s["shards"], threads=s["cpus"])
    return {"index": os.path.join(work, "index"), "version": summary.get("version"),
            "counts": summary.get("counts"), "shards": summary.get("shards")}


def _free_port(preferred: int) -> int:
    for port in (preferred, 0):
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return sock.getsockname()[1]
    raise OSError("no free port")


def _sample_queries(work: str, s: dict) -> list[dict]:
    """Three test captions (text -> images) and one test image (image -> captions)."""
    import base64

    from sdray.data.synth import generate_samples

    n_img = s["n_test"]
    picks = sorted({0, n_img // 3, (2 * n_img) // 3})
    queries = []
    for i in picks:
        sample = next(iter(generate_samples(s["seed"], "test", 1, s["data_image_size"],
                                            CAPTIONS_PER_IMAGE, start=i)))
        queries.append({"kind": "text", "query": sample["caption"], "body": {"text": sample["caption"]}})
    sample = next(iter(generate_samples(s["seed"], "test", 1, s["data_image_size"],
                                        CAPTIONS_PER_IMAGE, start=picks[-1] + 1)))
    queries.append({"kind": "image", "query": f"image {sample['meta']['image_id']}",
                    "image_id": sample["meta"]["image_id"],
                    "body": {"image": base64.b64encode(sample["image"]).decode("ascii")}})
    return queries


def _relevance(work: str) -> tuple[dict[str, set], dict[str, set]]:
    from pipelines.evaluate import read_feature_columns

    cols = read_feature_columns(os.path.join(work, "features", "test"), ("image_id", "caption"))
    by_cap: dict[str, set] = {}
    by_img: dict[str, set] = {}
    for iid, cap in zip(cols["image_id"], cols["caption"]):
        by_cap.setdefault(cap, set()).add(iid)
        by_img.setdefault(iid, set()).add(cap)
    return by_cap, by_img


def _serve_and_query(work: str, s: dict, port: int, k: int = 5) -> list[dict]:
    from ray import serve

    from pipelines.query import format_hits, post_search
    from serve.app import deploy
    from serve.config import DeploymentKnobs, ServeConfig

    one = DeploymentKnobs(min_replicas=1, max_replicas=1)
    cfg = ServeConfig(index=os.path.join(work, "index"), host="127.0.0.1", port=_free_port(port),
                      ingress=one, encoder=one, shards=one, poll_interval_s=0)
    t0 = time.time()
    url = deploy(cfg, wait_s=300)
    log(f"serve: healthy at {url} after {time.time() - t0:.1f}s (search page: {url}/)")
    by_cap, by_img = _relevance(work)
    out = []
    try:
        for q in _sample_queries(work, s):
            body = {**q["body"], "k": k, "mode": "hybrid", "explain": 5}
            status, resp = post_search(url, body, timeout=120)
            if status != 200:
                raise RuntimeError(f"query {q['query']!r}: HTTP {status}: {resp}")
            if q["kind"] == "text":
                rel = by_cap.get(q["query"], set())
                hits = [{**h, "relevant": h.get("image_id") in rel} for h in resp["hits"]]
            else:
                rel = by_img.get(q["image_id"], set())
                hits = [{**h, "relevant": h.get("caption") in rel} for h in resp["hits"]]
            first = next((i for i, h in enumerate(hits, 1) if h["relevant"]), None)
            print(f"\n{q['kind']} query: {q['query']}", flush=True)
            print(format_hits({**resp, "hits": hits}), flush=True)
            out.append({"kind": q["kind"], "query": q["query"], "mode": resp.get("mode"),
                        "took_ms": resp.get("took_ms", 0.0), "first_relevant": first,
                        "hits": [{key: h.get(key) for key in ("id", "image_id", "caption", "score",
                                                             "scores", "explanation", "relevant")}
                                 for h in hits]})
    finally:
        serve.shutdown()
    return out


def _histories(work: str) -> dict[str, list[dict]]:
    out = {}
    for m in METHODS:
        path = os.path.join(work, "models", m, "metrics.jsonl")
        rows = []
        if os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                rows = [json.loads(line) for line in f if line.strip()]
        out[m] = rows
    return out


# ----------------------------------------------------------------------------- CLI

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workdir", default="sdray-demo",
                        help="where every artifact goes; finished stages are reused (default ./sdray-demo)")
    parser.add_argument("--json", action="store_true",
                        help="print {methods, timings, ...} as one JSON object, the last line of stdout")
    parser.add_argument("--size", choices=sorted(SIZES), default="full",
                        help="full: the demo the README times; small: a few-minute smoke run")
    parser.add_argument("--n", type=int, default=None, help="training pairs (default: by --size)")
    parser.add_argument("--n-test", type=int, default=None, help="test images (default: by --size)")
    parser.add_argument("--epochs", type=int, default=None,
                        help="epochs of d2s and joint, and of dense unless --dense-epochs (default: by --size)")
    parser.add_argument("--dense-epochs", type=int, default=None,
                        help="epochs of the dense model (default: by --size, or --epochs when given)")
    parser.add_argument("--image-size", type=int, default=None,
                        help="backbone input side in pixels (default: by --size; 224 = the backbone's own)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the generated data and the trainings")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="config override for every training run (e.g. loss.q_reg=1e-3)")
    parser.add_argument("--port", type=int, default=8000, help="HTTP port (a free one if taken)")
    parser.add_argument("--num-cpus", type=int, default=None,
                        help="logical CPUs of the local Ray (default: 2 x cores, at least 4)")
    parser.add_argument("--no-serve", action="store_true", help="stop after the index (no endpoint)")
    parser.add_argument("--fresh", action="store_true", help="ignore finished stages in --workdir")
    parser.add_argument("--sequential", action="store_true",
                        help="train d2s and joint one after the other, each on every CPU (default: "
                             "side by side, each on half of them, which takes less wall time)")


def settings(args: argparse.Namespace) -> dict[str, Any]:
    s = dict(SIZES[args.size])
    for key in ("n", "n_test", "epochs", "image_size"):
        if getattr(args, key, None) is not None:
            s[key] = getattr(args, key)
    if getattr(args, "epochs", None) is not None:
        s["dense_epochs"] = args.epochs
    if getattr(args, "dense_epochs", None) is not None:
        s["dense_epochs"] = args.dense_epochs
    s["seed"] = args.seed
    s["data_image_size"] = 128
    s["cpus"] = max(1, min(os.cpu_count() or 1, 4))
    return s


def run(args: argparse.Namespace) -> dict[str, Any]:
    """The demo; returns the result object that ``--json`` prints."""
    t_start = time.time()
    work = os.path.abspath(args.workdir)
    os.makedirs(work, exist_ok=True)
    s = settings(args)
    st = Stages(work, fresh=args.fresh)
    st.n_total = 8 + (0 if args.no_serve else 1)
    log(f"workdir {work}; {s['n']} training pairs, {s['n_val']} val / {s['n_test']} test images, "
        f"{s['dense_epochs']} dense / {s['epochs']} d2s and joint epochs, backbone input {s['image_size']}px")

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    import ray

    from pipelines.datasets import ensure_ray

    own_ray = not ray.is_initialized()
    t0 = time.time()
    ensure_ray(num_cpus=args.num_cpus or max(4, 2 * (os.cpu_count() or 1)))
    st.timings["ray_start"] = time.time() - t0
    try:
        fp_synth = _fp("synth", s["n"], s["n_val"], s["n_test"], s["seed"], s["data_image_size"])
        data = os.path.join(work, "data")

        def do_synth():
            from pipelines.synth import synth

            summary = synth(data, n=s["n"], seed=s["seed"], n_val=s["n_val"], n_test=s["n_test"],
                            captions_per_image=CAPTIONS_PER_IMAGE, image_size=s["data_image_size"])
            return {k: v["pairs"] for k, v in summary["splits"].items()}

        st.run("synth", fp_synth, [data], do_synth)

        fp_feat = _fp(fp_synth, "featurize", s["image_size"])
        feats = os.path.join(work, "features")

        def do_featurize():
            from pipelines.featurize import featurize
            from sdray.config import BackboneConfig

            m = featurize(data, feats, BackboneConfig(image_size=s["image_size"]),
                          batch_size=64, num_actors=1, actor_cpus=float(s["cpus"]))
            return {"n_samples": m["n_samples"], "skips": m.get("skips", {}),
                    "samples_per_s": (m.get("last_run") or {}).get("samples_per_s")}

        st.run("featurize", fp_feat, [feats], do_featurize)

        fp_train = {}
        base = _fp(fp_feat, "train", s["epochs"], s["batch_size"], sorted(args.set))
        fp_train["dense"] = _fp(base, "dense", METHOD_SETS["dense"], s["dense_epochs"])
        st.run("train_dense", fp_train["dense"], [os.path.join(work, "models", "dense")],
               lambda: _train(work, "dense", s, args.set, s["cpus"]))
        students = []
        for m in ("d2s", "joint"):  # both start from the dense model and are independent
            fp_train[m] = _fp(base, m, METHOD_SETS[m], fp_train["dense"])
            students.append((f"train_{m}", fp_train[m], [os.path.join(work, "models", m)],
                             lambda cpus, m=m: _train(work, m, s, args.set, cpus)))
        st.run_together(students, s["cpus"], side_by_side=not args.sequential)

        def do_eval():
            from pipelines.evaluate import evaluate_uri
            from sdray.evaluation import format_table
            from sdray.model_card import write_model_card

            out = {}
            os.makedirs(os.path.join(work, "eval"), exist_ok=True)
            for m in METHODS:
                res = evaluate_uri(os.path.join(work, "models", m), os.path.join(feats, "test"))
                with open(os.path.join(work, "eval", f"{m}.json"), "w", encoding="utf-8") as f:
                    json.dump(res, f, indent=2)
                write_model_card(os.path.join(work, "models", m), test=res, data={
                    "source": "sdray synth (generated scenes)", "training pairs": s["n"],
                    "validation images": s["n_val"], "test images": s["n_test"]})
                log(f"eval {m}:\n{format_table(res)}")
                out[m] = res
            return out

        fp_eval = _fp([fp_train[m] for m in METHODS], "eval")
        methods = st.run("eval", fp_eval, [os.path.join(work, "eval")], do_eval)

        fp_index = _fp(fp_train["joint"], "index", s["shards"])
        index_info = st.run("index", fp_index, [os.path.join(work, "index")], lambda: _index(work, s))

        queries: list[dict] = []
        if not args.no_serve:
            queries = st.run("serve", _fp(fp_index, "serve"), [],
                             lambda: _serve_and_query(work, s, args.port), reusable=False)
    finally:
        if own_ray:
            t0 = time.time()
            ray.shutdown()
            st.timings["shutdown"] = time.time() - t0

    from sdray.report import comparison_table, timings_table, write_report

    st.n_done += 1
    log(f"({st.n_done}/{st.n_total}) report ...")
    t0 = time.time()
    extra_plots = {m: sorted(os.path.join(work, "models", m, "plots", f)
                             for f in os.listdir(os.path.join(work, "models", m, "plots")))
                   for m in METHODS if os.path.isdir(os.path.join(work, "models", m, "plots"))}
    timings = {k: round(v, 2) for k, v in st.timings.items()}
    report = write_report(work, methods, _histories(work), timings, reused=st.reused,
                          queries=queries, extra_plots=extra_plots, together=st.together,
                          notes={"training pairs": s["n"], "test images": s["n_test"],
                                 "epochs": f"dense {s['dense_epochs']}, d2s and joint {s['epochs']}"
                                           + ("" if args.sequential else " (side by side)"),
                                 "backbone input": f"{s['image_size']}px",
                                 "training settings": "; ".join(
                                     f"{m}: {' '.join(METHOD_SETS[m] + list(args.set)) or 'defaults'}"
                                     for m in METHODS)})
    st.timings["report"] = time.time() - t0
    timings = {k: round(v, 2) for k, v in st.timings.items()}
    total = time.time() - t_start
    print("\nText -> image (percent):", flush=True)
    print(comparison_table(methods, "t2i"))
    print("\nImage -> text (percent):")
    print(comparison_table(methods, "i2t"))
    print("\nStage timings (seconds):")
    print(timings_table(timings, st.reused, together=st.together))
    print(f"\nwall time {total:.1f}s; report: {report}", flush=True)
    return {"methods": methods, "timings": timings, "together": st.together,
            "reused": st.reused, "ran": st.ran,
            "total_seconds": round(total, 2), "report": report,
            "plots": sorted(os.path.join(work, "plots", f) for f in os.listdir(os.path.join(work, "plots"))),
            "workdir": work, "index": index_info, "queries": queries,
            "settings": {k: v for k, v in s.items()}}


def main(args: argparse.Namespace) -> int:
    try:
        result = run(args)
    except KeyboardInterrupt:
        log("interrupted; finished stages are kept in the workdir and reused next time")
        return 130
    if args.json:
        print(json.dumps(result, default=str), flush=True)
    return 0
