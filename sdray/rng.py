"""Seeded draws from torch's global RNG that stay reproducible when threads build models at once.

``nn.Linear`` and the other module initialisers draw only from torch's global CPU generator, so a
seeded construction forks that generator and seeds it. Forking is not enough when two threads of
one process build models side by side (``sdray demo`` trains d2s and joint so): one thread's
``manual_seed`` would land between the other's draws and change its initial weights.
:func:`seeded` holds a process-wide lock for the whole construction.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch

_GLOBAL_RNG = threading.RLock()


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Inside: torch's global CPU RNG seeded with ``seed`` and no other thread drawing under
    ``seeded``; after: the generator is as it was before."""
    with _GLOBAL_RNG, torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield
