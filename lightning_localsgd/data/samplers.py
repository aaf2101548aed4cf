"""Non-identical (label-skewed) splits of a labelled dataset across ranks.

Every benchmark of an algorithm for non-identical data needs the same split, so it lives here:

* ``"label_sorted"``: indices sorted by label and cut into ``num_replicas`` contiguous blocks (the VRL-SGD
  paper's split: each rank sees one or two classes);
* ``"dirichlet"``: each rank draws a label distribution from Dirichlet(alpha); small alpha (0.1) is very
  skewed, large alpha (100) is close to identical;
* ``"iid"``: a plain random split, for comparison.

Every rank gets exactly the same number of samples, so no rank runs out of batches before another (which
would leave the others waiting in a collective). The split depends only on ``seed``; the order inside a
rank's shard is reshuffled each epoch from ``seed + epoch`` when ``shuffle`` is set.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Literal, Optional

import torch
import torch.distributed as dist
from torch.utils.data import DistributedSampler

Scheme = Literal["label_sorted", "dirichlet", "iid"]


class NonIIDSampler(DistributedSampler):
    """A ``DistributedSampler`` that gives each rank a label-skewed shard of equal size.

    Lightning leaves a ``DistributedSampler`` in place (it does not wrap it again) and calls ``set_epoch``.

    Args:
        labels: one integer label per dataset item.
        num_replicas, rank: default to the initialised process group's (1 and 0 without one).
        scheme: ``"label_sorted"``, ``"dirichlet"`` or ``"iid"``.
        alpha: Dirichlet concentration, for ``scheme="dirichlet"`` only.
        shuffle: reshuffle the order inside the shard every epoch.
        seed: determines the split and the shuffles; must be the same on every rank.
    """

    def __init__(
        self,
        labels: Sequence[int] | torch.Tensor,
        num_replicas: Optional[int] = None,
        rank: Optional[int] = None,
        scheme: Scheme = "label_sorted",
        alpha: float = 0.5,
        shuffle: bool = True,
        seed: int = 0,
    ) -> None:
        labels_tensor = torch.as_tensor(labels, dtype=torch.long).reshape(-1)
        if num_replicas is None and not (dist.is_available() and dist.is_initialized()):
            num_replicas, rank = 1, 0  # a single process: one shard holding everything
        super().__init__(labels_tensor, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed)
        if scheme not in ("label_sorted", "dirichlet", "iid"):
            raise ValueError(f"`scheme` must be 'label_sorted', 'dirichlet' or 'iid', got {scheme!r}.")
        if scheme == "dirichlet" and not alpha > 0:
            raise ValueError(f"`alpha` must be positive for the Dirichlet split, got {alpha}.")
        if len(labels_tensor) < self.num_replicas:
            raise ValueError(f"{len(labels_tensor)} samples cannot be split across {self.num_replicas} ranks.")
        self.scheme = scheme
        self.alpha = alpha
        self.shard = split_indices(labels_tensor, self.num_replicas, scheme, alpha, seed)[self.rank]
        self.num_samples = len(self.shard)
        self.total_size = self.num_samples * self.num_replicas

    def __iter__(self) -> Iterator[int]:
        if not self.shuffle:
            return iter(self.shard.tolist())
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(len(self.shard), generator=generator)
        return iter(self.shard[order].tolist())

    def __len__(self) -> int:
        return self.num_samples


def split_indices(labels: torch.Tensor, world_size: int, scheme: Scheme, alpha: float, seed: int) -> list[torch.Tensor]:
    """Disjoint shards of equal size, one per rank (a remainder of fewer than ``world_size`` items is dropped)."""
    generator = torch.Generator().manual_seed(seed)
    per_rank = len(labels) // world_size
    if scheme == "iid":
        order = torch.randperm(len(labels), generator=generator)
        return [order[r * per_rank : (r + 1) * per_rank] for r in range(world_size)]
    if scheme == "label_sorted":
        # Shuffle first so that ties (same label) are broken by the seed, then stable-sort by label.
        order = torch.randperm(len(labels), generator=generator)
        order = order[torch.sort(labels[order], stable=True).indices]
        return [order[r * per_rank : (r + 1) * per_rank] for r in range(world_size)]
    return _dirichlet_split(labels, world_size, per_rank, alpha, generator)


def _dirichlet_split(
    labels: torch.Tensor, world_size: int, per_rank: int, alpha: float, generator: torch.Generator
) -> list[torch.Tensor]:
    classes = torch.unique(labels).tolist()
    pools = {c: (labels == c).nonzero().reshape(-1) for c in classes}
    pools = {c: pool[torch.randperm(len(pool), generator=generator)].tolist() for c, pool in pools.items()}
    concentration = torch.full((1, len(classes)), float(alpha), dtype=torch.float64)
    shards = []
    for _ in range(world_size):
        # Dirichlet = normalised Gamma draws; drawn from our generator, not the global RNG.
        draws = torch._standard_gamma(concentration, generator=generator)[0]
        proportions = draws / draws.sum()
        counts = _rounded_counts(proportions, per_rank)
        shard: list[int] = []
        for c, want in zip(classes, counts.tolist()):
            take = min(want, len(pools[c]))
            shard += pools[c][:take]
            pools[c] = pools[c][take:]
        # Classes that ran dry: fill up from the remaining pools, largest first, so sizes stay equal.
        while len(shard) < per_rank:
            c = max(pools, key=lambda k: len(pools[k]))
            take = min(per_rank - len(shard), len(pools[c]))
            shard += pools[c][:take]
            pools[c] = pools[c][take:]
        shards.append(torch.tensor(shard, dtype=torch.long))
    return shards


def _rounded_counts(proportions: torch.Tensor, total: int) -> torch.Tensor:
    """Integer counts proportional to ``proportions`` that add up to ``total`` (largest remainders)."""
    exact = proportions * total
    counts = exact.floor().long()
    remainder = total - int(counts.sum())
    if remainder > 0:
        counts[torch.argsort(exact - counts, descending=True)[:remainder]] += 1
    return counts
