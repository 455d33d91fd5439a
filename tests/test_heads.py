"""RetrieverHeads, SparseHead and the sparse-vector exports."""

import numpy as np
import pytest
import torch

from sdray.heads import RetrieverHeads, SparseHead, prune_topk, sparse_to_csr, top_terms


def _heads(vocab=50, hidden=12, text_dim=10, image_dim=14, proj=8, topk=(None, None)):
    torch.manual_seed(0)
    emb = torch.randn(vocab, hidden)
    return RetrieverHeads(torch.nn.Linear(text_dim, proj), torch.nn.Linear(image_dim, proj), emb, topk=topk), emb


def test_sparse_head_formula_and_vocab_init():
    torch.manual_seed(0)
    emb = torch.randn(30, 6)
    head = SparseHead(4, emb)
    assert torch.equal(head.vocab_projector.weight, emb)
    emb.add_(1.0)  # a copy, not a view
    assert not torch.equal(head.vocab_projector.weight, emb)
    d = torch.nn.functional.normalize(torch.randn(5, 4), dim=-1)
    h = torch.nn.functional.layer_norm(d @ head.transform.weight.T + head.transform.bias, (6,),
                                       head.norm.weight, head.norm.bias, head.norm.eps)
    expected = torch.log1p(torch.clamp(h @ head.vocab_projector.weight.T, min=0))
    assert torch.allclose(head(d), expected, atol=1e-6)
    assert (head(d) >= 0).all()


def test_heads_encode_both_modalities_into_one_space():
    heads, _ = _heads()
    t = heads.encode_text(torch.randn(3, 10))
    i = heads.encode_image(torch.randn(4, 14))
    assert t.dense.shape == (3, 8) and i.dense.shape == (4, 8)
    assert t.sparse.shape == (3, 50) and i.sparse.shape == (4, 50)
    assert torch.allclose(t.dense.norm(dim=-1), torch.ones(3), atol=1e-5)


def test_topk_pruning_only_at_encode_time():
    heads, _ = _heads(topk=(3, 5))
    x = torch.randn(6, 10)
    heads.train()
    assert (heads.encode_text(x).sparse > 0).sum(-1).max() > 3
    heads.eval()
    pruned = heads.encode_text(x).sparse
    assert ((pruned > 0).sum(-1) <= 3).all()
    heads.train()
    full = heads.encode_text(x).sparse
    top = full.topk(3, dim=-1)
    assert torch.allclose(pruned.gather(-1, top.indices), top.values)


def test_prune_topk_keeps_the_largest():
    x = torch.tensor([[0.0, 3.0, 1.0, 2.0]])
    assert torch.equal(prune_topk(x, 2), torch.tensor([[0.0, 3.0, 0.0, 2.0]]))
    assert prune_topk(x, None) is x


def test_tau_clamp():
    heads, _ = _heads()
    with torch.no_grad():
        heads.tau.fill_(1e-6)
    heads.clamp_tau_()
    assert float(heads.tau.detach()) == pytest.approx(0.001)


def test_csr_export_matches_the_dense_matrix():
    rng = np.random.default_rng(0)
    m = rng.random((7, 20)) * (rng.random((7, 20)) < 0.2)
    m[3] = 0  # an empty row
    indptr, indices, values = sparse_to_csr(torch.from_numpy(m).float())
    rebuilt = np.zeros_like(m)
    for r in range(7):
        sl = slice(indptr[r], indptr[r + 1])
        assert np.all(np.diff(indices[sl]) > 0)
        rebuilt[r, indices[sl]] = values[sl]
    assert np.allclose(rebuilt, m.astype(np.float32))
    assert indptr.dtype == np.int64 and indices.dtype == np.int32 and values.dtype == np.float32


def test_top_terms_are_readable_word_pieces_by_weight():
    vocab = [f"w{i}" for i in range(6)]
    w = torch.tensor([0.0, 0.5, 0.0, 2.0, 1.0, 0.0])
    assert top_terms(w, vocab, k=2) == [(3, "w3", 2.0), (4, "w4", 1.0)]
    assert len(top_terms(w, vocab, k=10)) == 3
