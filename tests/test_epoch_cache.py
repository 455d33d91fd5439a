"""The in-memory replay of a worker's first epoch (sdray/data/epoch_cache.py)."""

import numpy as np
import pytest

from sdray.data.epoch_cache import EpochCache, batch_nbytes, worker_share


def _stream(n_batches: int, batch_size: int = 4, dim: int = 3):
    for b in range(n_batches):
        ids = np.arange(b * batch_size, (b + 1) * batch_size)
        yield {"image_id": np.array([f"img{i}" for i in ids], dtype=object),
               "input_ids": np.array([np.arange(i % 5 + 1) for i in ids] + [None], dtype=object)[:-1],
               "text_features": np.stack([np.full(dim, i, np.float32) for i in ids])}


def _recorded(cache: EpochCache, n_batches: int, seal: int | None = None) -> list[dict]:
    seen = list(cache.record(_stream(n_batches)))
    cache.seal(n_batches if seal is None else seal)
    return seen


def test_record_passes_batches_through_unchanged():
    cache = EpochCache(1 << 20)
    seen = _recorded(cache, 3)
    assert [list(b["image_id"]) for b in seen] == [list(b["image_id"]) for b in _stream(3)]
    assert cache.ready and cache.num_rows == 12


def test_replay_visits_every_row_once_with_rows_kept_together():
    cache = EpochCache(1 << 20)
    _recorded(cache, 5)
    replay = list(cache.batches(4, seed=7))
    assert len(replay) == 5
    ids = [x for b in replay for x in b["image_id"]]
    assert sorted(ids) == sorted(f"img{i}" for i in range(20))
    for b in replay:  # every column of a row moves together
        for image_id, feats, toks in zip(b["image_id"], b["text_features"], b["input_ids"]):
            i = int(image_id[3:])
            assert feats.tolist() == [float(i)] * 3
            assert toks.tolist() == list(range(i % 5 + 1))


def test_replay_order_is_seeded():
    cache = EpochCache(1 << 20)
    _recorded(cache, 5)
    order = lambda seed: [x for b in cache.batches(4, seed) for x in b["image_id"]]  # noqa: E731
    assert order(3) == order(3)
    assert order(3) != order(4)
    assert order(3) != [f"img{i}" for i in range(20)]


def test_replay_drops_the_last_partial_batch():
    cache = EpochCache(1 << 20)
    _recorded(cache, 5)
    assert [len(b["image_id"]) for b in cache.batches(6, seed=0)] == [6, 6, 6]


def test_an_epoch_over_the_budget_is_not_kept():
    one_batch = batch_nbytes(next(_stream(1)))
    cache = EpochCache(int(one_batch * 2.5))
    seen = _recorded(cache, 5)
    assert len(seen) == 5  # the training still got every batch
    assert not cache.ready and not cache.enabled
    assert not cache.seal(5)


def test_an_epoch_cut_short_is_not_kept():
    cache = EpochCache(1 << 20)
    _recorded(cache, 3, seal=4)
    assert not cache.ready


def test_seal_keeps_only_the_batches_trained_on():
    cache = EpochCache(1 << 20)
    _recorded(cache, 5, seal=4)
    assert cache.num_rows == 16


def test_disabled_cache_records_nothing():
    cache = EpochCache(0)
    assert len(_recorded(cache, 2)) == 2
    assert not cache.ready
    with pytest.raises(RuntimeError):
        next(cache.batches(4, seed=0))


def test_worker_shares_are_disjoint_equal_and_seeded():
    shares = [worker_share(103, rank, 3, seed=9, keep=32) for rank in range(3)]
    assert all(len(s) == 32 for s in shares)
    assert len(set(np.concatenate(shares))) == 96 and max(map(max, shares)) < 103
    assert np.array_equal(worker_share(103, 1, 3, seed=9, keep=32), shares[1])
    assert not np.array_equal(worker_share(103, 1, 3, seed=10, keep=32), shares[1])
    with pytest.raises(ValueError, match="fewer than"):
        worker_share(10, 0, 3, seed=0, keep=5)


def test_filled_cache_replays_the_given_rows_with_lists_as_object_columns():
    cache = EpochCache(1 << 20)
    cache.fill({"caption": [f"c{i}" for i in range(12)], "input_ids": [np.arange(i + 1) for i in range(12)],
                "text_features": np.arange(24, dtype=np.float32).reshape(12, 2)})
    assert cache.ready and cache.num_rows == 12 and cache.nbytes > 0
    batches = list(cache.batches(5, seed=1))
    assert len(batches) == 2     # whole batches only
    for b in batches:
        for cap, ids, feat in zip(b["caption"], b["input_ids"], b["text_features"]):
            i = int(cap[1:])
            assert len(ids) == i + 1 and feat.tolist() == [2 * i, 2 * i + 1]
