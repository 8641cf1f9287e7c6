"""Endless, resumable training batches.

Each epoch is a fresh permutation (and flip mask) seeded by (seed, epoch), so the data position
(epoch, cursor) is the whole state of the stream: saving it in a checkpoint and loading it back
gives exactly the batches an uninterrupted run would have seen. With several processes, each one
takes its own slice of every global batch.
"""

from __future__ import annotations

import itertools

import torch


class BatchStream:
    def __init__(self, dataset, batch_size: int, *, seed: int, flip: bool = False,
                 rank: int = 0, world_size: int = 1):
        self.dataset = dataset
        self.batch_size = batch_size
        self.seed = seed
        self.flip = flip
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self.cursor = 0
        self._order: tuple[int, torch.Tensor, torch.Tensor] | None = None
        self._planned = False  # whether the dataset knows the batches to come (datasets read from disk)

    # -- position -------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "cursor": self.cursor}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])
        self._planned = False

    @property
    def epochs_done(self) -> float:
        return self.epoch + self.cursor / len(self.dataset)

    # -- batches --------------------------------------------------------------------------------
    def _epoch_order(self, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self._order is None or self._order[0] != epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            n = len(self.dataset)
            self._order = (epoch, torch.randperm(n, generator=g), torch.rand(n, generator=g) < 0.5)
        return self._order[1], self._order[2]

    def next_indices(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This process's indices and flips for the next batch; advances the position."""
        need = self.batch_size * self.world_size
        parts, flips = [], []
        while need:
            order, flip = self._epoch_order(self.epoch)
            take = min(need, len(order) - self.cursor)
            parts.append(order[self.cursor:self.cursor + take])
            flips.append(flip[self.cursor:self.cursor + take])
            self.cursor += take
            need -= take
            if self.cursor == len(order):
                self.epoch, self.cursor = self.epoch + 1, 0
        mine = slice(self.rank * self.batch_size, (self.rank + 1) * self.batch_size)
        return torch.cat(parts)[mine], torch.cat(flips)[mine]

    def __iter__(self):
        return self

    def close(self) -> None:
        """Stop reading ahead (a dataset read from disk has worker processes doing it)."""
        self.dataset.close()
        self._planned = False

    def upcoming(self):
        """The index batches this stream will yield from here on (without moving it), for read-ahead."""
        # Only the dataset's length decides the order; holding the dataset itself would make a cycle
        # (dataset -> plan -> dataset) that leaves its reading processes to the garbage collector.
        ahead = BatchStream(range(len(self.dataset)), self.batch_size, seed=self.seed, rank=self.rank,
                            world_size=self.world_size)
        ahead.load_state_dict(self.state_dict())  # now, not when the generator first runs
        return (ahead.next_indices()[0] for _ in itertools.count())

    def __next__(self) -> dict[str, torch.Tensor]:
        if not self._planned:
            self.dataset.read_ahead(self.upcoming())
            self._planned = True
        indices, flips = self.next_indices()
        return self.dataset.batch(indices, flips if self.flip else None)
