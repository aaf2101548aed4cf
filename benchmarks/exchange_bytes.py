"""Bytes each rank sends per compressed step, against a float32 ring all-reduce of the same model.

    python -m benchmarks.exchange_bytes [--worlds 2 4 8] [--params-millions 21] [--steps 3]

Simulated ranks (threads of one process, :func:`~lightning_localsgd.comm.run_simulated`) train an MLP of about
``--params-millions`` float32 parameters for ``--steps`` compressed steps under ``ef_sign`` and ``liec_sgd`` (both
servers) with the default 5 MiB blocks and 25 MB chunks, and the table shows the most any rank sent per step
(``comm.exchange_bytes_sent / comm.exchanges``, as logged under ``comm/exchange_mb_sent``), the float32 ring
all-reduce's ``2 (N - 1) / N * 4 * numel`` bytes, and their ratio. Counted bytes, not timed: the machine does not
matter.
"""

from __future__ import annotations

import argparse
from typing import Callable

import torch
from torch import nn

from lightning_localsgd.algorithms import LIECSGD, ErrorFeedbackSGD
from lightning_localsgd.algorithms.periodic import PeriodicAlgorithm
from lightning_localsgd.comm import run_simulated
from lightning_localsgd.comm.communicator import ring_all_reduce_bytes

ALGORITHMS: dict[str, Callable[[], PeriodicAlgorithm]] = {
    "ef_sign": lambda: ErrorFeedbackSGD(period=1000),
    "liec_sgd, replicated server": lambda: LIECSGD(1000, server="replicated"),
    "liec_sgd, sharded server": lambda: LIECSGD(1000, server="sharded"),
}


def mlp(params_millions: float) -> nn.Sequential:
    width = 1024
    layers = max(1, round(params_millions * 1e6 / (width * width + width)))
    return nn.Sequential(*[nn.Linear(width, width) for _ in range(layers)])


def bytes_per_step(make: Callable[[], PeriodicAlgorithm], world: int, params_millions: float, steps: int) -> int:
    """The most any rank sent per compressed step."""

    def worker(rank: int, comm) -> int:
        torch.manual_seed(0)
        model = mlp(params_millions)
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
        algorithm = make()
        algorithm.setup(model, comm, [optimizer])
        for _ in range(steps):
            optimizer.zero_grad()
            model(torch.randn(4, 1024) + rank).pow(2).mean().backward()
            algorithm.before_optimizer_step(optimizer)
            optimizer.step()
            algorithm.end_step()
        return comm.stats.exchange_bytes_sent // max(comm.stats.exchanges, 1)

    return max(run_simulated(world, worker, timeout=600.0))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worlds", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--params-millions", type=float, default=21.0)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    numel = sum(p.numel() for p in mlp(args.params_millions).parameters())
    print(f"MLP of {numel / 1e6:.1f} M float32 parameters; bytes per rank per compressed step (most of any rank)")
    print("| ranks | exchange | bytes per step | float32 ring all-reduce | fraction |")
    print("|---:|---|---:|---:|---:|")
    for world in args.worlds:
        reference = ring_all_reduce_bytes(4 * numel, world)
        for name, make in ALGORITHMS.items():
            sent = bytes_per_step(make, world, args.params_millions, args.steps)
            print(f"| {world} | {name} | {sent:,} | {reference:,} | 1/{reference / sent:.1f} |")


if __name__ == "__main__":
    main()
