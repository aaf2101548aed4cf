"""DeTAG's acceleration coefficient and its buffer rule against closed forms written here, not the package's own
formulas (ALGORITHMS.md section 7: eta = (1 - sqrt(1 - lambda2^2)) / (1 + sqrt(1 - lambda2^2)); normalisation
statistics are mixed by plain gossip, x and y by accelerated gossip)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lightning_localsgd.algorithms import DeTAG
from lightning_localsgd.comm import run_simulated


def ring_matrix(n: int) -> torch.Tensor:
    """W_ii = W_{i,i+1} = W_{i,i-1} = 1/3."""
    w = torch.zeros(n, n, dtype=torch.float64)
    for i in range(n):
        for j in (i - 1, i, i + 1):
            w[i, j % n] += 1 / 3
    return w


def eta_of_ring(n: int) -> float:
    # Ring eigenvalues 1/3 + 2/3 cos(2 pi k / n); lambda2 is the largest magnitude after k = 0.
    lambda2 = max(abs(1 / 3 + 2 / 3 * math.cos(2 * math.pi * k / n)) for k in range(1, n))
    root = math.sqrt(1 - lambda2**2)
    return (1 - root) / (1 + root)


def detag_eta(world: int, rounds: int) -> list[float]:
    def worker(rank, comm):
        algorithm = DeTAG("ring", gossip_rounds=rounds)
        algorithm.setup(nn.Linear(2, 1), comm)
        return algorithm.eta

    return run_simulated(world, worker)


@pytest.mark.parametrize(("world", "expected"), [(4, 0.02944), (5, 0.08573)])
def test_eta_on_small_rings_is_the_closed_form(world, expected):
    # ring of 4: lambda2 = 1/3, eta = (1 - sqrt(8/9)) / (1 + sqrt(8/9)) = 0.029437...
    # ring of 5: lambda2 = (1 + 2 cos(2 pi / 5)) / 3 = 0.53934, eta = 0.085731...
    assert eta_of_ring(world) == pytest.approx(expected, abs=5e-6)
    assert detag_eta(world, rounds=2) == [pytest.approx(expected, abs=5e-6)] * world


def test_normalisation_statistics_are_mixed_by_plain_gossip_while_the_weights_are_accelerated():
    world, rounds, steps = 8, 2, 4
    eta = eta_of_ring(world)  # 0.2551: acceleration is on, so the two rules differ
    assert eta > 0.2
    w = ring_matrix(world)

    def worker(rank, comm):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4, momentum=0.5)).double()
        algorithm = DeTAG("ring", gossip_rounds=rounds)
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        algorithm.setup(model, comm, [opt])
        generator = torch.Generator().manual_seed(100 + rank)
        records = []
        for _ in range(steps):
            x = torch.randn(16, 3, generator=generator, dtype=torch.float64) * (1 + rank) + rank
            opt.zero_grad()
            model(x).pow(2).mean().backward()  # the forward pass updates this rank's running statistics
            before = torch.cat([model[1].running_mean, model[1].running_var]).clone()
            algorithm.before_optimizer_step(opt)
            opt.step()
            algorithm.end_step()
            records.append((before, torch.cat([model[1].running_mean, model[1].running_var]).clone()))
        return records

    runs = run_simulated(world, worker)
    plain = torch.linalg.matrix_power(w, rounds)  # R plain gossip rounds
    for step in range(steps):
        before = torch.stack([runs[r][step][0] for r in range(world)])
        after = torch.stack([runs[r][step][1] for r in range(world)])
        torch.testing.assert_close(after, plain @ before, rtol=0, atol=1e-12)
        # and the accelerated rule would have given something measurably different
        previous, current = before, before
        for _ in range(rounds):
            previous, current = current, (1 + eta) * (w @ current) - eta * previous
        assert (current - plain @ before).abs().max() > 1e-3
