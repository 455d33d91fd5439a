"""sdray.training: per-method losses match the loss modules; 2 workers × B == 1 worker × 2B;
checkpoint state round-trips without pickle; schedules; selection within a sparsity budget."""

from __future__ import annotations

import os
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file
from torch import nn

from sdray.config import from_dict
from sdray.heads import RetrieverHeads
from sdray.losses import D2SLoss, DenseContrastiveLoss, JointSelfDistillationLoss, positive_mask
from sdray.training import (
    FeatureBatch,
    Selector,
    Trainer,
    init_from_model,
    iterate_batches,
    load_checkpoint,
    lr_factor,
    metric_value,
    save_checkpoint,
)

HT, HI, D, V, HID = 16, 12, 8, 60, 6


def make_heads(seed: int = 0) -> RetrieverHeads:
    g = torch.Generator().manual_seed(seed)
    tp, vp = nn.Linear(HT, D), nn.Linear(HI, D)
    with torch.no_grad():
        for lin in (tp, vp):
            lin.weight.copy_(torch.randn(lin.weight.shape, generator=g) * 0.3)
            lin.bias.copy_(torch.randn(lin.bias.shape, generator=g) * 0.1)
    heads = RetrieverHeads(tp, vp, torch.randn(V, HID, generator=g) * 0.5)
    with torch.no_grad():
        for p in heads.sparse.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3 + (1.0 if p.dim() == 1 and p is heads.sparse.norm.weight else 0.0))
    return heads


def make_batch(n: int, seed: int = 1) -> FeatureBatch:
    g = torch.Generator().manual_seed(seed)
    image_ids = [f"img{i // 2}" for i in range(n)]  # two captions per image
    captions = [f"cap{i}" if i % 5 else "same caption" for i in range(n)]  # a repeated caption
    ids = torch.randint(0, V, (n, 7), generator=g)
    return FeatureBatch.from_arrays(
        torch.randn(n, HT, generator=g).numpy(), torch.randn(n, HI, generator=g).numpy(),
        image_ids, captions, [r.numpy() for r in ids])


def cfg_for(method: str, **loss) -> object:
    return from_dict({"loss": {"method": method, "q_reg": 1e-2, "d_reg": 5e-3, "d2s_l1": 1e-2,
                               "d2s_expansion_control": False, "expansion_control": False, **loss},
                      "optim": {"lr": 1e-2, "method_lr": {}, "batch_size": 8,
                                "warmup_fraction": 0.0}})


def module_reference(cfg, heads, batch, step, txt_mask=None):
    """The loss module's value on the whole batch, computed straight from the heads."""
    d_t, d_i = heads.text_proj(batch.text_features), heads.vision_proj(batch.image_features)
    z_t, z_i = heads.sparse(d_t), heads.sparse(d_i)
    pos = positive_mask(batch.image_ids, batch.caption_ids)
    lc, total = cfg.loss, 20
    if lc.method == "dense":
        return DenseContrastiveLoss()(d_i, d_t, heads.tau, pos)[0]
    if lc.method == "d2s":
        return D2SLoss(lc.d2s_l1, lc.d2s_l1, total_steps=total, regularizer=lc.d2s_regularizer)(
            d_i.detach(), d_t.detach(), z_i, z_t, heads.tau.detach(), txt_mask=txt_mask, step=step)[0]
    return JointSelfDistillationLoss(lc.w1, lc.w2, lc.lambda1, lc.lambda2, lc.q_reg, lc.d_reg,
                                     total_steps=total, regularizer=lc.regularizer,
                                     detach_teacher=lc.detach_teacher,
                                     teacher_orientation=lc.teacher_orientation)(
        d_i, d_t, z_i, z_t, heads.tau, pos, txt_mask=txt_mask, step=step)[0]


def head_grads(heads) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in heads.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("method,opts", [
    ("dense", {}),
    ("d2s", {}),
    ("joint", {}),
    ("joint", {"detach_teacher": False, "teacher_orientation": "official"}),
    ("joint", {"regularizer": "flops"}),
])
def test_trainer_loss_and_gradients_equal_the_loss_module(method, opts):
    """One process: the Trainer's loss and gradients are the module's on the whole batch (whose
    mask is asymmetric: sample 0 pairs img0 with "same caption", which sample 5 also carries)."""
    cfg = cfg_for(method, **opts)
    trainer = Trainer(cfg, make_heads(), total_steps=20)
    batch = make_batch(8)
    assert not torch.equal(*(lambda p: (p, p.T))(positive_mask(batch.image_ids, batch.caption_ids)))
    loss, logs = trainer.compute_loss(batch, step=5)
    loss.backward()
    ref_heads = make_heads()
    Trainer(cfg, ref_heads, total_steps=20)  # same trainable parameters as the Trainer's
    ref = module_reference(cfg, ref_heads, batch, step=5)
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    assert float(logs["loss"]) == pytest.approx(float(ref), rel=1e-5)
    got, expect = head_grads(trainer.heads), head_grads(ref_heads)
    assert got.keys() == expect.keys() and got
    for n in got:
        torch.testing.assert_close(got[n], expect[n], rtol=1e-5, atol=1e-7, msg=n)


def test_d2s_keeps_its_l1_baseline_whatever_joint_regularises_with():
    """d2s under the default config trains with today's explicit settings (L1, weight
    ``d2s_l1 = 1e-3``), and joint's regulariser and weights do not reach it."""
    batch = make_batch(8)

    def d2s_loss(loss: dict) -> tuple[torch.Tensor, dict]:
        cfg = from_dict({"loss": {"method": "d2s", "d2s_expansion_control": False, **loss}})
        trainer = Trainer(cfg, make_heads(), total_steps=20)
        return trainer.compute_loss(batch, step=5)[0], trainer.state()[1]["regularizer"]

    default, state = d2s_loss({})
    assert state["kind"] == "l1" and state["text_weight"] == state["image_weight"] == 1e-3
    explicit, _ = d2s_loss({"d2s_regularizer": "l1", "d2s_l1": 1e-3})
    joint_changed, _ = d2s_loss({"regularizer": "flops", "q_reg": 2e-2, "d_reg": 2e-2})
    torch.testing.assert_close(default, explicit, rtol=0, atol=0)
    torch.testing.assert_close(default, joint_changed, rtol=0, atol=0)
    flops, flops_state = d2s_loss({"d2s_regularizer": "flops"})
    assert flops_state["kind"] == "flops" and not torch.equal(default, flops)


def test_trainable_parameters_per_method():
    for method, trainable in (("dense", {"text_proj", "vision_proj", "tau"}),
                              ("d2s", {"sparse"}), ("joint", {"text_proj", "vision_proj", "tau", "sparse"})):
        t = Trainer(cfg_for(method), make_heads(), 4)
        got = {n.split(".")[0] for n, p in t.heads.named_parameters() if p.requires_grad}
        assert got == trainable, method
        before = {n: p.detach().clone() for n, p in t.heads.named_parameters()}
        t.train_step(make_batch(8))
        for n, p in t.heads.named_parameters():
            changed = not torch.equal(before[n], p.detach())
            if n.split(".")[0] not in trainable:
                assert not changed, (method, n)


def test_sparse_head_gets_its_own_lr():
    cfg = cfg_for("joint", expansion_control=True)
    cfg.optim.warmup_fraction = 0.5
    cfg.optim.sparse_head_lr = 4e-2
    t = Trainer(cfg, make_heads(), total_steps=4)
    dense_group, sparse_group = t.optimizer.param_groups
    sparse_ids = {id(p) for p in t.heads.sparse.parameters()}
    assert {id(p) for p in sparse_group["params"]} == sparse_ids
    assert not sparse_ids & {id(p) for p in dense_group["params"]}
    assert len(dense_group["params"]) + len(sparse_group["params"]) == len(t.params)
    for step in range(4):
        factor = lr_factor(step, 4, 0.5)
        logs = t.train_step(make_batch(8, seed=step))
        assert dense_group["lr"] == pytest.approx(1e-2 * factor)
        assert sparse_group["lr"] == pytest.approx(4e-2 * factor)
        assert logs["lr"] == pytest.approx(1e-2 * factor)
        assert logs["lr_sparse"] == pytest.approx(4e-2 * factor)
    # unset (or equal to the method's lr): one group, as before
    for value in (None, 1e-2):
        cfg.optim.sparse_head_lr = value
        assert len(Trainer(cfg, make_heads(), total_steps=4).optimizer.param_groups) == 1
    # dense and d2s train one kind of parameter: one group at the method's lr
    for method in ("dense", "d2s"):
        c = cfg_for(method)
        c.optim.sparse_head_lr = 4e-2
        groups = Trainer(c, make_heads(), total_steps=4).optimizer.param_groups
        assert len(groups) == 1 and groups[0]["lr"] == pytest.approx(1e-2)


def _straight_and_resumed(cfg, ck: str) -> tuple[Trainer, Trainer, dict, int]:
    """Four steps in one go, and two steps + checkpoint + two more in a fresh trainer.

    Returns ``(straight, resumed, loop, step)``: ``loop`` is what :func:`load_checkpoint` gave
    back and ``step`` the resumed trainer's step right after loading.
    """
    batches = [make_batch(8, seed=s) for s in range(4)]
    ref = Trainer(cfg, make_heads(), total_steps=4)
    for b in batches:
        ref.train_step(b)
    first = Trainer(cfg, make_heads(), total_steps=4)
    for b in batches[:2]:
        first.train_step(b)
    save_checkpoint(ck, first, {"epoch": 0, "batch": 2})
    resumed = Trainer(cfg, make_heads(seed=9), total_steps=4)
    loop = load_checkpoint(ck, resumed)
    step = resumed.step
    for b in batches[2:]:
        resumed.train_step(b)
    return ref, resumed, loop, step


def test_checkpoint_roundtrip_with_sparse_head_lr(tmp_path):
    cfg = cfg_for("joint", expansion_control=True)
    cfg.optim.sparse_head_lr = 3e-2
    ref, b2, _, _ = _straight_and_resumed(cfg, str(tmp_path / "ck"))
    assert len(b2.optimizer.param_groups) == 2
    for (n, p), (_, q) in zip(ref.heads.named_parameters(), b2.heads.named_parameters()):
        torch.testing.assert_close(p, q, msg=n)


def test_expansion_control_masks_captions_to_their_tokens():
    cfg = cfg_for("d2s", d2s_expansion_control=True)
    t = Trainer(cfg, make_heads(), total_steps=100, special_token_ids=())
    assert t.expansion is not None and t.expansion.probability(0) == 1.0
    logs = t.train_step(make_batch(8))
    # at step 0 every caption is masked to its <= 7 distinct tokens
    assert logs["nnz_text"] <= 7
    assert logs["expansion_p"] == 1.0


def test_lr_schedule_warmup_then_linear_decay():
    f = [lr_factor(s, 10, 0.2) for s in range(10)]
    assert f[0] == pytest.approx(0.5) and f[1] == pytest.approx(1.0)
    assert f[2] == pytest.approx(1.0) and f[9] == pytest.approx(1 / 8)
    assert all(a >= b for a, b in zip(f[1:], f[2:]))
    assert lr_factor(0, 10, 0.0) == 1.0


def test_checkpoint_roundtrip_resumes_identically(tmp_path):
    cfg = cfg_for("joint", expansion_control=True)
    ref, b2, loop, step = _straight_and_resumed(cfg, str(tmp_path / "ck"))
    files = sorted(os.listdir(tmp_path / "ck"))
    assert files == ["config.yaml", "heads.safetensors", "model.json", "optimizer.safetensors",
                     "trainer_state.json"]
    assert loop == {"epoch": 0, "batch": 2} and step == 2
    for (n, p), (_, q) in zip(ref.heads.named_parameters(), b2.heads.named_parameters()):
        torch.testing.assert_close(p, q, msg=n)
    # the checkpoint is also a loadable model
    from sdray.model import RetrievalModel
    m = RetrievalModel.load(str(tmp_path / "ck"))
    assert m.meta["method"] == "joint"


def test_init_from_model_copies_final_layers_only():
    src, dst = make_heads(1), make_heads(2)
    keys = init_from_model(dst, src.state_dict())
    assert set(keys) == {"text_proj.linear.weight", "text_proj.linear.bias", "vision_proj.linear.weight",
                         "vision_proj.linear.bias", "tau"}
    torch.testing.assert_close(dst.text_proj.linear.weight, src.text_proj.linear.weight)
    assert not torch.equal(dst.sparse.transform.weight, src.sparse.transform.weight)


def _result(rsum_part: float, nnz: float) -> dict:
    m = {"R@1": rsum_part, "R@5": rsum_part, "R@10": rsum_part, "MRR@10": rsum_part}
    reps = {"dense": m, "sparse": m, "hybrid": m}
    return {"t2i": reps, "i2t": reps, "sparsity": {"text_nnz": nnz, "image_nnz": nnz, "flops": 1.0}}


def test_selector_respects_sparsity_budget_and_patience():
    sel = Selector("rsum_sparse", 256.0, patience=2)
    assert not sel.update(1, _result(0.9, 3000))  # best recall, too dense: not eligible
    assert sel.update(2, _result(0.5, 200))
    assert not sel.update(3, _result(0.4, 100))
    assert sel.update(4, _result(0.6, 250))
    assert sel.best_epoch == 4 and not sel.should_stop
    sel.update(5, _result(0.1, 10))
    sel.update(6, _result(0.1, 10))
    assert sel.should_stop
    assert Selector.from_json(sel.to_json()).to_json() == sel.to_json()
    assert metric_value(_result(0.5, 1), "t2i.sparse.R@1") == 0.5


def test_iterate_batches_drops_last_and_covers_rows():
    n = 21
    data = {"text_features": np.zeros((n, HT), np.float32), "image_features": np.zeros((n, HI), np.float32),
            "image_id": list(range(n)), "caption": [str(i) for i in range(n)]}
    batches = list(iterate_batches(data, 8, seed=0))
    assert [len(b) for b in batches] == [8, 8]
    assert len(set(torch.cat([b.image_ids for b in batches]).tolist())) == 16


# ---------------------------------------------------------------------------------------------
# 2 workers x B == 1 worker x 2B (torch.distributed gloo, two local processes)


def _slice(batch: FeatureBatch, a: int, b: int) -> FeatureBatch:
    return FeatureBatch(*(None if t is None else t[a:b] for t in (
        batch.text_features, batch.image_features, batch.image_ids, batch.caption_ids,
        batch.input_ids, batch.attention_mask)))


CASES = [
    ("dense", {}, "auto"),
    ("d2s", {"d2s_expansion_control": True}, "topk"),
    ("joint", {}, "auto"),
    ("joint", {"regularizer": "flops", "detach_teacher": False, "teacher_orientation": "official"}, "topk"),
    ("joint", {"expansion_control": True}, "dense"),
]


def _ddp_worker(rank: int, world: int, port: int, out_dir: str):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        for i, (method, opts, gather) in enumerate(CASES):
            cfg = cfg_for(method, **opts).model_copy(deep=True)
            cfg.optim.sparse_gather = gather
            t = Trainer(cfg, make_heads(), total_steps=20, special_token_ids=())
            t.generator.manual_seed(123 + rank)
            full = make_batch(16)
            half = _slice(full, rank * 8, (rank + 1) * 8)
            loss, logs = t.compute_loss(half, step=3)
            loss.backward()
            from sdray.training import average_gradients
            average_gradients(t.params)
            if rank == 0:
                out = {f"grad.{n}": p.grad.clone() for n, p in t.heads.named_parameters() if p.grad is not None}
                out["loss"] = logs["loss"].reshape(1).clone()
                save_file(out, os.path.join(out_dir, f"case{i}.safetensors"))
        dist.barrier()   # both ranks done before teardown (CI saw a rank abort in gloo's exit)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_workers_equal_one_worker_with_double_batch(tmp_path):
    mp.spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    for i, (method, opts, gather) in enumerate(CASES):
        cfg = cfg_for(method, **opts).model_copy(deep=True)
        cfg.optim.sparse_gather = gather
        t = Trainer(cfg, make_heads(), total_steps=20, special_token_ids=())
        full = make_batch(16)
        if t.expansion is not None:
            # the same per-caption draws as the two ranks made (rank r draws for its 8 rows)
            g0, g1 = torch.Generator().manual_seed(123), torch.Generator().manual_seed(124)
            m0 = t.expansion(full.input_ids[:8], 3, full.attention_mask[:8], generator=g0)
            m1 = t.expansion(full.input_ids[8:], 3, full.attention_mask[8:], generator=g1)
            mask = torch.cat([m0, m1])
            t.expansion = _FixedMask(mask)
        loss, logs = t.compute_loss(full, step=3)
        loss.backward()
        got = load_file(str(tmp_path / f"case{i}.safetensors"))
        # ... and both equal the loss module on the whole batch (module_reference)
        ref_heads = make_heads()
        Trainer(cfg, ref_heads, total_steps=20, special_token_ids=())
        ref = module_reference(cfg, ref_heads, full, step=3,
                               txt_mask=None if t.expansion is None else t.expansion.mask)
        ref.backward()
        torch.testing.assert_close(got["loss"][0], ref.detach(), rtol=1e-5, atol=1e-6)
        for n, g in head_grads(ref_heads).items():
            torch.testing.assert_close(got[f"grad.{n}"], g, rtol=1e-4, atol=1e-6,
                                       msg=lambda m: f"module {method} {opts} {n}: {m}")
        torch.testing.assert_close(got["loss"][0], loss.detach(), rtol=1e-5, atol=1e-6)
        n_grads = 0
        for n, p in t.heads.named_parameters():
            if p.grad is None:
                continue
            n_grads += 1
            torch.testing.assert_close(got[f"grad.{n}"], p.grad, rtol=1e-4, atol=1e-6,
                                       msg=lambda m: f"{method} {opts} {n}: {m}")
        assert n_grads > 0


class _FixedMask(nn.Module):
    def __init__(self, mask):
        super().__init__()
        self.mask = mask

    def forward(self, *a, **k):
        return self.mask

    def probability(self, step):
        return 1.0


@pytest.mark.parametrize("threshold", [1.0, 0.0])
def test_sparse_kernels_give_the_same_gradients(monkeypatch, threshold):
    """The CPU sparse-aware kernels (forced on with threshold 1, off with 0) are exact: loss and
    gradients equal those of the plain ``SparseHead`` module under autograd."""
    import sdray.training as tr

    monkeypatch.setattr(tr, "SPARSE_DENSITY_THRESHOLD", threshold)
    plain = tr.sparse_encode
    grads = []
    for kernels in (True, False):
        monkeypatch.setattr(tr, "sparse_encode", plain if kernels else lambda head, dense: head(dense))
        t = Trainer(cfg_for("joint", expansion_control=True), make_heads(), 10, fast_kernels=kernels,
                    special_token_ids=())
        t.generator.manual_seed(5)
        loss, _ = t.compute_loss(make_batch(12), step=4)
        loss.backward()
        grads.append((loss.detach(), {n: p.grad.clone() for n, p in t.heads.named_parameters()}))
    torch.testing.assert_close(grads[0][0], grads[1][0])
    for n in grads[0][1]:
        torch.testing.assert_close(grads[0][1][n], grads[1][1][n], rtol=1e-5, atol=1e-6, msg=n)


# ---------------------------------------------------------------------------------------------
# one seed, one run


class _StubBackbone:
    """What build_heads reads from a backbone: fresh final layers and word embeddings."""

    def initial_projections(self):
        g = torch.Generator().manual_seed(0)
        tp, vp = nn.Linear(HT, D), nn.Linear(HI, D)
        with torch.no_grad():
            for lin in (tp, vp):
                lin.weight.copy_(torch.randn(lin.weight.shape, generator=g) * 0.3)
                lin.bias.zero_()
        return tp, vp

    def word_embeddings(self):
        return torch.randn(V, HID, generator=torch.Generator().manual_seed(1))


def _feature_data(n: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    groups = rng.integers(0, n // 2, n)
    ct, ci = rng.normal(size=(n // 2, HT)), rng.normal(size=(n // 2, HI))
    return {"text_features": (ct[groups] + 0.3 * rng.normal(size=(n, HT))).astype(np.float32),
            "image_features": (ci[groups] + 0.3 * rng.normal(size=(n, HI))).astype(np.float32),
            "image_id": [f"img{seed}_{i - (i % 6 == 1)}" for i in range(n)],
            "caption": [f"cap {seed} {i}" for i in range(n)],
            "input_ids": [rng.integers(1, V, rng.integers(2, 6)) for _ in range(n)]}


def test_build_heads_is_a_function_of_the_seed():
    from sdray.model import build_heads

    cfg = from_dict({"optim": {"seed": 3}})
    a = build_heads(cfg, _StubBackbone())
    torch.manual_seed(999)  # the global RNG plays no part
    torch.rand(10)
    b = build_heads(cfg, _StubBackbone())
    c = build_heads(from_dict({"optim": {"seed": 4}}), _StubBackbone())
    for k, v in a.state_dict().items():
        torch.testing.assert_close(v, b.state_dict()[k], msg=k)
    assert not torch.equal(a.sparse.transform.weight, c.sparse.transform.weight)
    assert torch.equal(a.sparse.vocab_projector.weight, _StubBackbone().word_embeddings())


def test_sparse_head_config_fields_are_wired():
    from sdray.model import build_heads

    fresh = build_heads(from_dict({"heads": {"init_vocab_from_embeddings": False, "sparse_hidden": 10}}),
                        _StubBackbone())
    assert fresh.sparse.vocab_projector.weight.shape == (V, 10)
    assert fresh.sparse.transform.out_features == 10
    with pytest.raises(ValueError, match="sparse_hidden"):
        build_heads(from_dict({"heads": {"sparse_hidden": 10}}), _StubBackbone())


def test_same_seed_same_run_in_process():
    """fit_in_process twice with one config (joint, expansion control: random draws, shuffled
    batches): identical history and heads; another seed gives another run."""
    from sdray.model import build_heads
    from sdray.training import fit_in_process

    train, val = _feature_data(96, 0), _feature_data(32, 1)

    def run(seed):
        cfg = from_dict({"loss": {"method": "joint", "expansion_control": True, "q_reg": 1e-3,
                                  "d_reg": 1e-3},
                         "optim": {"seed": seed, "epochs": 2, "batch_size": 16, "lr": 1e-2,
                                   "method_lr": {}},
                         "selection": {"max_nnz": None}, "fusion": {"w2_grid": [0.5, 1.0]}})
        heads, history = fit_in_process(cfg, build_heads(cfg, _StubBackbone()), train, val)
        return heads.state_dict(), [{k: v for k, v in r.items() if k != "seconds"} for r in history]

    (sa, ha), (sb, hb), (sc, hc) = run(5), run(5), run(6)
    assert ha == hb
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    assert not torch.equal(sa["sparse.transform.weight"], sc["sparse.transform.weight"])


def test_validation_judges_uncapped_vectors_and_the_kept_model_serves_capped_ones():
    """heads.topk_* caps what eval/index/serve see; the selection budget must still see the
    model's own sparsity, or a cap at the budget would make every epoch look within it."""
    from sdray.model import build_heads
    from sdray.training import fit_in_process

    train, val = _feature_data(64, 0), _feature_data(32, 1)
    cfg = from_dict({"loss": {"method": "joint"}, "heads": {"topk_text": 3, "topk_image": 3},
                     "optim": {"epochs": 1, "batch_size": 16, "lr": 1e-3, "method_lr": {}},
                     "selection": {"max_nnz": 5.0, "vectors": "uncapped"}, "fusion": {"w2_grid": [1.0]}})
    heads, history = fit_in_process(cfg, build_heads(cfg, _StubBackbone()), train, val)
    sparsity = history[0]["val"]["sparsity"]
    assert sparsity["text_nnz"] > 5 and sparsity["image_nnz"] > 5  # uncapped, over the budget
    assert not history[0]["selected"]
    served = heads.encode_text(torch.as_tensor(val["text_features"][:8], dtype=torch.float32)).sparse
    assert int((served != 0).sum(1).max()) <= 3
    assert heads.topk_text == heads.topk_image == 3  # the caps are back after validation


def test_selection_can_judge_the_served_vectors():
    """selection.vectors = 'served': validation sees the capped vectors that eval/index/serve see,
    for recall and nnz alike, so a cap within the budget keeps an epoch the uncapped judge rejects."""
    from sdray.model import build_heads
    from sdray.training import fit_in_process

    train, val = _feature_data(64, 0), _feature_data(32, 1)
    base = {"loss": {"method": "joint"}, "heads": {"topk_text": 3, "topk_image": 3},
            "optim": {"epochs": 1, "batch_size": 16, "lr": 1e-3, "method_lr": {}},
            "selection": {"max_nnz": 5.0}, "fusion": {"w2_grid": [1.0]}}
    runs = {}
    for vectors in ("uncapped", "served"):
        cfg = from_dict({**base, "selection": {"max_nnz": 5.0, "vectors": vectors}})
        runs[vectors] = fit_in_process(cfg, build_heads(cfg, _StubBackbone()), train, val)[1][0]
    assert runs["uncapped"]["val"]["sparsity"]["text_nnz"] > 5 and not runs["uncapped"]["selected"]
    assert runs["served"]["val"]["sparsity"]["text_nnz"] <= 3 and runs["served"]["val"]["sparsity"]["image_nnz"] <= 3
    assert runs["served"]["selected"]
    with pytest.raises(Exception):
        from_dict({"selection": {"vectors": "capped"}})


def test_density_counts_the_positive_entries_of_a_relu_output():
    """The kernels choose their path by ``_density``: the fraction of non-zeros, here of a relu'd
    batch of logits (about half positive) and of a sparse one (5 per row)."""
    from sdray.training import _density

    g = torch.Generator().manual_seed(0)
    dense = torch.randn(64, 1000, generator=g).relu_()
    sparse = torch.zeros(64, 1000)
    sparse[:, :5] = torch.rand(64, 5, generator=g) + 0.1
    for x in (dense, sparse, torch.zeros(3, 7)):
        assert _density(x) == pytest.approx(int(torch.count_nonzero(x)) / x.numel())
    assert _density(sparse) == pytest.approx(0.005)
