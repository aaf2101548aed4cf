"""Choosing Overlap Local-SGD's pull-back (alpha) and anchor momentum (beta) by period: loss after N steps.

    python -m benchmarks.overlap_tuning [--workload mlp] [--periods 2 8 32] [--steps 512]

Loss per step does not depend on the link, so this runs the ranks as simulated workers (threads of one
process, the strategies' own algorithm code) on the lab's workload, and prints one table per period: the
evaluation loss of the averaged replicas after ``--steps`` steps for each (alpha, beta), beside Local SGD and
CoCoD-SGD at the same period. A benchmark, not a test.
"""

from __future__ import annotations

import argparse
import time
from functools import partial
from typing import Any, Callable

import torch

from benchmarks.simulated import train_step
from benchmarks.workloads import WORKLOADS, Workload
from lightning_localsgd.algorithms import CoCoDSGD, LocalSGD, OverlapLocalSGD
from lightning_localsgd.algorithms.periodic import PeriodicAlgorithm
from lightning_localsgd.comm import run_simulated

ALPHAS = (0.2, 0.4, 0.6, 0.8, 1.0)
BETAS = (0.0, 0.3, 0.7)


def final_loss(workload: Workload, make_algorithm: Callable[[], PeriodicAlgorithm], steps: int, world: int) -> float:
    """Train ``world`` simulated ranks for ``steps`` steps; the evaluation loss of their average."""

    def worker(rank: int, comm: Any) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        model = workload.build_model()
        optimizer = workload.make_optimizer(model.parameters())
        algorithm = make_algorithm()
        algorithm.setup(model, comm, [optimizer])
        batches = iter(workload.train_loader(rank, world))
        for _ in range(steps):
            train_step(workload, model, optimizer, algorithm, next(batches))
        algorithm.finalize()  # every rank now holds the average of the replicas
        return {k: v.detach().clone() for k, v in model.state_dict().items()}

    states = run_simulated(world, worker, timeout=600.0)
    model = workload.build_model()
    model.load_state_dict(states[0])
    return workload.evaluate(model, world)["loss"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", choices=sorted(WORKLOADS), default="mlp")
    parser.add_argument("--periods", type=int, nargs="+", default=[2, 8, 32])
    parser.add_argument("--steps", type=int, default=512)
    parser.add_argument("--ranks", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(1)
    workload = WORKLOADS[args.workload]
    print(f"{workload.what}; {args.ranks} simulated ranks, {args.steps} steps; evaluation loss of the average\n")
    for period in args.periods:
        start = time.perf_counter()
        local = final_loss(workload, partial(LocalSGD, period=period), args.steps, args.ranks)
        cocod = final_loss(workload, partial(CoCoDSGD, period=period), args.steps, args.ranks)
        print(f"### period {period}: Local SGD {local:.3f}, CoCoD-SGD {cocod:.3f}\n")
        print("| alpha \\ beta | " + " | ".join(f"{b:g}" for b in BETAS) + " |")
        print("|---|" + "---:|" * len(BETAS))
        for alpha in ALPHAS:
            cells = []
            for beta in BETAS:
                make = partial(OverlapLocalSGD, period=period, pullback=alpha, anchor_momentum=beta)
                cells.append(f"{final_loss(workload, make, args.steps, args.ranks):.3f}")
            print(f"| {alpha:g} | " + " | ".join(cells) + " |")
        print(f"\n({time.perf_counter() - start:.0f} s)\n", flush=True)


if __name__ == "__main__":
    main()
