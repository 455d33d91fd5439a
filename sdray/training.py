"""The training core: one optimisation step of ``dense``, ``d2s`` or ``joint`` on a feature batch.

Pure PyTorch (``torch.distributed`` only, no Ray): :mod:`pipelines.train` runs it inside Ray Train
workers, the sweep and the benchmark run it in-process.

Cross-worker negatives (open_clip's ``gather_with_grad`` + ``local_loss`` scheme)
----------------------------------------------------------------------------------
Each of ``W`` workers holds ``B`` pairs. Embeddings are all-gathered *with gradients*
(``torch.distributed.nn.functional.all_gather``, whose backward sums the gradients of every rank
into the local slice), and each rank computes only its own rows::

    i2t rows: local images × all texts      (B, W·B)
    t2i rows: local texts  × all images     (B, W·B)

so every loss term is a mean over the rank's rows. Averaging the parameter gradients over ranks
(what DDP does; done here with one flat ``all_reduce``) gives exactly the gradient of the
single-process loss on the concatenated ``W·B`` batch (tested in ``tests/test_training_ddp.py``).
Multi-positive targets come from the gathered image ids and caption hashes.

Sparse vectors are ``(B, |V|)`` with ``|V|`` = 30,522. They cross workers as **exact top-k pairs**
once they are sparse: ``k`` is the largest non-zero count of any row on any rank, values travel
with gradients and are scattered back into dense rows; the dropped entries are exact zeros of
``log1p(relu(·))`` whose gradient is zero, so nothing changes numerically. While vectors are still
denser than half the vocabulary, fp32 rows are sent instead (``sparse_gather="auto"``); ``"bf16"``
halves those bytes at a small numerical cost.

Checkpoint state (no pickle): heads as safetensors, optimiser tensors as safetensors plus its
hyper-parameters as JSON, scheduler / regulariser / expansion-control state as JSON (they are pure
functions of the step counter) plus the RNG state as a uint8 tensor.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import warnings

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from sdray import config as config_lib
from sdray.config import SdrayConfig
from sdray.heads import RetrieverHeads
from sdray.losses import Columns, ExpansionControl, build_loss, positive_mask
from sdray.losses.targets import ids_to_tensor, score_matrix

warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
warnings.filterwarnings("ignore", message="Sparse invariant checks are implicitly disabled")

METHODS = ("dense", "d2s", "joint")
HEADS_FILE = "heads.safetensors"
CONFIG_FILE = "config.yaml"
META_FILE = "model.json"
OPTIM_FILE = "optimizer.safetensors"
STATE_FILE = "trainer_state.json"

# [CLS], [SEP], [PAD] of BERT-uncased: never kept by the expansion-control mask.
BERT_SPECIAL_IDS = (0, 101, 102)


# --------------------------------------------------------------------------------------------
# distributed helpers (torch.distributed only)


def dist_info() -> tuple[int, int]:
    """``(rank, world_size)``; ``(0, 1)`` when torch.distributed is not initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x (B, ...)`` of every rank along dim 0; gradients flow back to each rank."""
    _, world = dist_info()
    if world == 1:
        return x
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(x.contiguous()), 0)


def gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` of every rank along dim 0, without gradients."""
    _, world = dist_info()
    if world == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, 0)


def gather_sparse(z: torch.Tensor, mode: str = "auto") -> tuple[torch.Tensor, dict[str, float]]:
    """All-gather sparse vectors ``z (B, V)`` with gradients, cheaply; see the module notes.

    Returns ``(z_all (W·B, V), info)`` where ``info`` tells the transport (``gather_k``: the k
    sent, or V for dense rows, and ``gather_bf16``).
    """
    _, world = dist_info()
    v = z.shape[1]
    if world == 1:
        return z, {}
    if mode in ("auto", "topk"):
        k = torch.tensor([int((z != 0).sum(1).max().item()) if z.numel() else 0], device=z.device)
        dist.all_reduce(k, op=dist.ReduceOp.MAX)
        k = max(1, int(k.item()))
        # k values (fp32) + k indices (int64) per row vs V fp32 values.
        if mode == "topk" or 3 * k < v:
            vals, idx = z.topk(k, dim=1)
            vals_all = gather_with_grad(vals)
            idx_all = gather_no_grad(idx)
            z_all = torch.zeros(vals_all.shape[0], v, dtype=z.dtype, device=z.device)
            return z_all.scatter(1, idx_all, vals_all), {"gather_k": float(k)}
    if mode == "bf16":
        return gather_with_grad(z.to(torch.bfloat16)).to(z.dtype), {"gather_k": float(v), "gather_bf16": 1.0}
    return gather_with_grad(z), {"gather_k": float(v)}


def average_gradients(params: Sequence[torch.nn.Parameter]) -> None:
    """DDP's gradient averaging as one flat all-reduce (no-op for one process)."""
    _, world = dist_info()
    if world == 1:
        return
    grads = []
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        grads.append(p.grad)
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world
    offset = 0
    for g in grads:
        n = g.numel()
        g.copy_(flat[offset : offset + n].view_as(g))
        offset += n


def broadcast_parameters(module: torch.nn.Module) -> None:
    """Make every rank start from rank 0's weights."""
    _, world = dist_info()
    if world == 1:
        return
    for t in list(module.parameters()) + list(module.buffers()):
        dist.broadcast(t.data, src=0)


# --------------------------------------------------------------------------------------------
# sparse-aware kernels (CPU): exact gradients, cost proportional to the non-zeros.
# The vocabulary projection's backward (``_SparseVocab``) is the default on CPU: once fewer than
# SPARSE_DENSITY_THRESHOLD of the logits are positive (a trained head: a few hundred of |V|), its
# two B×V×H gradient matmuls become products over the non-zeros; the forward matmul stays dense
# (the positives are not known before it). Measured on the demo's features (2-core CPU, batch
# 256, |V| 30,522): a joint step 0.60 → 0.48 s, a d2s step 0.64 → 0.43 s (benchmarks/train_step.py).
# The CSR score products (``_SparseScores``) stay opt-in (Trainer(fast_kernels=True)): torch's CPU
# CSR products and the transposed copies they need were slower than MKL's dense matmuls.

#: above this fraction of non-zeros the dense BLAS path is faster than the sparse one
SPARSE_DENSITY_THRESHOLD = 0.02


def _density(x: torch.Tensor) -> float:
    """Fraction of non-zeros of a non-negative ``x`` (relu outputs, sparse vectors).

    ``sign().sum()`` counts them: on a (256, 30,522) fp32 tensor it takes a tenth of
    ``count_nonzero``'s time on one CPU thread (3 ms against 34 ms), and a step calls this twice.
    """
    return float(x.sign().sum()) / max(1, x.numel())


class _SparseVocab(torch.autograd.Function):
    """``z = log1p(relu(y @ W.T))`` whose backward only touches the positive logits.

    The derivative of ``log1p(relu(l))`` is ``1/(1+l)`` where ``l > 0`` and 0 elsewhere, so when
    few logits are positive the gradients of ``y (B, H)`` and ``W (V, H)`` are sparse-matrix
    products over the non-zeros of ``z`` instead of two dense ``B×V×H`` matmuls. Exact. Denser
    than ``SPARSE_DENSITY_THRESHOLD``, the backward is the dense one.
    """

    @staticmethod
    def forward(ctx, y, weight):
        pos = (y @ weight.T).relu_()
        ctx.sparse = _density(pos) < SPARSE_DENSITY_THRESHOLD
        if ctx.sparse:
            rows, cols = pos.nonzero(as_tuple=True)
            ctx.save_for_backward(y, weight, rows, cols, 1.0 / (1.0 + pos[rows, cols]))
        else:
            ctx.save_for_backward(y, weight, pos)
        ctx.shape = pos.shape
        return torch.log1p(pos)

    @staticmethod
    def backward(ctx, gz):
        if ctx.sparse:
            y, weight, rows, cols, deriv = ctx.saved_tensors
            g = gz[rows, cols] * deriv
            gl = torch.sparse_coo_tensor(torch.stack([rows, cols]), g, ctx.shape, is_coalesced=True)
            gy = torch.sparse.mm(gl, weight) if ctx.needs_input_grad[0] else None
            gw = torch.sparse.mm(gl.t(), y) if ctx.needs_input_grad[1] else None
            return gy, gw
        y, weight, pos = ctx.saved_tensors
        # relu's backward (zero where the logit was not positive) of log1p's (gz / (1 + l))
        gl = torch.ops.aten.threshold_backward(gz / (pos + 1.0), pos, 0.0)
        return (gl @ weight if ctx.needs_input_grad[0] else None,
                gl.T @ y if ctx.needs_input_grad[1] else None)


class _SparseScores(torch.autograd.Function):
    """``a @ b.T`` for non-negative sparse rows ``a (N, V)``, ``b (M, V)`` via CSR products."""

    @staticmethod
    def forward(ctx, a, b):
        ctx.save_for_backward(a, b)
        return torch.sparse.mm(a.to_sparse_csr(), b.T.contiguous())

    @staticmethod
    def backward(ctx, g):
        a, b = ctx.saved_tensors
        ga = gb = None
        if ctx.needs_input_grad[0]:
            ga = torch.sparse.mm(b.T.contiguous().to_sparse_csr(), g.T.contiguous()).T
        if ctx.needs_input_grad[1]:
            gb = torch.sparse.mm(a.T.contiguous().to_sparse_csr(), g.contiguous()).T
        return ga, gb


def sparse_encode(sparse_head, dense: torch.Tensor) -> torch.Tensor:
    """``SparseHead`` forward; on CPU with the sparse-aware backward (:class:`_SparseVocab`)."""
    if dense.device.type != "cpu" or torch.is_autocast_enabled():
        return sparse_head(dense)
    y = sparse_head.norm(sparse_head.transform(dense))
    return _SparseVocab.apply(y, sparse_head.vocab_projector.weight)


def sparse_scores(a: torch.Tensor, b: torch.Tensor, fast: bool = False) -> torch.Tensor:
    """``a @ b.T`` in fp32 (``score_matrix``); CSR products when both sides are sparse on CPU."""
    if (fast and a.device.type == "cpu" and a.dtype == torch.float32 and b.dtype == torch.float32
            and _density(a) < SPARSE_DENSITY_THRESHOLD and _density(b) < SPARSE_DENSITY_THRESHOLD):
        return _SparseScores.apply(a, b)
    return score_matrix(a, b)


# --------------------------------------------------------------------------------------------
# batches


@dataclass
class FeatureBatch:
    """One batch of pre-projection features plus what the targets and expansion control need.

    ``text_features (B, Ht)``, ``image_features (B, Hi)`` float; ``image_ids``/``caption_ids``
    ``(B,)`` int64 (stable hashes, equal across processes); ``input_ids``/``attention_mask``
    ``(B, L)`` int64 or ``None`` (expansion control needs them).
    """

    text_features: torch.Tensor
    image_features: torch.Tensor
    image_ids: torch.Tensor
    caption_ids: torch.Tensor
    input_ids: torch.Tensor | None = None
    attention_mask: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.text_features.shape[0])

    def to(self, device) -> "FeatureBatch":
        mv = lambda t: None if t is None else t.to(device, non_blocking=True)  # noqa: E731
        return FeatureBatch(*(mv(getattr(self, f)) for f in
                              ("text_features", "image_features", "image_ids", "caption_ids",
                               "input_ids", "attention_mask")))

    @classmethod
    def from_arrays(cls, text_features, image_features, image_ids, captions,
                    input_ids=None, attention_mask=None) -> "FeatureBatch":
        """From numpy/list columns: ids and captions become stable int64 hashes; ragged
        ``input_ids`` (a list of 1-D arrays) are padded with 0 and get an attention mask."""
        ids = None
        if input_ids is not None:
            ids, attention_mask = pad_token_ids(input_ids, attention_mask)
        return cls(
            torch.as_tensor(np.asarray(text_features, dtype=np.float32)),
            torch.as_tensor(np.asarray(image_features, dtype=np.float32)),
            ids_to_tensor([_py(x) for x in image_ids]),
            ids_to_tensor([_py(x) for x in captions]),
            ids,
            attention_mask,
        )


def _py(x):
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, bytes):
        return x
    return x if isinstance(x, (int, str)) else str(x)


def pad_token_ids(input_ids, attention_mask=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Ragged or rectangular token ids -> ``(ids (B, L) int64, mask (B, L) int64)``."""
    if isinstance(input_ids, torch.Tensor) or (
        isinstance(input_ids, np.ndarray) and input_ids.dtype != object and input_ids.ndim == 2
    ):
        ids = torch.as_tensor(np.asarray(input_ids), dtype=torch.long)
        mask = (torch.ones_like(ids) if attention_mask is None
                else torch.as_tensor(np.asarray(attention_mask), dtype=torch.long))
        return ids, mask
    rows = [np.asarray(r, dtype=np.int64).reshape(-1) for r in input_ids]
    length = max((len(r) for r in rows), default=1) or 1
    ids = np.zeros((len(rows), length), np.int64)
    mask = np.zeros((len(rows), length), np.int64)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = r
        mask[i, : len(r)] = 1
    return torch.from_numpy(ids), torch.from_numpy(mask)


# --------------------------------------------------------------------------------------------
# schedule


def effective_lr(cfg: SdrayConfig) -> float:
    """The method's learning rate: ``optim.method_lr[method]`` if set, else ``optim.lr``."""
    return float(cfg.optim.method_lr.get(cfg.loss.method, cfg.optim.lr))


def lr_factor(step: int, total_steps: int, warmup_fraction: float) -> float:
    """Linear warm-up over ``warmup_fraction·total`` steps, then linear decay to 0 (official)."""
    warm = int(round(warmup_fraction * total_steps))
    if warm > 0 and step < warm:
        return (step + 1) / warm
    rest = max(1, total_steps - warm)
    return max(0.0, (total_steps - step) / rest)


# --------------------------------------------------------------------------------------------
# the per-method loss on a (possibly distributed) batch: the sdray.losses modules


class Trainer:
    """Owns heads, loss, optimiser, schedule and expansion control; :meth:`train_step` does one step.

    Args:
        cfg: the run's :class:`SdrayConfig` (``loss.method`` picks the method).
        heads: :class:`RetrieverHeads`, already initialised (``--init`` applied).
        total_steps: optimiser steps of the whole run (schedules and warm-ups).
        device: where the heads live.
        special_token_ids: token ids the expansion-control mask never keeps.

    Trainable parameters: ``dense`` — projections and τ; ``d2s`` — the sparse head only (the dense
    teacher and its τ are frozen); ``joint`` — everything.
    """

    def __init__(self, cfg: SdrayConfig, heads: RetrieverHeads, total_steps: int,
                 device: str | torch.device = "cpu", special_token_ids: Sequence[int] = BERT_SPECIAL_IDS,
                 fast_kernels: bool = False):
        self.cfg = cfg
        self.method = cfg.loss.method
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}")
        self.device = torch.device(device)
        self.heads = heads.to(self.device).train()
        self.total_steps = max(1, int(total_steps))
        self.step = 0
        rank, _ = dist_info()
        for name, p in self.heads.named_parameters():
            dense_part = name.startswith(("text_proj.", "vision_proj.")) or name == "tau"
            p.requires_grad_(
                self.method == "joint" or (self.method == "dense") == dense_part
            )
        self.params = [p for p in self.heads.parameters() if p.requires_grad]
        self.loss_module = build_loss(cfg.loss, self.total_steps)
        use_ec = (self.method == "d2s" and cfg.loss.d2s_expansion_control) or (
            self.method == "joint" and cfg.loss.expansion_control)
        self.expansion = (ExpansionControl(self.heads.sparse.vocab_size, self.total_steps,
                                           end_fraction=cfg.loss.expansion_end_fraction,
                                           exclude_token_ids=[i for i in special_token_ids
                                                              if i < self.heads.sparse.vocab_size])
                          if use_ec else None)
        self.generator = torch.Generator().manual_seed(cfg.optim.seed * 1000 + rank)
        self.base_lr = effective_lr(cfg)
        # joint: the sparse head may have its own lr (optim.sparse_head_lr); one group when the
        # two agree, so checkpoints of single-group runs still load
        sparse_lr = cfg.optim.sparse_head_lr
        sparse_lr = self.base_lr if sparse_lr is None else float(sparse_lr)
        split = self.method == "joint" and sparse_lr != self.base_lr
        if split:
            sparse_ids = {id(p) for p in self.heads.sparse.parameters()}
            groups = [{"params": [p for p in self.params if id(p) not in sparse_ids], "lr": self.base_lr},
                      {"params": [p for p in self.params if id(p) in sparse_ids], "lr": sparse_lr}]
        else:
            groups = [{"params": self.params, "lr": self.base_lr}]
        self.group_base_lrs = [g["lr"] for g in groups]
        self.optimizer = torch.optim.AdamW(groups, lr=self.base_lr,
                                           weight_decay=cfg.optim.weight_decay)
        self.amp = bool(cfg.optim.amp and self.device.type == "cuda")
        if fast_kernels and self.method != "dense":
            self.loss_module.sparse_scorer = lambda a, b: sparse_scores(a, b, fast=True)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp)

    # ---- loss -------------------------------------------------------------------------------

    def compute_loss(self, batch: FeatureBatch, step: int | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """This rank's loss on ``batch`` (its mean over ranks is the global-batch loss)."""
        step = self.step if step is None else step
        heads = self.heads
        rank, world = dist_info()
        b = len(batch)
        with torch.autocast(self.device.type, dtype=torch.float16, enabled=self.amp):
            frozen_dense = self.method == "d2s"
            with torch.set_grad_enabled(torch.is_grad_enabled() and not frozen_dense):
                d_txt = heads.text_proj(batch.text_features)
                d_img = heads.vision_proj(batch.image_features)
            z_txt = z_img = None
            if self.method != "dense":
                z_txt = sparse_encode(heads.sparse, d_txt)
                z_img = sparse_encode(heads.sparse, d_img)
        d_txt, d_img = d_txt.float(), d_img.float()
        tau = heads.tau.reshape(())
        if frozen_dense:
            tau = tau.detach()
        logs: dict[str, torch.Tensor] = {"temperature": tau.detach()}
        if z_txt is not None:
            z_txt, z_img = z_txt.float(), z_img.float()
            if self.expansion is not None:
                if batch.input_ids is None:
                    raise ValueError("expansion control needs input_ids in the batch")
                self.expansion.train()
                mask = self.expansion(batch.input_ids, step, batch.attention_mask, generator=self.generator)
                z_txt = z_txt * mask.to(z_txt.dtype)

        # targets: the gathered batch's multi-positive mask (the loss cuts out this rank's rows)
        pos = None
        if self.method != "d2s":
            pos = positive_mask(gather_no_grad(batch.image_ids), gather_no_grad(batch.caption_ids))
        columns, info = None, {}
        if world > 1:
            z_txt_all = z_img_all = None
            if z_txt is not None:
                mode = self.cfg.optim.sparse_gather
                z_txt_all, info_t = gather_sparse(z_txt, mode)
                z_img_all, info_i = gather_sparse(z_img, mode)
                info = {"gather_k": max(info_t["gather_k"], info_i["gather_k"])}
            columns = Columns(gather_with_grad(d_img), gather_with_grad(d_txt), z_img_all, z_txt_all,
                              offset=rank * b)
        lm = self.loss_module
        if self.method == "dense":
            loss, terms = lm.terms(d_img, d_txt, tau, pos, columns=columns)
        elif self.method == "d2s":
            loss, terms = lm.terms(d_img, d_txt, z_img, z_txt, tau, step=step, columns=columns)
        else:
            loss, terms = lm.terms(d_img, d_txt, z_img, z_txt, tau, pos, step=step, columns=columns)
        logs.update({k: v if isinstance(v, torch.Tensor) else torch.tensor(float(v))
                     for k, v in terms.items()})
        if z_txt is not None:
            logs.update(nnz_text=(z_txt.detach() != 0).sum(1).float().mean(),
                        nnz_image=(z_img.detach() != 0).sum(1).float().mean())
        if "gather_k" in info:
            logs["gather_k"] = torch.tensor(info["gather_k"])
        return loss, self._reduce_logs(logs)

    def _reduce_logs(self, logs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Average the logged scalars over ranks (one small all-reduce)."""
        _, world = dist_info()
        if world == 1:
            return logs
        keys = sorted(logs)
        vec = torch.stack([logs[k].detach().float().reshape(()).to(self.device) for k in keys])
        dist.all_reduce(vec)
        vec /= world
        return dict(zip(keys, vec.unbind(0)))

    # ---- step -------------------------------------------------------------------------------

    def current_lr(self) -> float:
        return self.base_lr * lr_factor(self.step, self.total_steps, self.cfg.optim.warmup_fraction)

    def train_step(self, batch: FeatureBatch) -> dict[str, float]:
        """One optimisation step on this rank's ``batch``; returns logs averaged over ranks."""
        batch = batch.to(self.device)
        lr = self.current_lr()
        factor = lr_factor(self.step, self.total_steps, self.cfg.optim.warmup_fraction)
        for group, base in zip(self.optimizer.param_groups, self.group_base_lrs):
            group["lr"] = base * factor
        self.optimizer.zero_grad(set_to_none=True)
        loss, logs = self.compute_loss(batch)
        self.scaler.scale(loss).backward()
        average_gradients(self.params)
        self.scaler.unscale_(self.optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.cfg.optim.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.heads.clamp_tau_()
        self.step += 1
        # one device-to-host copy for every logged scalar (a sync per float() on CUDA otherwise)
        keys = [*logs, "grad_norm"]
        values = torch.stack([t.detach().float().reshape(()).to(self.device)
                              for t in [*logs.values(), grad_norm]]).cpu().tolist()
        out = dict(zip(keys, values))
        out.update(lr=lr, step=self.step)
        if len(self.group_base_lrs) > 1:
            out["lr_sparse"] = self.group_base_lrs[1] * factor
        if self.expansion is not None:
            out["expansion_p"] = self.expansion.probability(self.step - 1)
        return out

    # ---- state ------------------------------------------------------------------------------

    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Optimiser/scaler/RNG state as ``(tensors, json)``: no pickle."""
        sd = self.optimizer.state_dict()
        tensors: dict[str, torch.Tensor] = {}
        for pid, st in sd["state"].items():
            for name, value in st.items():
                t = value if isinstance(value, torch.Tensor) else torch.tensor(value)
                tensors[f"optim.{pid}.{name}"] = t.detach().cpu().contiguous()
        tensors["rng.expansion"] = self.generator.get_state().contiguous()
        groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()}
                  for g in sd["param_groups"]]
        meta = {
            "optimizer": {"type": "AdamW", "param_groups": groups},
            "scheduler": {"type": "linear_warmup_decay", "step": self.step,
                          "total_steps": self.total_steps,
                          "warmup_fraction": self.cfg.optim.warmup_fraction,
                          "base_lr": self.base_lr, "group_base_lrs": list(self.group_base_lrs),
                          "lr": self.current_lr()},
            "regularizer": self._regularizer_state(),
            "expansion_control": None if self.expansion is None else {
                "p": self.expansion.probability(self.step), "total_steps": self.total_steps,
                "end_fraction": self.expansion.end_fraction},
            "grad_scaler": self.scaler.state_dict() if self.amp else None,
            "step": self.step,
        }
        return tensors, meta

    def _regularizer_state(self) -> dict[str, Any] | None:
        lm = self.loss_module
        if not hasattr(lm, "text_reg"):
            return None
        loss = self.cfg.loss
        return {"kind": loss.d2s_regularizer if loss.method == "d2s" else loss.regularizer,
                "text_weight": lm.text_reg.weight, "image_weight": lm.image_reg.weight,
                "text_weight_now": lm.text_reg.weight_at(self.step),
                "image_weight_now": lm.image_reg.weight_at(self.step),
                "warmup_fraction": lm.text_reg.warmup_fraction, "total_steps": self.total_steps}

    def load_state(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        """Inverse of :meth:`state` (heads are loaded separately)."""
        state: dict[int, dict[str, torch.Tensor]] = {}
        for key, value in tensors.items():
            if key.startswith("optim."):
                _, pid, name = key.split(".", 2)
                state.setdefault(int(pid), {})[name] = value.to(self.device) if name != "step" else value
        groups = []
        for g in meta["optimizer"]["param_groups"]:
            g = dict(g)
            if "betas" in g:
                g["betas"] = tuple(g["betas"])
            groups.append(g)
        self.optimizer.load_state_dict({"state": state, "param_groups": groups})
        if "rng.expansion" in tensors:
            self.generator.set_state(tensors["rng.expansion"].to(torch.uint8))
        if self.amp and meta.get("grad_scaler"):
            self.scaler.load_state_dict(meta["grad_scaler"])
        self.step = int(meta["step"])


# --------------------------------------------------------------------------------------------
# checkpoints (a local folder; the pipeline moves it to the --out URI)


def heads_state(heads: RetrieverHeads) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone().contiguous() for k, v in heads.state_dict().items()}


def write_model_dir(path: str, cfg: SdrayConfig, heads: RetrieverHeads, meta: dict[str, Any]) -> None:
    """The :class:`sdray.model.RetrievalModel` layout: heads, config and model.json."""
    os.makedirs(path, exist_ok=True)
    save_file(heads_state(heads), os.path.join(path, HEADS_FILE))
    config_lib.save(cfg, os.path.join(path, CONFIG_FILE))
    with open(os.path.join(path, META_FILE), "w") as f:
        json.dump(meta, f, indent=2, sort_keys=True)


def save_checkpoint(path: str, trainer: Trainer, extra: dict[str, Any], meta: dict[str, Any] | None = None) -> None:
    """A checkpoint folder: a loadable model plus optimiser and trainer state.

    ``extra`` is the loop's own JSON state (epoch, position, history, best, ...).
    """
    meta = dict(meta or {})
    meta.setdefault("method", trainer.method)
    meta.setdefault("step", trainer.step)
    meta.setdefault("tau", float(trainer.heads.tau.detach()))
    write_model_dir(path, trainer.cfg, trainer.heads, meta)
    tensors, state = trainer.state()
    save_file(tensors, os.path.join(path, OPTIM_FILE))
    with open(os.path.join(path, STATE_FILE), "w") as f:
        json.dump({"trainer": state, "loop": extra}, f, indent=2, sort_keys=True)


def load_checkpoint(path: str, trainer: Trainer) -> dict[str, Any]:
    """Restore heads, optimiser and trainer state from a checkpoint folder; returns the loop state."""
    state = load_file(os.path.join(path, HEADS_FILE))
    trainer.heads.load_state_dict(state)
    with open(os.path.join(path, STATE_FILE)) as f:
        saved = json.load(f)
    trainer.load_state(load_file(os.path.join(path, OPTIM_FILE)), saved["trainer"])
    return saved["loop"]


def init_from_model(heads: RetrieverHeads, state: dict[str, torch.Tensor]) -> list[str]:
    """Copy an earlier model's final layers (dense projections and τ) into ``heads``.

    The sparse head stays fresh (Song et al.: ``joint`` starts from a dense model's final layer;
    D2S distils a sparse head from a frozen dense model). Returns the keys copied.
    """
    own = heads.state_dict()
    keys = [k for k in state if k.startswith(("text_proj.", "vision_proj.")) or k == "tau"]
    for k in keys:
        if k not in own or own[k].shape != state[k].shape:
            raise ValueError(f"--init model does not fit: {k} has shape "
                             f"{tuple(state[k].shape)}, expected {tuple(own.get(k, torch.empty(0)).shape)}")
    heads.load_state_dict({**own, **{k: state[k] for k in keys}})
    return keys


# --------------------------------------------------------------------------------------------
# checkpoint selection within a sparsity budget


def metric_value(result: dict[str, Any], metric: str) -> float:
    """``rsum_dense|rsum_sparse|rsum_hybrid`` or a dotted path such as ``t2i.sparse.R@1``."""
    if metric.startswith("rsum_"):
        rep = metric[len("rsum_"):]
        return float(sum(result[d][rep][f"R@{k}"] for d in ("t2i", "i2t") for k in (1, 5, 10)))
    node: Any = result
    for part in metric.split("."):
        node = node[part]
    return float(node)


def selection_metric(cfg: SdrayConfig) -> tuple[str, float | None]:
    """The metric and nnz budget used to keep the best epoch; ``dense`` ignores sparsity."""
    if cfg.loss.method == "dense":
        return "rsum_dense", None
    return cfg.selection.metric, cfg.selection.max_nnz


def within_budget(result: dict[str, Any], max_nnz: float | None) -> bool:
    if max_nnz is None:
        return True
    sp = result["sparsity"]
    return sp["text_nnz"] <= max_nnz and sp["image_nnz"] <= max_nnz


@dataclass
class Selector:
    """Keeps the best epoch by ``metric`` among epochs within the nnz budget; early stopping."""

    metric: str
    max_nnz: float | None
    patience: int
    best: float | None = None
    best_epoch: int | None = None
    bad_epochs: int = 0
    history: list = field(default_factory=list)

    def update(self, epoch: int, result: dict[str, Any]) -> bool:
        """Record an epoch; True when it is the new best (within budget)."""
        value = metric_value(result, self.metric)
        ok = within_budget(result, self.max_nnz)
        improved = ok and (self.best is None or value > self.best)
        if improved:
            self.best, self.best_epoch, self.bad_epochs = value, epoch, 0
        elif self.best is not None:
            self.bad_epochs += 1
        self.history.append({"epoch": epoch, "value": value, "within_budget": ok})
        return improved

    @property
    def should_stop(self) -> bool:
        return self.best is not None and self.bad_epochs >= self.patience

    def to_json(self) -> dict[str, Any]:
        return {"metric": self.metric, "max_nnz": self.max_nnz, "patience": self.patience,
                "best": self.best, "best_epoch": self.best_epoch, "bad_epochs": self.bad_epochs,
                "history": self.history}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "Selector":
        return cls(d["metric"], d["max_nnz"], d["patience"], d["best"], d["best_epoch"],
                   d["bad_epochs"], list(d["history"]))


# --------------------------------------------------------------------------------------------
# in-process loop (sweeps, tests, benchmarks): no Ray


def iterate_batches(data: dict[str, Any], batch_size: int, seed: int, drop_last: bool = True) -> Iterable[FeatureBatch]:
    """Shuffled :class:`FeatureBatch` es from in-memory columns (``text_features``,
    ``image_features``, ``image_id``, ``caption``, optional ``input_ids``)."""
    n = len(data["text_features"])
    order = np.random.default_rng(seed).permutation(n)
    stop = n - n % batch_size if drop_last else n
    for a in range(0, stop, batch_size):
        idx = order[a : a + batch_size]
        yield FeatureBatch.from_arrays(
            np.asarray(data["text_features"])[idx], np.asarray(data["image_features"])[idx],
            [data["image_id"][i] for i in idx], [data["caption"][i] for i in idx],
            None if data.get("input_ids") is None else [data["input_ids"][i] for i in idx],
        )


def fit_in_process(cfg: SdrayConfig, heads: RetrieverHeads, train: dict[str, Any],
                   val: dict[str, Any] | None = None, log=None,
                   device: str | torch.device = "cpu") -> tuple[RetrieverHeads, list[dict]]:
    """Train ``heads`` on in-memory features (one process), validating each epoch.

    Returns the best heads (by :class:`Selector`; the last if no epoch met the budget) and the
    per-epoch history (validation results included, each with the fusion ``fusion.calibrate``
    chose). Used by the sweep; the Ray pipeline runs the same :class:`Trainer`.
    """
    from sdray.evaluation import evaluate_and_calibrate

    n = len(train["text_features"])
    bs = min(cfg.optim.batch_size, n)
    per_epoch = n // bs
    trainer = Trainer(cfg, heads, per_epoch * cfg.optim.epochs, device)
    metric, budget = selection_metric(cfg)
    sel = Selector(metric, budget, cfg.selection.patience)
    best_state, history = None, []
    for epoch in range(cfg.optim.epochs):
        t0 = time.time()
        losses = []
        for batch in iterate_batches(train, bs, cfg.optim.seed + epoch):
            losses.append(trainer.train_step(batch))
        row = {"epoch": epoch + 1, "loss": float(np.mean([l["loss"] for l in losses])),
               "tau": float(trainer.heads.tau.detach()), "seconds": time.time() - t0}
        if val is not None:
            trainer.heads.eval()
            with trainer.heads.judged(cfg.selection.vectors):  # res["fusion"]: the chosen one
                res, _ = evaluate_and_calibrate(trainer.heads, val, cfg)
            trainer.heads.train()
            row["val"] = res
            if sel.update(epoch + 1, res):
                best_state = heads_state(trainer.heads)
            row["selected"] = sel.best_epoch == epoch + 1
        history.append(row)
        if log:
            log(row)
        if sel.should_stop:
            break
    if best_state is not None:
        trainer.heads.load_state_dict(best_state)
    return trainer.heads.eval(), history


def rng_seed_all(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % (2**32))


__all__ = [
    "METHODS", "Trainer", "FeatureBatch", "gather_with_grad", "gather_no_grad", "gather_sparse",
    "average_gradients", "broadcast_parameters", "lr_factor", "save_checkpoint", "load_checkpoint",
    "write_model_dir", "init_from_model", "Selector", "metric_value", "selection_metric",
    "within_budget", "fit_in_process", "iterate_batches", "pad_token_ids", "dist_info",
]
