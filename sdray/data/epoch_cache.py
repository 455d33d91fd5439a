"""A training worker's first epoch of feature rows, kept in memory and replayed reshuffled.

Ray Data executes a dataset anew for every epoch: on the demo's 4,000 feature rows (21 MB of
Parquet) each re-execution cost ~8 s on 2 cores before the first batch arrived, while the epoch's
15 training steps took ~13 s (measured with ``sdray train --method d2s``). Precomputed features
are small next to the images they came from, so a worker that sees them once can keep them and
draw later epochs from memory. Epoch ``e`` then visits the same rows in the order of a
permutation seeded by ``seed + e``, so a run stays reproducible.

A split small enough (``data.direct_read_max_bytes``) skips Ray Data altogether: each worker
reads the files itself and :meth:`EpochCache.fill` s the cache with its share of the rows
(:func:`worker_share`), so even the first epoch is replayed from memory.

Only whole batches are kept (what the first epoch trained on); rows a ``drop_last`` split left
out of the first epoch stay out of later ones too, at most one batch's worth per worker.
"""

from __future__ import annotations

from typing import Iterable, Iterator

import numpy as np

Batch = dict[str, np.ndarray]


def batch_nbytes(batch: Batch) -> int:
    """Approximate memory held by a numpy batch; object columns count their elements."""
    total = 0
    for column in batch.values():
        total += column.nbytes
        if column.dtype == object:
            total += sum(x.nbytes if isinstance(x, np.ndarray) else len(str(x)) for x in column)
    return total


class EpochCache:
    """Records the batches of one complete epoch, then replays them in seeded random order.

    Args:
        max_bytes: memory budget for the kept rows; a first epoch larger than this is not kept
            (every epoch then streams from the dataset), and 0 turns the cache off.
    """

    def __init__(self, max_bytes: int):
        self.max_bytes = int(max_bytes)
        self._parts: list[Batch] = []
        self._rows: Batch | None = None
        self.nbytes = 0

    @property
    def enabled(self) -> bool:
        return self.max_bytes > 0

    @property
    def ready(self) -> bool:
        """True once an epoch was sealed: :meth:`batches` can replace the dataset."""
        return self._rows is not None

    @property
    def num_rows(self) -> int:
        return 0 if self._rows is None else len(next(iter(self._rows.values())))

    def record(self, batches: Iterable[Batch]) -> Iterator[Batch]:
        """Yield ``batches`` unchanged, keeping each while the total fits the budget."""
        self._parts, self.nbytes = [], 0
        for batch in batches:
            if self.enabled:
                self.nbytes += batch_nbytes(batch)
                if self.nbytes > self.max_bytes:
                    self.max_bytes, self._parts = 0, []  # too large: stream every epoch
                else:
                    self._parts.append(batch)
            yield batch

    def seal(self, num_batches: int) -> bool:
        """Keep the first ``num_batches`` recorded batches as the replayed rows, if there are
        that many (an epoch cut short, e.g. resumed mid-way, is not kept). Returns :attr:`ready`."""
        parts, self._parts = self._parts[:num_batches], []
        if self.enabled and parts and len(parts) == num_batches:
            self._rows = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        return self.ready

    def fill(self, rows: Batch) -> None:
        """Replay ``rows`` (equal-length columns) from now on, without recording an epoch."""
        self._rows = {k: v if isinstance(v, np.ndarray) else _object_array(v) for k, v in rows.items()}
        self.nbytes = batch_nbytes(self._rows)

    def batches(self, batch_size: int, seed: int) -> Iterator[Batch]:
        """Whole batches of ``batch_size`` rows in the order of a permutation seeded by ``seed``."""
        if self._rows is None:
            raise RuntimeError("EpochCache.batches before an epoch was sealed")
        order = np.random.default_rng(seed).permutation(self.num_rows)
        for start in range(0, self.num_rows - batch_size + 1, batch_size):
            rows = order[start:start + batch_size]
            yield {k: v[rows] for k, v in self._rows.items()}


def _object_array(values: list) -> np.ndarray:
    out = np.empty(len(values), dtype=object)
    out[:] = values
    return out


def worker_share(num_rows: int, rank: int, world: int, seed: int, keep: int) -> np.ndarray:
    """Row indices ``(keep,)`` of worker ``rank`` of ``world``: every ``world``-th row of a
    permutation seeded by ``seed``, so the workers' shares are disjoint and equal in size."""
    mine = np.random.default_rng(seed).permutation(num_rows)[rank::world]
    if len(mine) < keep:
        raise ValueError(f"worker {rank} of {world} has {len(mine)} rows, fewer than {keep}")
    return mine[:keep]
