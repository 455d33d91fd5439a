"""Pairs/s of one ``joint`` optimisation step on feature batches: sdray vs the reference step.

Usage::

    python benchmarks/train_step.py [--batch 256] [--vocab 30522] [--steps 5] [--nnz 200]
                                    [--workers 2] [--json]

* **reference**: the step the way the official implementation computes it, written here from
  the formulas of DESIGN.md §1 — dense ``batch × |V|`` sparse matrices, full-vocabulary matmuls in
  both directions (``s_i2t`` and ``s_t2i`` computed separately), diagonal targets, fp32, dense
  backward everywhere.
* **sdray**: :meth:`sdray.training.Trainer.train_step` (multi-positive targets, one score matrix
  per representation in one process — the t2i rows are the transposed i2t matrix; on CPU the
  vocabulary projection's backward runs over the positive logits once they are sparse). Also
  timed: the opt-in CSR score products (``Trainer(fast_kernels=True)``; exact gradients,
  tests/test_training.py).

Both run on the same heads, features and batch in the same process, at two sparsity levels:
``init`` (fresh sparse head: about half the vocabulary active, so sdray takes its dense path) and
``sparse`` (the vocabulary projector shifted so that about ``--nnz`` terms per vector are active,
the regime a trained model is in). ``--workers 2`` also times sdray with 2 gloo processes on the
same global batch (each takes half) and reports the speed-up over 1 process.
Feature sizes are those of the packaged backbone (384-d text, 1280-d image, 256-d projections).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

from sdray.config import from_dict
from sdray.heads import RetrieverHeads
from sdray.training import FeatureBatch, Trainer

HT, HI, D, HID = 384, 1280, 256, 384


def make_heads(vocab: int, nnz: int | None, seed: int = 0) -> RetrieverHeads:
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(vocab, HID, generator=g) * 0.05
    heads = RetrieverHeads(nn.Linear(HT, D), nn.Linear(HI, D), emb)
    if nnz is not None:
        # one LayerNorm coordinate is pinned to 1 and every vocabulary row gets weight -s on it:
        # logits shift by -s; s is chosen so that about `nnz` of |V| logits stay positive.
        with torch.no_grad():
            heads.sparse.norm.weight[0] = 0.0
            heads.sparse.norm.bias[0] = 1.0
            x = torch.randn(64, D)
            y = heads.sparse.norm(heads.sparse.transform(F.normalize(x, dim=-1)))
            logits = y[:, 1:] @ heads.sparse.vocab_projector.weight[:, 1:].T
            s = torch.quantile(logits.flatten()[:2_000_000], 1 - nnz / vocab).item()
            heads.sparse.vocab_projector.weight[:, 0] = -s
    return heads


def make_batch(batch: int, seed: int = 1) -> FeatureBatch:
    g = torch.Generator().manual_seed(seed)
    return FeatureBatch(torch.randn(batch, HT, generator=g), torch.randn(batch, HI, generator=g),
                        torch.arange(batch), torch.arange(batch) + 10**6)


def config(batch: int):
    return from_dict({"loss": {"method": "joint", "expansion_control": False},
                      "optim": {"batch_size": batch, "lr": 1e-4, "method_lr": {},
                                                             "warmup_fraction": 0.0}})


class ReferenceStep:
    """The official-style joint step (formulas of DESIGN.md §1), dense everywhere, fp32."""

    def __init__(self, cfg, heads: RetrieverHeads, total_steps: int):
        self.cfg, self.heads, self.total = cfg, heads, total_steps
        self.opt = torch.optim.AdamW(heads.parameters(), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
        self.step = 0

    def __call__(self, batch: FeatureBatch) -> float:
        lc, h = self.cfg.loss, self.heads
        d_t = F.normalize(h.text_proj.linear(batch.text_features), dim=-1)
        d_i = F.normalize(h.vision_proj.linear(batch.image_features), dim=-1)
        sp = h.sparse
        z_t = torch.log1p(torch.relu(sp.vocab_projector(sp.norm(sp.transform(d_t)))))
        z_i = torch.log1p(torch.relu(sp.vocab_projector(sp.norm(sp.transform(d_i)))))
        tau = h.tau
        sd_i2t, sd_t2i = d_i @ d_t.T / tau, d_t @ d_i.T / tau
        ss_i2t, ss_t2i = z_i @ z_t.T, z_t @ z_i.T
        si_i2t, si_t2i = lc.w1 * sd_i2t + lc.w2 * ss_i2t, lc.w1 * sd_t2i + lc.w2 * ss_t2i
        target = torch.arange(len(batch))

        def nce(a, b):
            return 0.5 * (F.cross_entropy(a, target) + F.cross_entropy(b, target))

        def kd(t_a, t_b, s_a, s_b):
            t_a, t_b = t_a.detach(), t_b.detach()
            return 0.5 * (-(F.softmax(t_a, 1) * F.log_softmax(s_a, 1)).sum(1).mean()
                          - (F.softmax(t_b, 1) * F.log_softmax(s_b, 1)).sum(1).mean())

        big_l = lc.lambda1 * nce(sd_i2t, sd_t2i) + lc.lambda2 * nce(ss_i2t, ss_t2i) + nce(si_i2t, si_t2i)
        big_lp = (lc.lambda1 * kd(si_i2t, si_t2i, sd_i2t, sd_t2i)
                  + lc.lambda2 * kd(si_i2t, si_t2i, ss_i2t, ss_t2i))
        warm = min(1.0, self.step / max(1.0, lc.reg_warmup_fraction * self.total)) ** 2
        reg = 0.5 * (lc.q_reg * warm * z_t.abs().sum(1).mean() + lc.d_reg * warm * z_i.abs().sum(1).mean())
        loss = 0.25 * (big_l + big_lp) + reg
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(h.parameters(), self.cfg.optim.grad_clip)
        self.opt.step()
        with torch.no_grad():
            h.tau.clamp_(0.001, 0.5)
        self.step += 1
        return float(loss.detach())


def _time(fn, steps: int) -> float:
    fn()  # warm-up
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    return (time.perf_counter() - t0) / steps


def _worker(rank, world, port, batch, vocab, nnz, steps, threads, out):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(threads)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    local = batch // world
    full = make_batch(batch)
    mine = FeatureBatch(*(t[rank * local:(rank + 1) * local] for t in (
        full.text_features, full.image_features, full.image_ids, full.caption_ids)))
    trainer = Trainer(config(batch), make_heads(vocab, nnz), total_steps=100)
    dt = _time(lambda: trainer.train_step(mine), steps)
    if rank == 0:
        with open(out, "w") as f:
            json.dump({"seconds": dt}, f)
    dist.destroy_process_group()


def _dense_backward(step):
    """``step`` with the vocabulary projection's backward forced dense (sdray before the sparse
    backward became the CPU default)."""
    import sdray.training as tr

    def run(batch):
        kept, tr.SPARSE_DENSITY_THRESHOLD = tr.SPARSE_DENSITY_THRESHOLD, 0.0
        try:
            return step(batch)
        finally:
            tr.SPARSE_DENSITY_THRESHOLD = kept
    return run


def bench(batch: int, vocab: int, nnz: int | None, steps: int, threads: int) -> dict:
    torch.set_num_threads(threads)
    cfg = config(batch)
    b = make_batch(batch)
    steps_of = {"reference": ReferenceStep(cfg, make_heads(vocab, nnz), 100),
                "sdray": Trainer(cfg, make_heads(vocab, nnz), total_steps=100).train_step,
                "sdray_dense_backward": _dense_backward(
                    Trainer(cfg, make_heads(vocab, nnz), total_steps=100).train_step),
                "sdray_csr_scores": Trainer(cfg, make_heads(vocab, nnz), total_steps=100,
                                            fast_kernels=True).train_step}
    logs = {name: fn(b) for name, fn in steps_of.items()}["sdray"]   # warm-up
    # interleaved, median of per-step times: a shared machine's load hits all alike
    times: dict[str, list[float]] = {name: [] for name in steps_of}
    for _ in range(steps):
        for name, fn in steps_of.items():
            t0 = time.perf_counter()
            fn(b)
            times[name].append(time.perf_counter() - t0)
    out = {"nnz_per_vector": round((logs["nnz_text"] + logs["nnz_image"]) / 2, 1)}
    for name, ts in times.items():
        out[f"{name}_s"] = statistics.median(ts)
        out[f"{name}_pairs_per_s"] = batch / out[f"{name}_s"]
    out["speedup_vs_reference"] = out["reference_s"] / out["sdray_s"]
    out["speedup_vs_dense_backward"] = out["sdray_dense_backward_s"] / out["sdray_s"]
    return out


def bench_workers(batch, vocab, nnz, steps, workers, threads_total) -> dict:
    import tempfile

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = os.path.join(tempfile.mkdtemp(), "w.json")
    threads = max(1, threads_total // workers)
    mp.spawn(_worker, args=(workers, port, batch, vocab, nnz, steps, threads, out), nprocs=workers)
    dt = json.load(open(out))["seconds"]
    return {"workers": workers, "threads_per_worker": threads, "step_s": dt, "pairs_per_s": batch / dt}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--vocab", type=int, default=30522)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--nnz", type=int, default=200, help="active terms per vector, sparse regime")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--workers", type=int, default=2, help="also time sdray with this many processes")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    result = {"batch": args.batch, "vocab": args.vocab, "threads": args.threads,
              "cpu_count": os.cpu_count(), "load_avg_1m": os.getloadavg()[0], "regimes": {}}
    for name, nnz in (("init", None), ("sparse", args.nnz)):
        r = bench(args.batch, args.vocab, nnz, args.steps, args.threads)
        result["regimes"][name] = r
        print(f"{name:>6} (nnz/vector {r['nnz_per_vector']:>7}): " + ", ".join(
            f"{k} {r[k + '_pairs_per_s']:.1f} pairs/s ({r[k + '_s']:.3f} s/step)"
            for k in ("reference", "sdray_dense_backward", "sdray", "sdray_csr_scores"))
              + f"; sdray vs reference x{r['speedup_vs_reference']:.2f}, "
              f"vs its dense backward x{r['speedup_vs_dense_backward']:.2f}", flush=True)
    if args.workers > 1:
        one = bench_workers(args.batch, args.vocab, args.nnz, args.steps, 1, args.threads)
        many = bench_workers(args.batch, args.vocab, args.nnz, args.steps, args.workers, args.threads)
        result["scaling"] = {"one": one, "many": many, "speedup": one["step_s"] / many["step_s"]}
        print(f"sparse regime, global batch {args.batch}: 1 worker x {one['threads_per_worker']} threads "
              f"{one['pairs_per_s']:.1f} pairs/s; {args.workers} workers x {many['threads_per_worker']} "
              f"thread(s) {many['pairs_per_s']:.1f} pairs/s: speed-up x{result['scaling']['speedup']:.2f}")
    if args.json:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
