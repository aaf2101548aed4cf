"""Accuracy of the compressed strategies on the label-sorted CNN, against full precision, over several seeds.

    python -m benchmarks.compressed_accuracy [--steps 1088] [--seeds 0 1 2] [--schedule cosine] [--jobs 2]

Two simulated ranks (the strategies' algorithm code in one process: accuracy per step does not depend on the
link; the lab's ``slow_link`` gives the seconds per step). Every run of a seed starts from the same model and sees
the same batches; the runs differ only in their algorithm. The model scored is the average of the replicas
(``algorithm.consensus()``), on the held-out digits, every ``--eval-every`` steps. ``--schedule cosine`` decays
the learning rate to 0 over the run, as the papers' runs to convergence do; ``constant`` keeps the workload's.

Prints, per run: final accuracy (median over seeds, min-max), the gap to full precision taken within each seed
(median, min-max), and the steps to 95 % test accuracy; saves the accuracy curves (median over seeds) as a plot.
A benchmark, not a test.
"""

from __future__ import annotations

import argparse
import math
import statistics
from concurrent.futures import ProcessPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from benchmarks.simulated import batches_forever, train_step
from benchmarks.workloads import CNN
from lightning_localsgd.algorithms import LIECSGD, ErrorFeedbackSGD
from lightning_localsgd.algorithms.periodic import PeriodicAlgorithm
from lightning_localsgd.comm.simulated import run_simulated
from lightning_localsgd.compression import NoCompression

FULL_PRECISION = "full precision (synchronous SGD, as DDP)"
RUNS: dict[str, Callable[[], PeriodicAlgorithm]] = {
    FULL_PRECISION: partial(ErrorFeedbackSGD, NoCompression()),
    "ef_sign": ErrorFeedbackSGD,
    "liec_sgd, p = 32": partial(LIECSGD, 32),
    "liec_sgd, p = 32, variance_reduction": partial(LIECSGD, 32, variance_reduction=True),
    "liec_sgd, p = 16, variance_reduction": partial(LIECSGD, 16, variance_reduction=True),
    "liec_sgd, p = 8, variance_reduction": partial(LIECSGD, 8, variance_reduction=True),
    "liec_sgd, p = 100": partial(LIECSGD, 100),
    "liec_sgd, p = 100, variance_reduction": partial(LIECSGD, 100, variance_reduction=True),
}
TARGET_ACC = 0.95


def learning_rate(base: float, schedule: str, step: int, steps: int) -> float:
    if schedule == "cosine":
        return base * 0.5 * (1 + math.cos(math.pi * step / steps))
    return base


def train(label: str, seed: int, steps: int, schedule: str, eval_every: int, world: int = 2) -> list[float]:
    """Test accuracy of the replicas' average after every ``eval_every`` steps of one run."""
    torch.set_num_threads(1)

    def worker(rank: int, comm: Any) -> list[float]:
        torch.manual_seed(seed)
        model = CNN.build_model()
        optimizer = CNN.make_optimizer(model.parameters())
        base = [group["lr"] for group in optimizer.param_groups]
        algorithm = RUNS[label]()
        algorithm.setup(model, comm, [optimizer])
        batches = batches_forever(CNN.train_loader(rank, world))
        accuracies = []
        for step in range(steps):
            for group, lr in zip(optimizer.param_groups, base):
                group["lr"] = learning_rate(lr, schedule, step, steps)
            train_step(CNN, model, optimizer, algorithm, next(batches))
            if (step + 1) % eval_every == 0:
                with algorithm.consensus():
                    accuracies.append(CNN.evaluate(model, world)["acc"] if rank == 0 else 0.0)
        return accuracies

    return run_simulated(world, worker, timeout=3600.0)[0]


def steps_to(curve: list[float], eval_every: int, target: float) -> Optional[int]:
    return next(((i + 1) * eval_every for i, acc in enumerate(curve) if acc >= target), None)


def spread(values: list[float], scale: float = 100.0, digits: int = 1) -> str:
    return (
        f"{scale * statistics.median(values):.{digits}f} "
        f"({scale * min(values):.{digits}f} to {scale * max(values):.{digits}f})"
    )


def plot(curves: dict[str, list[list[float]]], eval_every: int, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5), dpi=110)
    for label, per_seed in curves.items():
        median = [statistics.median(points) for points in zip(*per_seed)]
        steps = [(i + 1) * eval_every for i in range(len(median))]
        ax.plot(steps, [100 * a for a in median], label=label, linestyle="--" if label == FULL_PRECISION else "-")
    ax.axhline(100 * TARGET_ACC, color="black", linewidth=0.8, alpha=0.6)
    ax.set_xlabel("step")
    ax.set_ylabel("test accuracy of the replicas' average (%), median over seeds")
    ax.set_ylim(50, 100)
    ax.legend(fontsize=8)
    ax.set_title("Label-sorted CNN, 2 ranks: compressed strategies against full precision")
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, bbox_inches="tight")
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1088, help="steps per run (1088: about 48 epochs of a shard)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--schedule", choices=["cosine", "constant"], default="cosine")
    parser.add_argument("--eval-every", type=int, default=32)
    parser.add_argument("--runs", nargs="+", default=list(RUNS), help="a subset of the runs, by label")
    parser.add_argument("--jobs", type=int, default=2, help="runs trained at once (one core each)")
    parser.add_argument("--out", type=Path, default=Path("results/compressed_accuracy"))
    args = parser.parse_args()
    labels = [FULL_PRECISION] + [label for label in args.runs if label != FULL_PRECISION]
    unknown = [label for label in labels if label not in RUNS]
    if unknown:
        parser.error(f"unknown runs {unknown}; choose from {list(RUNS)}")

    jobs = {
        (label, seed): (label, seed, args.steps, args.schedule, args.eval_every)
        for label in labels
        for seed in args.seeds
    }
    with ProcessPoolExecutor(args.jobs) as pool:
        futures = {key: pool.submit(train, *job) for key, job in jobs.items()}
        curves = {label: [futures[label, seed].result() for seed in args.seeds] for label in labels}

    print(f"{CNN.what}; 2 simulated ranks, {args.steps} steps, {args.schedule} learning rate, seeds {args.seeds}\n")
    print("| run | final test accuracy (%) | gap to full precision (points) | steps to 95 % |")
    print("|---|---:|---:|---:|")
    reference = [curve[-1] for curve in curves[FULL_PRECISION]]
    for label in labels:
        finals = [curve[-1] for curve in curves[label]]
        gaps = [final - ref for final, ref in zip(finals, reference)]
        reached = [s for s in (steps_to(c, args.eval_every, TARGET_ACC) for c in curves[label]) if s is not None]
        to_target = f"{statistics.median(reached):.0f} ({len(reached)}/{len(finals)} seeds)" if reached else "never"
        gap = "-" if label == FULL_PRECISION else spread(gaps)
        print(f"| {label} | {spread(finals)} | {gap} | {to_target} |", flush=True)
    plot(curves, args.eval_every, args.out / "accuracy.png")
    print(f"\nplot: {args.out / 'accuracy.png'}")


if __name__ == "__main__":
    main()
