"""``sdray train``: fine-tune a retriever on Ray Train (``dense``, ``d2s``, ``joint``).

The driver resolves the config (file/preset + CLI overrides), builds the initial heads (the
backbone's final layers and word embeddings, or ``--init``'s final layers), and runs a
``TorchTrainer``. Ray Data streams the train split into the workers — feature shards, or raw
image–text shards that each worker runs through the frozen backbone (eval mode, no grad).
The workers run :class:`sdray.training.Trainer` (gather-with-grad negatives across workers).

Output under ``--out`` (local folder or ``s3://`` prefix)::

    heads.safetensors config.yaml model.json   the kept model (best epoch within the nnz budget)
    best/                                      the same, written live by rank 0
    run/checkpoint_*/                          Ray Train checkpoints (model + optimizer + state)
    metrics.jsonl                              train and validation rows
    plots/{loss,recall,nnz}.png                curves
    summary.json                               what was kept and why

Starting again with the same ``--out`` resumes from the last checkpoint (Ray Train restores it);
worker failures are retried from the last checkpoint (``--max-failures``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from typing import Any

import numpy as np

from sdray import config as config_lib
from sdray import storage
from sdray.data.epoch_cache import EpochCache
from sdray.errors import TrainingFailed
from sdray.model_card import write_model_card
from sdray.progress import Progress

RUN_NAME = "run"


# ============================================================================ worker side


def _tag(cfg) -> str:
    """The prefix of this job's progress lines; it names the method, so two trainings that run
    side by side (as in ``sdray demo``) can be told apart."""
    return f"[sdray train {cfg.loss.method}]"


def _to_numpy_rows(batch: dict, key: str) -> np.ndarray:
    x = batch[key]
    if isinstance(x, np.ndarray) and x.dtype != object:
        return x.astype(np.float32, copy=False)
    return np.stack([np.asarray(r, np.float32) for r in x])


class _BatchMaker:
    """Numpy batches from Ray Data -> :class:`FeatureBatch` (running the backbone in raw mode).

    Raw mode: uint8 pixels and token ids go to the device once; the frozen backbone runs there
    (fp16 autocast on CUDA when ``optim.amp``) and its features stay there for the step.
    """

    def __init__(self, mode: str, cfg, device):
        self.mode, self.cfg, self.device = mode, cfg, device
        self.backbone = None
        if mode == "raw":
            from sdray.backbones import load_backbone

            self.backbone = load_backbone(cfg.backbone, proj_dim=cfg.heads.dense_dim).to(device).eval()
            self.backbone.requires_grad_(False)

    def _device_features(self, batch: dict):
        """Raw mode: ``(text (B, Ht), image (B, Hi), ids (B, L), mask (B, L))`` on the device."""
        import torch

        ids = torch.as_tensor(np.asarray(batch["input_ids"]), dtype=torch.long).to(self.device, non_blocking=True)
        mask = torch.as_tensor(np.asarray(batch["attention_mask"]), dtype=torch.long).to(self.device, non_blocking=True)
        pix = torch.from_numpy(np.ascontiguousarray(batch["pixels"])).to(self.device, non_blocking=True)
        amp = bool(self.cfg.optim.amp)
        with torch.no_grad():
            return (self.backbone.token_features(ids, mask, amp), self.backbone.pixel_features(pix, amp),
                    ids, mask)

    def features(self, batch: dict) -> tuple[np.ndarray, np.ndarray]:
        if self.mode == "features":
            return _to_numpy_rows(batch, "text_features"), _to_numpy_rows(batch, "image_features")
        tf, imf, _, _ = self._device_features(batch)
        return tf.cpu().numpy(), imf.cpu().numpy()

    def __call__(self, batch: dict):
        from sdray.losses.targets import ids_to_tensor
        from sdray.training import FeatureBatch, _py

        image_ids, captions = list(batch["image_id"]), [str(c) for c in batch["caption"]]
        if self.mode == "features":
            tf, imf = self.features(batch)
            return FeatureBatch.from_arrays(tf, imf, image_ids, captions, batch.get("input_ids"))
        tf, imf, ids, mask = self._device_features(batch)
        return FeatureBatch(tf, imf, ids_to_tensor([_py(x) for x in image_ids]),
                            ids_to_tensor(captions), ids, mask)

    def columns(self, batch: dict) -> dict[str, Any]:
        tf, imf = self.features(batch)
        return {"text_features": tf, "image_features": imf,
                "image_id": [str(x) for x in batch["image_id"]],
                "caption": [str(c) for c in batch["caption"]]}


def _write_text(uri: str, text: str) -> None:
    storage.write_bytes_atomic(uri, text.encode("utf-8"))


def _flat_val(result: dict) -> dict[str, float]:
    from sdray.evaluation import rsum

    out = {f"rsum_{r}": rsum(result, r) for r in ("dense", "sparse", "hybrid")}
    for d in ("t2i", "i2t"):
        for r in ("dense", "sparse", "hybrid"):
            out[f"{d}_{r}_R@1"] = result[d][r]["R@1"]
    out.update(result["sparsity"])
    return out


def _worker_rows(uri: str, rank: int, world: int, seed: int, keep: int) -> dict:
    """This worker's seeded share (``keep`` rows) of the feature split at ``uri``."""
    from pipelines.evaluate import FEATURE_SPLIT_COLUMNS, read_feature_columns
    from sdray.data.epoch_cache import worker_share

    cols = read_feature_columns(uri, FEATURE_SPLIT_COLUMNS)
    idx = worker_share(len(cols["caption"]), rank, world, seed, keep)
    return {k: v[idx] if isinstance(v, np.ndarray) else [v[i] for i in idx] for k, v in cols.items()}


def stacked_features(batch: dict) -> dict:
    """A features-mode batch with its feature columns as (B, H) float32 arrays (Ray Data hands
    them out as object arrays of rows)."""
    return {k: _to_numpy_rows(batch, k) if k.endswith("_features") else v for k, v in batch.items()}


def epoch_batches(shard, per_worker: int, shuffle_buffer: int, seed: int, epoch: int):
    """One epoch of numpy batches from a worker's shard, through a local shuffle buffer seeded
    by ``seed + epoch`` (the same order for the same seed; with ``ingest_config``'s ordered
    execution that makes a one-worker run reproducible)."""
    return shard.iter_batches(batch_size=per_worker, batch_format="numpy", drop_last=True,
                              local_shuffle_buffer_size=shuffle_buffer or None,
                              local_shuffle_seed=seed + epoch if shuffle_buffer else None)


def ingest_config():
    """Ray Train's dataset config: split ``train`` over the workers, in a deterministic order.

    Ray Data hands out blocks as their tasks finish unless ``preserve_order`` is set, so the
    seeded block shuffle (``randomize_block_order(seed=...)``) would see its input in a run-
    dependent order. With several workers the streaming split still gives blocks to whichever
    worker asks first, so only one-worker runs repeat exactly.
    """
    from ray.train import DataConfig as RayDataConfig

    options = RayDataConfig.default_ingest_options()
    options.preserve_order = True
    return RayDataConfig(datasets_to_split=["train"], execution_options=options)


def train_loop(config: dict) -> None:
    """The Ray Train worker function."""
    import ray
    import ray.train
    import torch
    import torch.distributed as dist
    from ray.train import Checkpoint

    from sdray.evaluation import evaluate_and_calibrate, format_table
    from sdray.model import _heads_like
    from sdray.training import (Selector, Trainer, broadcast_parameters, load_checkpoint,
                                save_checkpoint, selection_metric, write_model_dir)

    cfg = config_lib.loads(config["config_yaml"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    dist_state = {"backend": dist.get_backend() if dist.is_initialized() else None, "world_size": world}
    torch.manual_seed(cfg.optim.seed)
    device = torch.device("cuda", torch.cuda.current_device()) if config["use_gpu"] else torch.device("cpu")
    if config.get("threads"):
        torch.set_num_threads(int(config["threads"]))
    heads = _heads_like(cfg, ray.get(config["heads_ref"])[0])
    trainer = Trainer(cfg, heads, config["total_steps"], device, config["special_ids"])
    out = config["out"]
    loop: dict[str, Any] = {"epoch": 0, "batches_done": 0, "history": [], "selector": None,
                            "finished": False, "stopped_early": False}
    ck = ray.train.get_checkpoint()
    if ck is not None:
        with ck.as_directory() as d:
            loop = load_checkpoint(d, trainer)
        if not loop.get("finished"):
            loop.setdefault("resumed_from", []).append(trainer.step)
        if rank == 0:
            print(f"{_tag(cfg)} resumed from step {trainer.step} (epoch {loop['epoch'] + 1}, "
                  f"batch {loop['batches_done']})", flush=True)
    else:
        broadcast_parameters(trainer.heads)
    metric, budget = selection_metric(cfg)
    selector = (Selector.from_json(loop["selector"]) if loop.get("selector")
                else Selector(metric, budget, cfg.selection.patience))
    history: list[dict] = loop["history"]
    make = _BatchMaker(config["mode"], cfg, device)
    per_worker = config["per_worker_batch"]
    epochs = cfg.optim.epochs
    every = cfg.checkpoint_every
    log_every = config["log_every"]
    steps_per_epoch = config["steps_per_epoch"]
    val_cache: dict | None = None
    # features mode: the first epoch's rows stay in memory and later epochs replay them
    cache = EpochCache(cfg.data.epoch_cache_max_bytes if config["mode"] == "features" else 0)
    if config.get("train_files"):   # a small feature split: read here, no Ray Data
        cache.fill(_worker_rows(config["train_files"], rank, world, cfg.optim.seed,
                                steps_per_epoch * per_worker))

    def batches_of(epoch: int):
        if cache.ready:
            return cache.batches(per_worker, cfg.optim.seed + epoch)
        it = epoch_batches(ray.train.get_dataset_shard("train"), per_worker, config["shuffle_buffer"],
                           cfg.optim.seed, epoch)
        return cache.record(map(stacked_features, it)) if cache.enabled else it

    def report(metrics: dict, epoch: int, batches_done: int, finished: bool = False) -> None:
        loop_state = {"epoch": epoch, "batches_done": batches_done, "history": history,
                      "selector": selector.to_json(), "finished": finished,
                      "stopped_early": loop.get("stopped_early", False),
                      "resumed_from": loop.get("resumed_from", []), "dist": dist_state}
        with tempfile.TemporaryDirectory() as tmp:
            checkpoint = None
            if rank == 0:
                save_checkpoint(tmp, trainer, loop_state, {"method": cfg.loss.method, "epoch": epoch,
                                                           "step": trainer.step})
                checkpoint = Checkpoint.from_directory(tmp)
                _write_text(storage.join(out, "metrics.jsonl"),
                            "".join(json.dumps(r) + "\n" for r in history))
            ray.train.report(metrics, checkpoint=checkpoint,
                             checkpoint_dir_name=f"step_{trainer.step:07d}")
        if config.get("fail_step") is not None and trainer.step >= config["fail_step"] \
                and rank == world - 1 and not os.path.exists(config["fail_marker"]):
            with open(config["fail_marker"], "w") as f:
                f.write(str(time.time()))
            time.sleep(4.0)  # let the controller register the checkpoint first
            print(f"{_tag(cfg)} injected failure on rank {rank} at step {trainer.step}", flush=True)
            os._exit(1)

    def collect_val() -> dict:
        if config["val_features"]:
            # feature files: one pyarrow read (a Ray Data execution here cost ~10 s per run)
            from pipelines.evaluate import read_feature_columns

            return read_feature_columns(config["val_features"],
                                        ("image_id", "caption", "text_features", "image_features"))
        cols: dict[str, list] = {"text_features": [], "image_features": [], "image_id": [], "caption": []}
        shard = ray.train.get_dataset_shard("val")
        for b in shard.iter_batches(batch_size=256, batch_format="numpy"):
            c = make.columns(b)
            for k in cols:
                cols[k].append(c[k]) if k.endswith("features") else cols[k].extend(c[k])
        return {"text_features": np.concatenate(cols["text_features"]),
                "image_features": np.concatenate(cols["image_features"]),
                "image_id": cols["image_id"], "caption": cols["caption"]}

    start_epoch = loop["epoch"]
    if loop.get("finished"):
        start_epoch = epochs
    eta = Progress("train", max(0, config["total_steps"] - trainer.step), "steps", enabled=False)
    if cache.enabled and not cache.ready and 0 < start_epoch < epochs:
        # resumed past the first epoch: rebuild the replayed rows from the first epoch's order,
        # so the resumed epoch skips the batches the interrupted run had trained on
        for _ in zip(range(steps_per_epoch), batches_of(0)):
            pass
        cache.seal(steps_per_epoch)
    for epoch in range(start_epoch, epochs):
        skip = loop["batches_done"] if epoch == start_epoch else 0
        t0, n_pairs, logs_acc = time.time(), 0, []
        it = batches_of(epoch)
        done = 0
        for i, batch in enumerate(it):
            if i < skip:
                continue
            if done + skip >= steps_per_epoch:
                break  # keep ranks in lock-step when the streaming split is uneven
            logs = trainer.train_step(make(batch))
            eta.update(1)
            done += 1
            n_pairs += per_worker * world
            logs_acc.append(logs)
            if rank == 0 and (trainer.step % log_every == 0 or done + skip == steps_per_epoch):
                rate = n_pairs / max(time.time() - t0, 1e-9)
                row = {"type": "train", "epoch": epoch + 1, "step": trainer.step,
                       **{k: float(np.mean([l[k] for l in logs_acc if k in l]))
                          for k in logs_acc[-1] if k not in ("step",)},
                       "lr": logs["lr"], "pairs_per_s": rate}
                history.append(row)
                logs_acc = []
                nnz = (f" nnz t/i {row['nnz_text']:.0f}/{row['nnz_image']:.0f}"
                       if "nnz_text" in row else "")
                print(f"{_tag(cfg)} epoch {epoch + 1}/{epochs} step {trainer.step}/"
                      f"{config['total_steps']} loss {row['loss']:.4f} tau {row['temperature']:.4f}"
                      f"{nnz} lr {logs['lr']:.2e} {rate:.0f} pairs/s, ETA {eta.eta()}", flush=True)
            if every and trainer.step % every == 0 and done + skip < steps_per_epoch:
                report({"epoch": epoch + 1, "step": trainer.step, "loss": logs["loss"]},
                       epoch, done + skip)
        if cache.enabled and not cache.ready and cache.seal(steps_per_epoch) and rank == 0:
            print(f"{_tag(cfg)} later epochs replay the {cache.num_rows} rows of this one from "
                  f"memory ({cache.nbytes / 2**20:.0f} MiB, data.epoch_cache_max_bytes)", flush=True)
        # ---- validation (rank 0) and the stop decision
        stop = torch.zeros(1, device=device)  # NCCL broadcasts need device tensors
        metrics: dict[str, Any] = {"epoch": epoch + 1, "step": trainer.step}
        if rank == 0 and config["has_val"]:
            if val_cache is None:
                val_cache = collect_val()
            trainer.heads.eval()
            with trainer.heads.judged(cfg.selection.vectors):  # selection.vectors: model or served
                result, model_cfg = evaluate_and_calibrate(trainer.heads, val_cache, cfg)
            trainer.heads.train()
            improved = selector.update(epoch + 1, result)
            flat = _flat_val(result)
            history.append({"type": "val", "epoch": epoch + 1, "step": trainer.step, **flat,
                            "tau": float(trainer.heads.tau), "selected": improved,
                            "within_budget": selector.history[-1]["within_budget"], "result": result})
            metrics.update(flat)
            if improved:
                with tempfile.TemporaryDirectory() as tmp:
                    write_model_dir(tmp, model_cfg, trainer.heads,
                                    {"method": cfg.loss.method, "epoch": epoch + 1, "step": trainer.step,
                                     "tau": float(trainer.heads.tau), "selection": {
                                         "metric": selector.metric, "value": selector.best,
                                         "max_nnz": selector.max_nnz}, "val": result})
                    storage.upload_dir(tmp, storage.join(out, "best"))
            mark = "  <- kept" if improved else ("" if selector.history[-1]["within_budget"]
                                                   else "  (over the nnz budget)")
            print(f"{_tag(cfg)} validation after epoch {epoch + 1}: {selector.metric} "
                  f"{selector.history[-1]['value']:.4f}{mark}\n{format_table(result)}", flush=True)
            if selector.should_stop:
                stop[0] = 1
                print(f"{_tag(cfg)} early stop: no improvement for {selector.patience} epochs", flush=True)
        if world > 1 and dist.is_initialized():
            dist.broadcast(stop, src=0)
        stopped = bool(stop[0].item())
        last = stopped or epoch + 1 == epochs
        if stopped:
            loop["stopped_early"] = True
        report(metrics, epoch + 1, 0, finished=last)
        if last:
            break
    if start_epoch >= epochs:
        # a finished run started again: report its state once more (result.metrics needs it)
        if rank == 0:
            print(f"{_tag(cfg)} nothing left to train: the run had finished", flush=True)
        report({"epoch": epochs, "step": trainer.step}, epochs, 0, finished=True)


# ============================================================================ driver side


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--train", required=True, help="train split: feature shards or image-text shards")
    parser.add_argument("--val", default=None, help="validation split (features or image-text shards)")
    parser.add_argument("--out", required=True, help="output folder or s3:// prefix (resumes if present)")
    parser.add_argument("--method", choices=["dense", "d2s", "joint"], default=None,
                        help="training method (default: the config's loss.method)")
    parser.add_argument("--init", default=None, help="model URI whose final layers to start from")
    parser.add_argument("--config", default=None, help="YAML/JSON config file or preset name")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="config override, e.g. --set loss.q_reg=1e-3 (repeatable; YAML values)")
    parser.add_argument("--backbone", default=None, choices=["packaged", "clip", "blip", "siglip"],
                        help="frozen backbone (default: the config's backbone.name)")
    parser.add_argument("--backbone-path", default=None, help="hub id or folder of a HF backbone")
    parser.add_argument("--epochs", type=int, default=None, help="epochs (default: the config's optim.epochs)")
    parser.add_argument("--batch-size", type=int, default=None, help="global batch (split over workers)")
    parser.add_argument("--lr", type=float, default=None,
                        help="learning rate, whatever the method (default: the config's)")
    parser.add_argument("--num-workers", type=int, default=1, help="Ray Train workers (DDP ranks)")
    parser.add_argument("--cpus-per-worker", type=float, default=1.0,
                        help="logical CPUs per worker (also its torch threads when >= 1)")
    parser.add_argument("--use-gpu", action="store_true", help="one GPU per worker (NCCL, AMP)")
    parser.add_argument("--checkpoint-every", type=int, default=None, help="steps; 0: per epoch")
    parser.add_argument("--max-failures", type=int, default=2,
                        help="worker-group restarts (from the last checkpoint) before the run fails")
    parser.add_argument("--log-every", type=int, default=10, help="steps between progress lines")
    parser.add_argument("--num-cpus", type=int, default=None, help="logical CPUs for a local Ray")
    parser.add_argument("--json", action="store_true", help="print a JSON summary as the last line")
    parser.add_argument("--inject-failure-step", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--failure-marker", default=None, help=argparse.SUPPRESS)


def resolve_config(args: argparse.Namespace):
    import yaml

    cfg = config_lib.load(args.config) if args.config else config_lib.SdrayConfig()
    over: dict[str, Any] = {"loss.method": args.method, "optim.epochs": args.epochs,
                            "optim.batch_size": args.batch_size, "optim.lr": args.lr,
                            "checkpoint_every": args.checkpoint_every}
    if args.backbone:
        over["backbone.name"] = args.backbone
    if args.backbone_path:
        over["backbone.path"] = args.backbone_path
    for item in args.set:
        if "=" not in item:
            raise config_lib.ConfigError(f"--set expects KEY=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        over[key.strip()] = yaml.safe_load(value)
    cfg = config_lib.with_overrides(cfg, over)
    if args.lr is not None:  # --lr is the learning rate, whatever the method
        cfg.optim.method_lr = {k: v for k, v in cfg.optim.method_lr.items()
                               if f"optim.method_lr.{k}" in over}
    return cfg


def _detect_mode(uri: str) -> str:
    from pipelines.datasets import is_feature_dir

    return "features" if is_feature_dir(uri) else "raw"


def _dataset(uri: str, mode: str, cfg, seed: int):
    from pipelines.datasets import read_features, read_image_text

    if mode == "features":
        ds = read_features(uri)
        keep = [c for c in ("image_id", "caption", "input_ids", "text_features", "image_features")
                if c in ds.schema().names]
        ds = ds.select_columns(keep)
        return ds.randomize_block_order(seed=seed) if cfg.data.shuffle_files else ds
    from sdray.backbones import load_preprocessor

    # uint8 pixels through the object store; the workers normalise them on their device
    return read_image_text(uri, cfg.data, load_preprocessor(cfg.backbone).for_device_normalization(),
                           seed=seed)


def _split_bytes(uri: str) -> int:
    """Total size of the Parquet files of a feature split."""
    fs, _ = storage.filesystem(uri)
    return sum(fs.size(f[len("s3://"):] if f.startswith("s3://") else f)
               for f in storage.list_files(uri, (".parquet",)))


def _count_rows(uri: str, mode: str, cfg) -> int:
    if mode == "features":
        import pyarrow.parquet as pq

        fs, _ = storage.pyarrow_filesystem(uri)
        total = 0
        for f in storage.list_files(uri, (".parquet",)):
            total += pq.ParquetFile(fs.open_input_file(f[5:] if f.startswith("s3://") else f)).metadata.num_rows
        return total
    from pipelines.corpus_size import raw_corpus_size

    # No pass over the images: Parquet footers, else a few tars scaled by bytes. The schedule is
    # set from this count; an epoch ends when the data runs out or at that many steps.
    return raw_corpus_size(uri, cfg.data).rows


def initial_heads(cfg, init_uri: str | None):
    """Heads from the backbone's final layers, then ``--init``'s final layers if given."""
    from sdray.backbones import load_backbone, load_preprocessor
    from sdray.model import RetrievalModel, build_heads
    from sdray.training import init_from_model

    backbone = load_backbone(cfg.backbone, proj_dim=cfg.heads.dense_dim, seed=cfg.optim.seed)
    heads = build_heads(cfg, backbone)  # the fresh sparse head is drawn from cfg.optim.seed
    copied: list[str] = []
    if init_uri:
        init = RetrievalModel.load(init_uri)
        copied = init_from_model(heads, init.heads.state_dict())
    elif cfg.loss.method == "d2s":
        print(f"{_tag(cfg)} warning: d2s without --init distils from the backbone's untrained "
              "final layers; pass --init DENSE_MODEL", file=sys.stderr)
    tok = load_preprocessor(cfg.backbone).tokenizer
    special = sorted(set(int(i) for i in getattr(tok, "all_special_ids", []) if i is not None))
    return heads, copied, special


def local_ray_cpus(workers: int, cpus_per_worker: float) -> int:
    """Logical CPUs for a local Ray: the machine's, and at least one more than the workers hold.

    Ray Data reads the shards in tasks that need a CPU of their own; with every logical CPU held
    by the training workers (``--cpus-per-worker 2`` on a 2-core machine) they never start and
    the run hangs. The extra logical CPU oversubscribes the machine a little instead.
    """
    return max(os.cpu_count() or 1, int(math.ceil(workers * cpus_per_worker)) + 1)


def check_cpus_left_for_data(workers: int, cpus_per_worker: float) -> None:
    """Fail fast, instead of hanging, when the workers would hold every CPU of the cluster."""
    import ray

    total = ray.cluster_resources().get("CPU", 0.0)
    if total - workers * cpus_per_worker < 1:
        raise config_lib.ConfigError(
            f"{workers} worker(s) x --cpus-per-worker {cpus_per_worker:g} hold all {total:g} CPUs of "
            "the Ray cluster, so no CPU is left for Ray Data to read the shards (the run would hang): "
            "lower --cpus-per-worker or --num-workers, or give Ray more CPUs (--num-cpus)")


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run training; returns the summary (also written to ``OUT/summary.json``)."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from pipelines.datasets import ensure_ray
    from sdray.backbones.compat import check_feature_uri
    from sdray.training import heads_state

    cfg = resolve_config(args)
    out = args.out if storage.is_remote(args.out) else os.path.abspath(args.out)
    if storage.is_remote(out):
        storage.check_access(out, write=True)
    else:
        os.makedirs(out, exist_ok=True)
    workers = max(1, args.num_workers)
    if cfg.optim.batch_size % workers:
        raise config_lib.ConfigError(f"optim.batch_size {cfg.optim.batch_size} must be divisible by "
                                     f"--num-workers {workers}")
    per_worker = cfg.optim.batch_size // workers
    mode = _detect_mode(args.train)
    val_mode = _detect_mode(args.val) if args.val else None
    if val_mode == "raw" and mode == "features":
        raise ValueError("a raw --val needs a raw --train (the workers then hold the backbone); "
                         "featurize the val split too")
    for uri, kind in ((args.train, mode), (args.val, val_mode)):
        if kind == "features" and not check_feature_uri(uri, cfg.backbone, "the training config"):
            print(f"{_tag(cfg)} warning: {uri} has no featurize manifest; its backbone and "
                  "preprocessing cannot be checked", file=sys.stderr)
    ensure_ray(num_cpus=args.num_cpus or local_ray_cpus(workers, args.cpus_per_worker))
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    n_rows = _count_rows(args.train, mode, cfg)
    steps_per_epoch = (n_rows // workers) // per_worker
    if steps_per_epoch < 1:
        raise ValueError(f"{n_rows} training rows are fewer than one batch of {cfg.optim.batch_size}")
    total_steps = steps_per_epoch * cfg.optim.epochs
    heads, copied, special = initial_heads(cfg, args.init)
    direct = mode == "features" and _split_bytes(args.train) <= cfg.data.direct_read_max_bytes
    datasets = {} if direct else {"train": _dataset(args.train, mode, cfg, cfg.optim.seed)}
    if val_mode == "raw":  # feature files are read by rank 0 itself (collect_val)
        datasets["val"] = _dataset(args.val, val_mode, cfg, 0)
    if datasets:  # Ray Data reads beside the workers; direct reads need no CPU of their own
        check_cpus_left_for_data(workers, args.cpus_per_worker)
    marker = args.failure_marker or os.path.join(tempfile.gettempdir(), f"sdray-fail-{os.getpid()}")
    loop_config = {
        "config_yaml": config_lib.dumps(cfg), "heads_ref": [ray.put(heads_state(heads))],
        "special_ids": special, "mode": mode, "out": out, "use_gpu": args.use_gpu,
        "total_steps": total_steps, "steps_per_epoch": steps_per_epoch,
        "per_worker_batch": per_worker, "log_every": max(1, args.log_every),
        "shuffle_buffer": min(cfg.data.shuffle_buffer, 4 * per_worker) if cfg.data.shuffle_files else 0,
        "train_files": (args.train if storage.is_remote(args.train) else os.path.abspath(args.train))
        if direct else None,
        "has_val": bool(args.val), "val_features": None if val_mode != "features" else (
            args.val if storage.is_remote(args.val) else os.path.abspath(args.val)),
        "fail_step": args.inject_failure_step, "fail_marker": marker,
        "threads": int(args.cpus_per_worker) if args.cpus_per_worker >= 1 and not args.use_gpu else None,
    }
    # A pending heads_ref inside a list keeps Ray from resolving it before the workers start.
    print(f"{_tag(cfg)} method {cfg.loss.method}, {mode} mode, {n_rows} pairs, {workers} worker(s) "
          f"x batch {per_worker}, {steps_per_epoch} steps/epoch x {cfg.optim.epochs} epochs"
          + (", each worker reads the split itself (data.direct_read_max_bytes)" if direct else "")
          + (f", init {args.init} ({len(copied)} tensors)" if args.init else ""), flush=True)
    # Ray Train writes checkpoints through pyarrow, not fsspec: give it an S3 client with the
    # same endpoint, retries and timeouts (StorageConfig) as every other storage call
    storage_fs, storage_path = storage.pyarrow_s3(out) if storage.is_remote(out) else (None, out)
    trainer = TorchTrainer(
        train_loop,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=args.use_gpu,
                                     resources_per_worker={"CPU": args.cpus_per_worker}),
        torch_config=TorchConfig(backend="nccl" if args.use_gpu else "gloo"),
        datasets=datasets,
        dataset_config=ingest_config(),
        run_config=RunConfig(name=RUN_NAME, storage_path=storage_path, storage_filesystem=storage_fs,
                             # this job's S3 and retry settings reach the workers' own writes
                             worker_runtime_env={"env_vars": storage.s3_env()} if storage.s3_env() else None,
                             failure_config=FailureConfig(max_failures=args.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2)),
    )
    t0 = time.time()
    try:
        result = trainer.fit()
    except Exception as err:  # Train V2 raises the worker group's error from fit()
        raise TrainingFailed(f"training failed: {err}") from err
    if result.error is not None:
        raise TrainingFailed(f"training failed: {result.error}")
    return finalize(out, cfg, result.checkpoint, time.time() - t0)


def finalize(out: str, cfg, checkpoint, seconds: float) -> dict[str, Any]:
    """Publish the kept model at ``out``, write metrics.jsonl, plots and summary.json."""
    from sdray.plots import plot_history
    from sdray.training import STATE_FILE, selection_metric

    with checkpoint.as_directory() as d:
        with open(os.path.join(d, STATE_FILE)) as f:
            loop = json.load(f)["loop"]
        best = storage.join(out, "best")
        kept_from = "best"
        if not storage.exists(storage.join(best, "heads.safetensors")):
            kept_from = "last"
            best = d
        with tempfile.TemporaryDirectory() as tmp:
            for name in ("heads.safetensors", "config.yaml", "model.json"):
                src = os.path.join(best, name) if kept_from == "last" else storage.join(best, name)
                data = open(src, "rb").read() if kept_from == "last" else storage.read_bytes(src)
                with open(os.path.join(tmp, name), "wb") as f:
                    f.write(data)
            meta = json.load(open(os.path.join(tmp, "model.json")))
            meta["kept_from"] = kept_from
            with open(os.path.join(tmp, "model.json"), "w") as f:
                json.dump(meta, f, indent=2, sort_keys=True)
            storage.upload_dir(tmp, out)
    history = loop["history"]
    _write_text(storage.join(out, "metrics.jsonl"), "".join(json.dumps(r) + "\n" for r in history))
    with tempfile.TemporaryDirectory() as tmp:
        plot_history(history, tmp)
        storage.upload_dir(tmp, storage.join(out, "plots"))
    metric, budget = selection_metric(cfg)
    sel = loop.get("selector") or {}
    vals = [r for r in history if r.get("type") == "val"]
    kept = next((r for r in vals if r.get("epoch") == sel.get("best_epoch")), vals[-1] if vals else None)
    summary = {
        "model": out, "method": cfg.loss.method, "kept_from": kept_from,
        "selection": {"metric": metric, "max_nnz": budget, "best_epoch": sel.get("best_epoch"),
                      "best": sel.get("best")},
        "epochs_run": len(vals), "stopped_early": loop.get("stopped_early", False),
        "steps": max((r["step"] for r in history), default=0),
        "resumed_from": loop.get("resumed_from", []),
        "seconds": seconds, "val": kept.get("result") if kept else None,
        "dist": loop.get("dist"),
    }
    if kept_from == "last" and budget is not None and vals:
        print(f"{_tag(cfg)} warning: no epoch met the nnz budget {budget}; kept the last "
              "checkpoint", file=sys.stderr)
    storage.write_json(storage.join(out, "summary.json"), summary)
    write_model_card(out, summary)
    return summary


def main(args: argparse.Namespace) -> int:
    from sdray.evaluation import format_table

    summary = run(args)
    print(f"[sdray train {summary['method']}] done in {summary['seconds']:.0f}s; model at {summary['model']} "
          f"(kept {summary['kept_from']}, epoch {summary['selection']['best_epoch']}, "
          f"{summary['selection']['metric']} within nnz {summary['selection']['max_nnz']})")
    if summary.get("val"):
        print(format_table(summary["val"]))
    if args.json:
        print(json.dumps(summary))
    return 0
