"""What the benchmarks that run simulated ranks share: endless batches and one training step through the moments."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from benchmarks.workloads import Workload
from lightning_localsgd.algorithms.periodic import PeriodicAlgorithm


def batches_forever(loader: Any) -> Iterator[Any]:
    """The loader's batches, epoch after epoch (the sampler's epoch set each time, as Lightning does)."""
    epoch = 0
    while True:
        if hasattr(loader.sampler, "set_epoch"):
            loader.sampler.set_epoch(epoch)
        yield from loader
        epoch += 1


def train_step(
    workload: Workload, model: nn.Module, optimizer: torch.optim.Optimizer, algorithm: PeriodicAlgorithm, batch: Any
) -> bool:
    """One training step of a simulated rank through every moment of the algorithm; True if it ended with a round."""
    optimizer.zero_grad()
    workload.loss(model, batch).backward()
    algorithm.before_optimizer_step(optimizer)
    optimizer.step()
    algorithm.after_optimizer_step(optimizer)
    return algorithm.end_step()
