"""``sdray.rng.seeded``: a seeded construction is not disturbed by another thread seeding."""

from __future__ import annotations

import threading
import time

import torch

from sdray.rng import seeded


def _reference(seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(6, generator=g)


def _run_together(*targets) -> None:
    threads = [threading.Thread(target=t) for t in targets]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)


def test_a_thread_seeding_meanwhile_does_not_change_the_draws():
    first_drew, second_inside = threading.Event(), threading.Event()
    got: dict[str, torch.Tensor] = {}

    def first():
        with seeded(0):
            a = torch.rand(3)
            first_drew.set()
            second_inside.wait(0.5)   # without the lock the other thread is seeded inside by now
            got["first"] = torch.cat([a, torch.rand(3)])

    def second():
        first_drew.wait(5)
        with seeded(1):
            second_inside.set()
            time.sleep(0.3)
            got["second"] = torch.rand(6)

    _run_together(first, second)
    assert torch.equal(got["first"], _reference(0))
    assert torch.equal(got["second"], _reference(1))


def test_the_global_generator_is_left_as_it_was():
    torch.manual_seed(123)
    expected = torch.rand(4)
    torch.manual_seed(123)
    with seeded(7):
        torch.rand(10)
    assert torch.equal(torch.rand(4), expected)


def test_loading_saved_heads_meanwhile_does_not_change_the_draws():
    """``sdray.model._heads_like`` builds modules (initial draws from the global RNG) before it
    loads a saved state; a thread doing so must not shift another thread's seeded draws."""
    from sdray.config import SdrayConfig
    from sdray.heads import RetrieverHeads
    from sdray.model import _heads_like

    state = RetrieverHeads(torch.nn.Linear(8, 4), torch.nn.Linear(6, 4), torch.randn(50, 16)).state_dict()
    first_drew, loaded = threading.Event(), threading.Event()
    got: dict[str, torch.Tensor] = {}

    def first():
        with seeded(0):
            a = torch.rand(3)
            first_drew.set()
            loaded.wait(0.5)   # without the lock the other thread has drawn by now
            got["first"] = torch.cat([a, torch.rand(3)])

    def second():
        first_drew.wait(5)
        heads = _heads_like(SdrayConfig(), state)
        got["loaded"] = heads.sparse.transform.weight.detach().clone()
        loaded.set()

    _run_together(first, second)
    assert torch.equal(got["first"], _reference(0))
    assert torch.equal(got["loaded"], state["sparse.transform.weight"])
