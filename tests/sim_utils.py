"""Helpers for tests that run N simulated workers in one process."""

from __future__ import annotations

import torch
from torch import nn


def make_model(seed: int = 0, batchnorm: bool = False) -> nn.Module:
    """A small model initialised from its own generator (simulated workers are threads sharing the global RNG)."""
    layers: list[nn.Module] = [nn.Linear(5, 8)]
    if batchnorm:
        layers.append(nn.BatchNorm1d(8))
    layers += [nn.Tanh(), nn.Linear(8, 1)]
    model = nn.Sequential(*layers)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return model


def worker_batch(rank: int, step: int, batch: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic, rank-dependent (non-identical) data: each rank sees a shifted input distribution."""
    g = torch.Generator().manual_seed(1000 * rank + step)
    x = torch.randn(batch, 5, generator=g) + rank
    y = (x.sum(dim=1, keepdim=True) * (1 + rank)).sin()
    return x, y


def loss_of(model: nn.Module, rank: int, step: int) -> torch.Tensor:
    x, y = worker_batch(rank, step)
    return nn.functional.mse_loss(model(x), y)


def flat_params(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])
