"""Tests of sdray.losses against independent, loop-based transcriptions of the formulas.

The reference functions below (``ref_*``) deliberately use nothing from ``sdray.losses`` and
no vectorised softmax/CE from torch: scores are Python loops over scalar tensor products,
softmax is ``exp / Σ exp``, so that a mistake in the library cannot be mirrored here.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from sdray.losses import (
    D2SLoss,
    DenseContrastiveLoss,
    ExpansionControl,
    FlopsRegularizer,
    JointSelfDistillationLoss,
    L1Regularizer,
    build_loss,
    distillation,
    info_nce,
    positive_mask,
    quadratic_warmup,
    token_support_mask,
)
from sdray.losses.targets import multi_positive_cross_entropy

DT = torch.float64

# --------------------------------------------------------------------------------------------
# Independent naive reference (scalar loops)
# --------------------------------------------------------------------------------------------


def ref_dot(a, b):
    out = a[0] * b[0]
    for k in range(1, len(a)):
        out = out + a[k] * b[k]
    return out


def ref_matrix(a, b, scale=None):
    rows = []
    for i in range(a.shape[0]):
        row = []
        for j in range(b.shape[0]):
            s = ref_dot(a[i], b[j])
            row.append(s / scale if scale is not None else s)
        rows.append(row)
    return rows  # list of lists of 0-d tensors


def ref_transpose(m):
    return [[m[i][j] for i in range(len(m))] for j in range(len(m[0]))]


def ref_log_softmax(row):
    z = torch.log(sum(torch.exp(x) for x in row))
    return [x - z for x in row]


def ref_softmax(row):
    e = [torch.exp(x) for x in row]
    z = sum(e)
    return [x / z for x in e]


def ref_ce_rows(m, pos):
    """mean over rows of −Σ_j (pos_ij / Σ_k pos_ik) · log_softmax(row)_j."""
    total = 0.0
    for i, row in enumerate(m):
        ls = ref_log_softmax(row)
        k = sum(1 for j in range(len(row)) if pos[i][j])
        total = total - sum(ls[j] / k for j in range(len(row)) if pos[i][j])
    return total / len(m)


def ref_info_nce(m, pos):
    return 0.5 * (ref_ce_rows(m, pos) + ref_ce_rows(ref_transpose(m), ref_transpose(pos)))


def ref_kd(teacher, student, detach, orientation):
    """½(KD_i2t + KD_t2i), KD = −mean_rows Σ softmax(teacher)·log_softmax(student)."""
    if detach:
        teacher = [[x.detach() for x in row] for row in teacher]
    n_i, n_t = len(student), len(student[0])
    i2t = 0.0
    for i in range(n_i):
        p = ref_softmax(teacher[i])
        ls = ref_log_softmax(student[i])
        i2t = i2t - sum(p[j] * ls[j] for j in range(n_t))
    i2t = i2t / n_i
    t2i = 0.0
    for j in range(n_t):
        student_col = [student[i][j] for i in range(n_i)]
        if orientation == "correct":
            p = ref_softmax([teacher[i][j] for i in range(n_i)])  # column j of the teacher
        else:  # official: row j of the un-transposed teacher
            p = ref_softmax(teacher[j])
        ls = ref_log_softmax(student_col)
        t2i = t2i - sum(p[k] * ls[k] for k in range(n_i))
    t2i = t2i / n_t
    return 0.5 * (i2t + t2i)


def ref_l1(z):
    total = 0.0
    for b in range(z.shape[0]):
        total = total + sum(torch.abs(z[b, v]) for v in range(z.shape[1]))
    return total / z.shape[0]


def ref_flops(z):
    total = 0.0
    for v in range(z.shape[1]):
        m = sum(torch.abs(z[b, v]) for b in range(z.shape[0])) / z.shape[0]
        total = total + m * m
    return total


def ref_warm(weight, step, total, frac):
    t_w = frac * total
    return weight * (min(step, t_w) / t_w) ** 2


def ref_joint(di, dt, zi, zt, tau, pos, mask, hp, detach, orientation, step, total):
    if mask is not None:
        zt = torch.stack([torch.stack([zt[j, v] * mask[j][v] for v in range(zt.shape[1])])
                          for j in range(zt.shape[0])])
    sd = ref_matrix(di, dt, tau)
    ss = ref_matrix(zi, zt)
    si = [[hp["w1"] * sd[i][j] + hp["w2"] * ss[i][j] for j in range(len(sd[0]))]
          for i in range(len(sd))]
    big_l = (hp["l1"] * ref_info_nce(sd, pos) + hp["l2"] * ref_info_nce(ss, pos)
             + ref_info_nce(si, pos))
    big_lp = (hp["l1"] * ref_kd(si, sd, detach, orientation)
              + hp["l2"] * ref_kd(si, ss, detach, orientation))
    reg_t = ref_warm(hp["q"], step, total, 0.2) * ref_l1(zt)
    reg_i = ref_warm(hp["d"], step, total, 0.2) * ref_l1(zi)
    return 0.25 * (big_l + big_lp) + 0.5 * (reg_t + reg_i), big_l, big_lp, reg_t, reg_i


# --------------------------------------------------------------------------------------------
# Fixtures
# --------------------------------------------------------------------------------------------

B, D, V = 4, 3, 6
HP = dict(w1=0.3, w2=0.7, l1=0.9, l2=0.6, q=0.05, d=0.02)
TOTAL, STEP = 100, 10  # warm-up horizon 20 → weight factor (10/20)² = 0.25

# image ids [0, 0, 1, 2], captions [a, b, c, c]: samples 0,1 share an image, 2,3 a caption.
POS_MULTI = [
    [1, 1, 0, 0],
    [1, 1, 0, 0],
    [0, 0, 1, 1],
    [0, 0, 1, 1],
]
POS_EYE = [[int(i == j) for j in range(B)] for i in range(B)]
# samples (A, x), (B, dog), (A, dog), (C, y): image A and caption "dog" are relevant through
# sample 2, so image 0 ↔ caption 1 is positive while image 1 ↔ caption 0 is not (asymmetric).
POS_ASYM = [
    [1, 1, 1, 0],
    [0, 1, 1, 0],
    [1, 1, 1, 0],
    [0, 0, 0, 1],
]
MASK = [  # caption 1 restricted to its tokens {0, 2, 5}, caption 3 to {1}; 0 and 2 expand
    [1, 1, 1, 1, 1, 1],
    [1, 0, 1, 0, 0, 1],
    [1, 1, 1, 1, 1, 1],
    [0, 1, 0, 0, 0, 0],
]


def make_batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    di = F.normalize(torch.randn(B, D, generator=g, dtype=DT), dim=1)
    dt = F.normalize(torch.randn(B, D, generator=g, dtype=DT), dim=1)
    zi = torch.relu(torch.randn(B, V, generator=g, dtype=DT)) + 0.05
    zt = torch.relu(torch.randn(B, V, generator=g, dtype=DT)) + 0.05
    tau = torch.tensor(0.5, dtype=DT)
    leaves = [x.clone().requires_grad_(True) for x in (di, dt, zi, zt, tau)]
    return leaves


def grads(loss, leaves):
    return torch.autograd.grad(loss, leaves)


COMBOS = list(itertools.product([True, False], ["correct", "official"], [False, True],
                                ["eye", "multi", "asym"]))


@pytest.mark.parametrize("detach,orientation,use_mask,pos_kind", COMBOS)
def test_joint_loss_and_gradients_match_naive_reference(detach, orientation, use_mask, pos_kind):
    leaves = make_batch()
    pos_list = {"eye": POS_EYE, "multi": POS_MULTI, "asym": POS_ASYM}[pos_kind]
    mask = MASK if use_mask else None
    ref_total, ref_l, ref_lp, ref_rt, ref_ri = ref_joint(
        *leaves, pos_list, mask, HP, detach, orientation, STEP, TOTAL)
    ref_grads = grads(ref_total, leaves)

    loss_fn = JointSelfDistillationLoss(
        w1=HP["w1"], w2=HP["w2"], lambda1=HP["l1"], lambda2=HP["l2"], q_reg=HP["q"],
        d_reg=HP["d"], total_steps=TOTAL, warmup_fraction=0.2, detach_teacher=detach,
        teacher_orientation=orientation)
    pos = torch.tensor(pos_list, dtype=torch.bool)
    txt_mask = torch.tensor(mask, dtype=DT) if use_mask else None
    # pos=None must mean the identity: exercise both spellings.
    pos_arg = None if (pos_kind == "eye" and use_mask) else pos
    total, logs = loss_fn(*leaves, pos=pos_arg, txt_mask=txt_mask, step=STEP)
    got_grads = grads(total, leaves)

    assert total.dtype == DT
    torch.testing.assert_close(total, ref_total, rtol=1e-10, atol=1e-12)
    for name, g_got, g_ref in zip(["img_dense", "txt_dense", "img_sparse", "txt_sparse", "tau"],
                                  got_grads, ref_grads):
        torch.testing.assert_close(g_got, g_ref, rtol=1e-9, atol=1e-12, msg=name)
    assert logs["L"] == pytest.approx(float(ref_l.detach()), rel=1e-10)
    assert logs["L_prime"] == pytest.approx(float(ref_lp.detach()), rel=1e-10)
    assert logs["reg_text"] == pytest.approx(float(ref_rt.detach()), rel=1e-10)
    assert logs["reg_image"] == pytest.approx(float(ref_ri.detach()), rel=1e-10)
    assert logs["loss"] == pytest.approx(float(ref_total.detach()), rel=1e-10)
    assert logs["reg_weight_text"] == pytest.approx(HP["q"] * 0.25)
    assert all(isinstance(v, float) for v in logs.values())
    if use_mask:  # masked-out caption terms get no gradient at all
        zero = torch.tensor(MASK) == 0
        assert torch.all(got_grads[3][zero] == 0)


def test_joint_options_change_the_math():
    """Guards the parametrised test against options that silently do nothing."""
    leaves = make_batch(1)
    pos = torch.tensor(POS_MULTI, dtype=torch.bool)
    out = {}
    for detach, orient in itertools.product([True, False], ["correct", "official"]):
        fn = JointSelfDistillationLoss(w1=0.3, w2=0.7, q_reg=0, d_reg=0, detach_teacher=detach,
                                       teacher_orientation=orient)
        loss, _ = fn(*leaves, pos=pos)
        out[detach, orient] = (loss.detach(), grads(loss, leaves))
    # detaching changes gradients, not values
    torch.testing.assert_close(out[True, "correct"][0], out[False, "correct"][0])
    assert not torch.allclose(out[True, "correct"][1][0], out[False, "correct"][1][0])
    # orientation changes the value
    assert not torch.allclose(out[True, "correct"][0], out[True, "official"][0])
    # multi-positive changes the value
    fn = JointSelfDistillationLoss(q_reg=0, d_reg=0)
    assert not torch.allclose(fn(*leaves, pos=pos)[0], fn(*leaves)[0])


def test_kd_gradient_detached_teacher_and_analytic_student_gradient():
    """KD(t→s) = ½(KD_i2t + KD_t2i): with a detached teacher ∂/∂t is exactly zero, and
    ∂/∂s = ½[(softmax_row(s) − softmax_row(t)) + (softmax_col(s) − softmax_col(t))] / N."""
    g = torch.Generator().manual_seed(8)
    t = torch.randn(4, 4, generator=g, dtype=DT, requires_grad=True)
    s = torch.randn(4, 4, generator=g, dtype=DT, requires_grad=True)
    g_t, g_s = torch.autograd.grad(distillation(t, s, detach_teacher=True), [t, s],
                                   allow_unused=True)
    assert g_t is None
    expect = 0.5 * ((torch.softmax(s, 1) - torch.softmax(t, 1))
                    + (torch.softmax(s, 0) - torch.softmax(t, 0))) / 4
    torch.testing.assert_close(g_s, expect.detach())
    g_t2, _ = torch.autograd.grad(distillation(t, s, detach_teacher=False), [t, s])
    assert g_t2.abs().max() > 1e-3
    # in the joint loss, the logged parts add up to the total (¼(L+L') + ½(R_t+R_i))
    fn = JointSelfDistillationLoss(q_reg=0.1, d_reg=0.2)
    loss, logs = fn(*make_batch(2))
    assert logs["relevance"] == pytest.approx(0.25 * (logs["L"] + logs["L_prime"]))
    assert logs["reg"] == pytest.approx(0.5 * (logs["reg_text"] + logs["reg_image"]))
    assert logs["loss"] == pytest.approx(logs["relevance"] + logs["reg"])
    assert loss.item() == pytest.approx(logs["loss"])


def test_joint_official_orientation_needs_square():
    fn = JointSelfDistillationLoss(teacher_orientation="official", q_reg=0, d_reg=0)
    di, dt, zi, zt, tau = make_batch()
    pos = torch.ones(3, 4, dtype=torch.bool)
    with pytest.raises(ValueError):
        fn(di[:3], dt, zi[:3], zt, tau, pos=pos)
    with pytest.raises(ValueError):
        JointSelfDistillationLoss(teacher_orientation="sideways")


def test_joint_rectangular_batch_correct_orientation_matches_reference():
    di, dt, zi, zt, tau = make_batch(3)
    di, zi = di[:3].detach().requires_grad_(), zi[:3].detach().requires_grad_()
    pos_list = [[1, 0, 0, 1], [0, 1, 0, 0], [0, 0, 1, 0]]
    ref, *_ = ref_joint(di, dt, zi, zt, tau, pos_list, None, HP, True, "correct", STEP, TOTAL)
    fn = JointSelfDistillationLoss(w1=HP["w1"], w2=HP["w2"], lambda1=HP["l1"],
                                   lambda2=HP["l2"], q_reg=HP["q"], d_reg=HP["d"],
                                   total_steps=TOTAL)
    got, _ = fn(di, dt, zi, zt, tau, pos=torch.tensor(pos_list, dtype=torch.bool), step=STEP)
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)


def test_joint_requires_step_during_warmup():
    fn = JointSelfDistillationLoss(total_steps=100)
    with pytest.raises(ValueError, match="step"):
        fn(*make_batch())
    JointSelfDistillationLoss()(*make_batch())  # no warm-up configured: step optional


# --------------------------------------------------------------------------------------------
# Multi-positive targets
# --------------------------------------------------------------------------------------------


def test_positive_mask_from_ids():
    pos = positive_mask([0, 0, 1, 2], ["a", "b", "c", "c"])
    assert pos.dtype == torch.bool
    assert pos.tolist() == [[bool(x) for x in r] for r in POS_MULTI]
    assert torch.equal(positive_mask(torch.tensor([5, 6, 5])),
                       torch.tensor([[1, 0, 1], [0, 1, 0], [1, 0, 1]], dtype=torch.bool))
    # None ids never match each other; diagonal stays True
    pos = positive_mask(["x", None, None], [None, None, None])
    assert pos.tolist() == [[True, False, False], [False, True, False], [False, False, True]]
    # a caption naming several images: one caption, three images → all positive to each other
    pos = positive_mask(["i1", "i2", "i3"], ["dog", "dog", "dog"])
    assert bool(pos.all())
    with pytest.raises(ValueError):
        positive_mask([1, 2], ["a"])


def test_positive_mask_marks_pairs_made_by_a_third_sample():
    """(A, "x"), (B, "dog"), (A, "dog"): image A (sample 0) and caption "dog" (sample 1) are
    relevant, because sample 2 pairs them; image B and caption "x" are not: asymmetric."""
    pos = positive_mask(["A", "B", "A"], ["x", "dog", "dog"])
    assert pos.tolist() == [[True, True, True], [False, True, True], [True, True, True]]
    assert bool(pos[0, 1]) and not bool(pos[1, 0])
    assert pos.tolist() == [[bool(x) for x in r] for r in
                            positive_mask(["A", "B", "A", "C"], ["x", "dog", "dog", "y"])[:3, :3].tolist()]
    assert positive_mask(["A", "B", "A", "C"], ["x", "dog", "dog", "y"]).int().tolist() == POS_ASYM
    # against the definition, on a random batch with many repeats
    g = torch.Generator().manual_seed(3)
    imgs = torch.randint(0, 6, (40,), generator=g).tolist()
    caps = [f"c{k}" for k in torch.randint(0, 8, (40,), generator=g).tolist()]
    pos = positive_mask(imgs, caps)
    pairs = set(zip(imgs, caps))
    expect = [[(imgs[i], caps[j]) in pairs for j in range(40)] for i in range(40)]
    assert pos.tolist() == expect
    assert not torch.equal(pos, pos.T)


def test_info_nce_uses_the_transposed_mask_for_text_to_image():
    """With an asymmetric mask, the t2i CE of caption j counts the images i with pos[i, j]."""
    g = torch.Generator().manual_seed(2)
    s = torch.randn(4, 4, generator=g, dtype=DT)
    pos = torch.tensor(POS_ASYM, dtype=torch.bool)
    got = info_nce(s, pos)
    ls_rows, ls_cols = torch.log_softmax(s, 1), torch.log_softmax(s, 0)
    i2t = -sum(ls_rows[i, pos[i]].mean() for i in range(4)) / 4
    t2i = -sum(ls_cols[pos[:, j], j].mean() for j in range(4)) / 4
    torch.testing.assert_close(got, 0.5 * (i2t + t2i))
    assert not torch.allclose(got, info_nce(s, pos.T))


def test_positive_mask_hash_is_stable_across_calls():
    a = positive_mask(["img/1.jpg", "img/2.jpg"], ["a red car", "a red car"])
    from sdray.losses.targets import ids_to_tensor
    t1 = ids_to_tensor(["a red car", "b"])
    t2 = ids_to_tensor(["a red car", "b"])
    assert torch.equal(t1, t2) and t1[0] != t1[1]
    assert bool(a.all())


def test_identity_pos_equals_cross_entropy_on_arange():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(5, 5, generator=g, dtype=DT)
    ar = torch.arange(5)
    expect = 0.5 * (F.cross_entropy(s, ar) + F.cross_entropy(s.T, ar))
    torch.testing.assert_close(info_nce(s), expect)
    torch.testing.assert_close(info_nce(s, torch.eye(5, dtype=torch.bool)), expect)
    fn = DenseContrastiveLoss()
    di, dt, *_, tau = make_batch()
    loss, logs = fn(di, dt, tau)
    sd = di @ dt.T / tau
    ar = torch.arange(B)
    torch.testing.assert_close(loss, 0.5 * (F.cross_entropy(sd, ar) + F.cross_entropy(sd.T, ar)))
    assert logs["temperature"] == pytest.approx(0.5)


def test_dense_contrastive_matches_reference_with_multi_positive_and_grad_tau():
    di, dt, _, _, tau = make_batch(4)
    ref = ref_info_nce(ref_matrix(di, dt, tau), POS_MULTI)
    got, _ = DenseContrastiveLoss()(di, dt, tau, torch.tensor(POS_MULTI, dtype=torch.bool))
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)
    for a, b in zip(grads(got, [di, dt, tau]), grads(ref, [di, dt, tau])):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_duplicated_caption_is_not_punished():
    """Captions 2 and 3 are the same text (identical embeddings). Under multi-positive targets:
    (a) the image→text CE of row 2 is −log(p₂+p₃) + log 2 (the pair is treated as one positive
    set), and (b) the loss never pushes the duplicate's score down (∂L/∂s[2,3] ≤ 0), whereas the
    diagonal target does (> 0)."""
    g = torch.Generator().manual_seed(5)
    img = F.normalize(torch.randn(4, 8, generator=g, dtype=DT), dim=1)
    txt = F.normalize(torch.randn(4, 8, generator=g, dtype=DT), dim=1)
    txt = torch.cat([txt[:3], txt[2:3]])  # caption 3 == caption 2
    img = torch.cat([img[:3], img[1:2]])  # and sample 3 has its own image id 3
    pos = positive_mask([0, 1, 2, 3], ["a", "b", "c", "c"])
    s = (img @ txt.T / 0.1).requires_grad_(True)
    p = torch.softmax(s[2].detach(), 0)
    row_ce = multi_positive_cross_entropy(s[2:3], pos[2:3])
    torch.testing.assert_close(row_ce, -torch.log(p[2] + p[3]) + math.log(2))
    (gm,) = torch.autograd.grad(info_nce(s, pos), s)
    (ge,) = torch.autograd.grad(info_nce(s), s)
    assert gm[2, 3] <= 0 and gm[3, 2] <= 0
    assert ge[2, 3] > 0 and ge[3, 2] > 0
    # swapping the two duplicate columns (with their mask columns) leaves the loss unchanged
    perm = torch.tensor([0, 1, 3, 2])
    torch.testing.assert_close(info_nce(s[:, perm], pos[:, perm]), info_nce(s, pos))


def test_batch_permutation_invariance():
    di, dt, zi, zt, tau = make_batch(6)
    pos = torch.tensor(POS_MULTI, dtype=torch.bool)
    perm = torch.tensor([2, 0, 3, 1])
    for orient in ["correct", "official"]:
        fn = JointSelfDistillationLoss(teacher_orientation=orient, q_reg=0.1, d_reg=0.1)
        a, _ = fn(di, dt, zi, zt, tau, pos)
        b, _ = fn(di[perm], dt[perm], zi[perm], zt[perm], tau, pos[perm][:, perm])
        torch.testing.assert_close(a, b)


def test_rows_without_positive_are_ignored():
    s = torch.randn(3, 4, dtype=DT)
    pos = torch.tensor([[1, 0, 0, 0], [0, 0, 0, 0], [0, 0, 1, 1]], dtype=torch.bool)
    got = multi_positive_cross_entropy(s, pos)
    expect = 0.5 * (-torch.log_softmax(s[0], 0)[0]
                    - 0.5 * (torch.log_softmax(s[2], 0)[2] + torch.log_softmax(s[2], 0)[3]))
    torch.testing.assert_close(got, expect)


def test_scores_are_float32_under_autocast():
    di, dt, zi, zt, tau = (x.detach().float() for x in make_batch())
    fn = JointSelfDistillationLoss(q_reg=1e-3, d_reg=1e-3)
    ref, _ = fn(di, dt, zi * 300, zt * 300, tau)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, _ = fn(di, dt, zi * 300, zt * 300, tau)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, ref)


# --------------------------------------------------------------------------------------------
# Distributed form: local rows against gathered columns
# --------------------------------------------------------------------------------------------


def _ranks(b, n_ranks):
    per = b // n_ranks
    return [(r * per, (r + 1) * per) for r in range(n_ranks)]


def _simulated_ranks(call, leaves, n_ranks, with_sparse=True):
    """Mean over simulated ranks of ``call(rows..., columns)``: each rank sees its slice of the
    leaves as rows and the (concatenated) leaves as columns, like an all-gather with gradients."""
    from sdray.losses import Columns

    di, dt, zi, zt, tau = leaves
    total = 0.0
    for a, b in _ranks(di.shape[0], n_ranks):
        cols = Columns(di, dt, zi if with_sparse else None, zt if with_sparse else None, offset=a)
        total = total + call(di[a:b], dt[a:b], zi[a:b], zt[a:b], tau, cols)
    return total / n_ranks


DIST_CASES = [
    ("joint", {"detach_teacher": True, "teacher_orientation": "correct"}, "l1"),
    ("joint", {"detach_teacher": False, "teacher_orientation": "official"}, "flops"),
    ("d2s", {}, "l1"),
    ("d2s", {}, "flops"),
    ("dense", {}, None),
]


@pytest.mark.parametrize("method,opts,reg", DIST_CASES)
@pytest.mark.parametrize("n_ranks", [2, 4])
def test_rows_against_gathered_columns_equal_the_whole_batch(method, opts, reg, n_ranks):
    """The mean over ranks of the row-wise losses equals the loss of the whole batch, and so do
    the gradients, with the asymmetric multi-positive mask spread over the ranks."""
    di, dt, zi, zt, tau = make_batch(11)
    pos = torch.tensor(POS_ASYM, dtype=torch.bool)
    if method == "joint":
        fn = JointSelfDistillationLoss(w1=0.4, w2=0.6, q_reg=0.05, d_reg=0.02, regularizer=reg,
                                       total_steps=TOTAL, **opts)
        full = lambda *x: fn(*x[:5], pos, step=STEP)[0]  # noqa: E731
        rank = lambda *x: fn(*x[:5], pos, step=STEP, columns=x[5])[0]  # noqa: E731
    elif method == "d2s":
        fn = D2SLoss(q_reg=0.05, d_reg=0.02, regularizer=reg, total_steps=TOTAL)
        full = lambda *x: fn(*x[:5], step=STEP)[0]  # noqa: E731
        rank = lambda *x: fn(*x[:5], step=STEP, columns=x[5])[0]  # noqa: E731
    else:
        fn = DenseContrastiveLoss()
        full = lambda di, dt, zi, zt, tau: fn(di, dt, tau, pos)[0]  # noqa: E731
        rank = lambda di, dt, zi, zt, tau, c: fn(di, dt, tau, pos, columns=c)[0]  # noqa: E731
    leaves = [di, dt, zi, zt, tau]
    ref = full(*leaves)
    got = _simulated_ranks(rank, leaves, n_ranks, with_sparse=method != "dense")
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)
    g_ref = torch.autograd.grad(ref, leaves, allow_unused=True)
    g_got = torch.autograd.grad(got, leaves, allow_unused=True)
    for name, a, b in zip(["img_dense", "txt_dense", "img_sparse", "txt_sparse", "tau"], g_got, g_ref):
        assert (a is None) == (b is None), name
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12, msg=name)


def test_rows_of_one_rank_use_both_directions_of_the_global_mask():
    """Rank 1 of two (samples 2, 3 of the asymmetric batch) against the naive reference: its i2t
    rows are rows 2, 3 of the global scores with mask rows 2, 3; its t2i rows are columns 2, 3
    with mask *columns* 2, 3."""
    from sdray.losses import Columns

    di, dt, _, _, tau = make_batch(12)
    pos = torch.tensor(POS_ASYM, dtype=torch.bool)
    got, _ = DenseContrastiveLoss()(di[2:], dt[2:], tau, pos, columns=Columns(di, dt, offset=2))
    sd = ref_matrix(di, dt, tau)
    i2t = ref_ce_rows(sd[2:], POS_ASYM[2:])
    t2i = ref_ce_rows(ref_transpose(sd)[2:], ref_transpose(POS_ASYM)[2:])
    torch.testing.assert_close(got, 0.5 * (i2t + t2i), rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="gathered"):
        DenseContrastiveLoss()(di[2:], dt[2:], tau, pos[2:], columns=Columns(di, dt, offset=2))


# --------------------------------------------------------------------------------------------
# D2S
# --------------------------------------------------------------------------------------------


def ref_d2s(di, dt, zi, zt, tau, mask, q, d, step, total):
    if mask is not None:
        zt = torch.stack([torch.stack([zt[j, v] * mask[j][v] for v in range(zt.shape[1])])
                          for j in range(zt.shape[0])])
    teacher = ref_matrix(di.detach(), dt.detach(), tau.detach())
    ss = ref_matrix(zi, zt)
    distill = ref_kd(teacher, ss, detach=True, orientation="correct")
    reg = 0.5 * (ref_warm(q, step, total, 0.2) * ref_l1(zt)
                 + ref_warm(d, step, total, 0.2) * ref_l1(zi))
    return distill + reg


@pytest.mark.parametrize("use_mask", [False, True])
def test_d2s_matches_reference_and_teacher_gets_no_gradient(use_mask):
    di, dt, zi, zt, tau = make_batch(7)
    mask = MASK if use_mask else None
    fn = D2SLoss(q_reg=0.05, d_reg=0.02, total_steps=TOTAL)
    txt_mask = torch.tensor(MASK, dtype=DT) if use_mask else None
    loss, logs = fn(di, dt, zi, zt, tau, txt_mask=txt_mask, step=STEP)
    ref = ref_d2s(di, dt, zi, zt, tau, mask, 0.05, 0.02, STEP, TOTAL)
    torch.testing.assert_close(loss, ref, rtol=1e-10, atol=1e-12)
    loss.backward()
    assert di.grad is None and dt.grad is None and tau.grad is None
    zi_ref = zi.detach().clone().requires_grad_()
    zt_ref = zt.detach().clone().requires_grad_()
    g_ref = grads(ref_d2s(di, dt, zi_ref, zt_ref, tau, mask, 0.05, 0.02, STEP, TOTAL),
                  [zi_ref, zt_ref])
    torch.testing.assert_close(zi.grad, g_ref[0], rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(zt.grad, g_ref[1], rtol=1e-9, atol=1e-12)
    if use_mask:
        zero = torch.tensor(MASK) == 0
        assert torch.all(zt.grad[zero] == 0)
        assert torch.all(zi.grad != 0)  # images always expand
    assert logs["loss"] == pytest.approx(logs["distill"] + logs["reg"])
    assert logs["distill"] == pytest.approx(0.5 * (logs["distill_i2t"] + logs["distill_t2i"]))


def test_d2s_defaults_and_build_loss():
    fn = D2SLoss()
    assert fn.text_reg.weight == 1e-3 and fn.image_reg.weight == 1e-3
    assert isinstance(fn.text_reg, L1Regularizer)

    class Cfg:
        method, w1, w2, lambda1, lambda2, q_reg, d_reg = "joint", 0.2, 0.5, 0.9, 0.3, 1e-5, 3e-5
        regularizer, reg_warmup_fraction, detach_teacher = "flops", 0.2, False
        teacher_orientation, d2s_l1, d2s_regularizer = "official", 2e-3, "l1"

    j = build_loss(Cfg, total_steps=50)
    assert isinstance(j, JointSelfDistillationLoss) and isinstance(j.text_reg, FlopsRegularizer)
    assert (j.w1, j.w2, j.detach_teacher, j.teacher_orientation) == (0.2, 0.5, False, "official")
    Cfg.method = "d2s"
    d = build_loss(Cfg, total_steps=50)
    assert isinstance(d, D2SLoss) and d.text_reg.weight == 2e-3
    assert isinstance(d.text_reg, L1Regularizer) and isinstance(d.image_reg, L1Regularizer)
    Cfg.d2s_regularizer = "flops"
    assert isinstance(build_loss(Cfg, total_steps=50).image_reg, FlopsRegularizer)
    Cfg.method = "dense"
    assert isinstance(build_loss(Cfg), DenseContrastiveLoss)


# --------------------------------------------------------------------------------------------
# Expansion control
# --------------------------------------------------------------------------------------------


def test_expansion_probability_schedule():
    ec = ExpansionControl(vocab_size=10, total_steps=1000)
    assert ec.probability(0) == pytest.approx(1.0)
    assert ec.probability(475) == pytest.approx(0.5)
    assert ec.probability(950) == pytest.approx(0.0)
    assert ec.probability(1000) == pytest.approx(0.0)
    assert ec.probability(237.5) == pytest.approx(0.75)
    ec2 = ExpansionControl(vocab_size=10, total_steps=1000, p0=0.6, end_fraction=0.5)
    assert ec2.probability(250) == pytest.approx(0.3)


def test_expansion_mask_restricts_caption_support_to_its_tokens():
    vocab = 12
    # 5 = [CLS]-like, 6 = [SEP]-like, 0 = padding; caption 0 has words {3, 7}, caption 1 none
    input_ids = torch.tensor([[5, 3, 7, 3, 6, 0], [5, 6, 0, 0, 0, 0]])
    attn = torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 0, 0, 0, 0]])
    sup = token_support_mask(input_ids, vocab, attn)
    assert sup[0].nonzero().flatten().tolist() == [3, 5, 6, 7]  # padding id 0 not counted
    assert sup[1].nonzero().flatten().tolist() == [5, 6]
    sup_x = token_support_mask(input_ids, vocab, attn, exclude_token_ids=[6])
    assert sup_x[0].nonzero().flatten().tolist() == [3, 5, 7]

    ec = ExpansionControl(vocab_size=vocab, total_steps=100, exclude_token_ids=[6])
    m = ec(input_ids, step=0, attention_mask=attn)  # p = 1: every caption masked
    z = torch.rand(2, vocab) + 0.1
    masked = z * m
    assert masked[0].nonzero().flatten().tolist() == [3, 5, 7]
    assert masked[1].nonzero().flatten().tolist() == [5]  # [CLS]-like id kept, [SEP] excluded
    assert torch.equal(masked[0, [3, 5, 7]], z[0, [3, 5, 7]])  # kept values untouched
    assert torch.equal(ec(input_ids, step=99, attention_mask=attn), torch.ones(2, vocab))
    ec.eval()  # p = 0 at evaluation
    assert torch.equal(ec(input_ids, step=0, attention_mask=attn), torch.ones(2, vocab))


def test_expansion_draws_per_caption_and_per_batch():
    n = 4000
    ids = torch.randint(0, 50, (n, 4), generator=torch.Generator().manual_seed(0))
    ec = ExpansionControl(vocab_size=50, total_steps=1000)
    m = ec(ids, step=475, generator=torch.Generator().manual_seed(1))  # p = 0.5
    masked_rows = (m.sum(1) < 50).float().mean().item()
    assert abs(masked_rows - 0.5) < 0.04
    ecb = ExpansionControl(vocab_size=50, total_steps=1000, granularity="batch")
    outcomes = set()
    for seed in range(20):
        mb = ecb(ids[:8], step=475, generator=torch.Generator().manual_seed(seed))
        rows = (mb.sum(1) < 50)
        assert bool(rows.all()) or not bool(rows.any())  # all-or-nothing per batch
        outcomes.add(bool(rows.all()))
    assert outcomes == {True, False}


# --------------------------------------------------------------------------------------------
# Regularisers
# --------------------------------------------------------------------------------------------


def test_quadratic_warmup_values():
    w = 1e-3
    assert quadratic_warmup(w, 0, 100, 0.2) == 0.0
    assert quadratic_warmup(w, 5, 100, 0.2) == pytest.approx(w / 16)
    assert quadratic_warmup(w, 10, 100, 0.2) == pytest.approx(w / 4)
    assert quadratic_warmup(w, 20, 100, 0.2) == pytest.approx(w)
    assert quadratic_warmup(w, 70, 100, 0.2) == pytest.approx(w)
    assert quadratic_warmup(w, None, None) == w
    assert quadratic_warmup(w, None, 100, 0.0) == w
    with pytest.raises(ValueError):
        quadratic_warmup(w, None, 100, 0.2)
    reg = L1Regularizer(2.0, total_steps=1000, warmup_fraction=0.1)
    assert [reg.weight_at(s) for s in (0, 25, 50, 100, 500)] == pytest.approx(
        [0.0, 0.125, 0.5, 2.0, 2.0])


def test_l1_and_flops_on_a_hand_computed_example():
    z = torch.tensor([[1.0, -2.0, 0.0], [3.0, 0.0, 4.0]], dtype=DT)
    # L1: mean(|1|+|-2|, |3|+|4|) = mean(3, 7) = 5
    assert L1Regularizer(1.0)(z).item() == pytest.approx(5.0)
    # FLOPs: column means of |z| = (2, 1, 2) → 4 + 1 + 4 = 9
    assert FlopsRegularizer(1.0)(z).item() == pytest.approx(9.0)
    assert FlopsRegularizer(0.5, total_steps=10)(z, step=1).item() == pytest.approx(
        9.0 * 0.5 * 0.25)
    torch.testing.assert_close(L1Regularizer(1.0)(z), ref_l1(z))
    torch.testing.assert_close(FlopsRegularizer(1.0)(z), ref_flops(z))


def test_regularizer_gradients():
    g = torch.Generator().manual_seed(3)
    z = (torch.randn(5, 7, generator=g, dtype=DT)).requires_grad_()
    w = 0.3
    (gl,) = torch.autograd.grad(L1Regularizer(w)(z), z)
    torch.testing.assert_close(gl, w * torch.sign(z.detach()) / 5)
    (gf,) = torch.autograd.grad(FlopsRegularizer(w)(z), z)
    col = z.detach().abs().mean(0, keepdim=True)
    torch.testing.assert_close(gf, w * 2 * col * torch.sign(z.detach()) / 5)
    # during warm-up the gradient scales by (t/T)²
    (gw,) = torch.autograd.grad(L1Regularizer(w, total_steps=100)(z, step=10), z)
    torch.testing.assert_close(gw, 0.25 * gl)


def test_regularizer_validation():
    with pytest.raises(ValueError):
        L1Regularizer(-1.0)
    with pytest.raises(ValueError):
        L1Regularizer(1.0, total_steps=10, warmup_fraction=1.5)
    with pytest.raises(ValueError):
        L1Regularizer(1.0)(torch.ones(3))
    with pytest.raises(ValueError):
        JointSelfDistillationLoss(regularizer="l2")
