"""Weighted, distributed, per-epoch deterministic sampling.

Each epoch draws one global order of sample indices from a generator seeded by
(seed, epoch) only, so every rank computes the same order without communicating and
a resumed run replays it. Rank r takes positions r, r + R, r + 2R, ... of that order:
the ranks' shares are disjoint in position and together make the global draw.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import Sampler

from vla_ds.errors import ConfigError


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """A torch generator whose state depends only on (seed, epoch)."""
    entropy = [int(seed) & 0xFFFF_FFFF_FFFF_FFFF, int(epoch) & 0xFFFF_FFFF_FFFF_FFFF]
    mixed = int(np.random.SeedSequence(entropy).generate_state(1, dtype=np.uint64)[0])
    g = torch.Generator()
    g.manual_seed(mixed)
    return g


class DistributedWeightedSampler(Sampler[int]):
    """Sample indices for one rank of a (possibly weighted) distributed epoch.

    Args:
        num_samples: dataset length N; an epoch's global draw has N indices.
        num_replicas: number of ranks R.
        rank: this rank, in [0, R).
        seed: base seed; the epoch's order depends only on (seed, epoch).
        weights: (N,) non-negative sampling weights (e.g. ``VLADataset.sample_weights`` when
            the dataset has a mixture): indices are drawn with replacement, proportionally.
            None: a permutation, every index once per epoch (use it when
            ``VLADataset.source_weights`` is None, i.e. without mixture.yaml).
        shuffle: without weights, False gives 0..N-1 in order.
        drop_last: True truncates the global order to a multiple of R; False pads it by
            wrapping around to its start, so every rank gets ceil(N / R) indices.
    """

    def __init__(self, num_samples: int, num_replicas: int = 1, rank: int = 0, seed: int = 0,
                 weights: np.ndarray | None = None, shuffle: bool = True, drop_last: bool = True):
        if num_samples < 1:
            raise ConfigError(f"sampler: num_samples must be >= 1, got {num_samples}")
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ConfigError(f"sampler: rank {rank} is not in [0, num_replicas={num_replicas})")
        if drop_last and num_samples < num_replicas:
            raise ConfigError(f"sampler: {num_samples} samples cannot be shared by {num_replicas} ranks "
                              f"with drop_last=True (every rank would get none)")
        self.num_samples = num_samples
        self.num_replicas = num_replicas
        self.rank = rank
        self.seed = seed
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.weights = None
        if weights is not None:
            w = torch.as_tensor(np.asarray(weights, dtype=np.float64))
            if w.shape != (num_samples,):
                raise ValueError(f"sampler: weights have shape {tuple(w.shape)}, expected ({num_samples},)")
            if not torch.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
                raise ValueError("sampler: weights must be finite, non-negative and not all zero")
            self.weights = w
        if drop_last:
            self.per_rank = num_samples // num_replicas
        else:
            self.per_rank = math.ceil(num_samples / num_replicas)
        self.epoch = 0
        self.start_index = 0

    def set_epoch(self, epoch: int, start_index: int = 0) -> None:
        """Select the epoch; ``start_index`` skips the first k indices of this rank's share
        (to resume mid-epoch after k samples were consumed on this rank)."""
        if not 0 <= start_index <= self.per_rank:
            raise ValueError(f"sampler: start_index {start_index} is not in [0, {self.per_rank}]")
        self.epoch = epoch
        self.start_index = start_index

    def global_order(self, epoch: int | None = None) -> torch.Tensor:
        """The epoch's global draw of N indices, the same on every rank. (N,) int64."""
        g = epoch_generator(self.seed, self.epoch if epoch is None else epoch)
        if self.weights is not None:
            return torch.multinomial(self.weights, self.num_samples, replacement=True, generator=g)
        if self.shuffle:
            return torch.randperm(self.num_samples, generator=g)
        return torch.arange(self.num_samples)

    def rank_indices(self) -> list[int]:
        """This rank's whole share of the current epoch (before ``start_index``)."""
        order = self.global_order()  # (N,)
        total = self.per_rank * self.num_replicas
        if total <= len(order):
            order = order[:total]
        else:  # pad by wrapping around
            order = torch.cat([order, order.repeat(math.ceil(total / len(order)))[: total - len(order)]])
        return order[self.rank::self.num_replicas].tolist()

    def __iter__(self) -> Iterator[int]:
        return iter(self.rank_indices()[self.start_index:])

    def __len__(self) -> int:
        return self.per_rank
