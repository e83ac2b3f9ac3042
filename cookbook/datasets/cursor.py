"""The resumable data cursor: which raw rows each optimizer step trains on, across epochs and resumed runs."""

from __future__ import annotations

import random
from typing import Iterator, NamedTuple, Optional, Sequence

from cookbook.errors import DataError


class Batch(NamedTuple):
    indices: list[int]  # raw row indices (usable rows only when the cursor knows validity)
    epoch: int


class DataCursor:
    """Position in a dataset across epochs, resumable exactly.

    `position` counts raw rows consumed since the start of training (skipped rows included), across epochs and
    across resumed runs. Epoch e visits rows in the order `random.Random(seed + e).shuffle(range(N))` (identity
    without shuffle). `next_batch(n)` returns up to n usable row indices from the current epoch (a batch never spans
    two epochs; the last one of an epoch may be shorter), stepping over unusable rows, and an empty batch once all
    epochs are done. The state is a small JSON dict; a cursor restored from it continues with exactly the rows an
    uninterrupted run would have produced.
    """

    def __init__(self, num_rows: int, epochs: int = 1, shuffle: bool = True, seed: int = 0,
                 valid: Optional[Sequence[bool]] = None):
        if num_rows < 1:
            raise ValueError("DataCursor needs at least one row")
        if valid is not None and len(valid) != num_rows:
            raise ValueError(f"valid has {len(valid)} entries for {num_rows} rows")
        self.num_rows, self.epochs, self.shuffle, self.seed = num_rows, epochs, shuffle, seed
        self.valid = list(valid) if valid is not None else None
        self.position = 0
        self._order_epoch: Optional[int] = None
        self._order: list[int] = []

    @property
    def total(self) -> int:
        return self.num_rows * self.epochs

    @property
    def epoch(self) -> int:
        return min(self.position // self.num_rows, self.epochs)

    @property
    def exhausted(self) -> bool:
        return self.position >= self.total or (self.valid is not None and not any(self.valid))

    def order(self, epoch: int) -> list[int]:
        if self._order_epoch != epoch:
            order = list(range(self.num_rows))
            if self.shuffle:
                random.Random(self.seed + epoch).shuffle(order)
            self._order_epoch, self._order = epoch, order
        return self._order

    def next_batch(self, n: int) -> Batch:
        if n < 1:
            raise ValueError("batch size must be >= 1")
        while not self.exhausted:
            epoch = self.position // self.num_rows
            order = self.order(epoch)
            end_of_epoch = (epoch + 1) * self.num_rows
            picked: list[int] = []
            while self.position < end_of_epoch and len(picked) < n:
                idx = order[self.position % self.num_rows]
                self.position += 1
                if self.valid is None or self.valid[idx]:
                    picked.append(idx)
            if picked:
                return Batch(picked, epoch)
        return Batch([], self.epoch)

    def __iter__(self) -> Iterator[int]:
        while True:
            batch = self.next_batch(1)
            if not batch.indices:
                return
            yield batch.indices[0]

    def count_batches(self, n: int) -> int:
        """How many more batches `next_batch(n)` will return from the current position (does not move it)."""
        probe = DataCursor(self.num_rows, self.epochs, self.shuffle, self.seed, self.valid)
        probe.position = self.position
        count = 0
        while probe.next_batch(n).indices:
            count += 1
        return count

    def state_dict(self) -> dict:
        return {"position": self.position, "num_rows": self.num_rows, "epochs": self.epochs,
                "shuffle": self.shuffle, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        """Restore a position. The dataset size, shuffle and seed must match the run that saved it."""
        for key in ("num_rows", "shuffle", "seed"):
            if key in state and state[key] != getattr(self, key):
                raise DataError(f"Cannot resume the data position: the checkpoint was written with {key}="
                                f"{state[key]!r} but this run has {key}={getattr(self, key)!r}. Fix: resume with the "
                                "same dataset, recipe.shuffle and seed, or start a fresh run (another log_path).")
        position = int(state["position"])
        if not 0 <= position <= self.total:
            raise DataError(f"Cannot resume the data position {position}: it is outside 0..{self.total} "
                            f"({self.num_rows} rows x {self.epochs} epochs). Fix: resume with the same dataset and "
                            "recipe.epochs, or start a fresh run.")
        self.position = position
