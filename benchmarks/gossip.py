"""Gossip on label-sorted data: DeTAG against D-PSGD in steps to a target loss, and bytes per step as ranks grow.

    python -m benchmarks.gossip [--workload cnn] [--ranks 4] [--steps 400] [--target-loss 0.3] [--out results/gossip]

Loss per step does not depend on the link, so the ranks run as simulated workers (threads of one process, the
strategies' own algorithm code) on the lab's workload, label-sorted across a ring. Every ``--eval-every`` steps the
replicas' average is evaluated (the consensus the strategies evaluate). A second table counts what one rank sends
per step on a ring, from the communicator's counters, against a ring all-reduce of the same model at 2, 4 and 8
ranks. Prints both tables (markdown) and saves ``loss.png``. A benchmark, not a test.
"""

from __future__ import annotations

import argparse
import time
from functools import partial
from pathlib import Path
from typing import Any, Callable

import torch

from benchmarks.simulated import batches_forever, train_step
from benchmarks.workloads import WORKLOADS, Workload
from lightning_localsgd.algorithms import DPSGD, DeTAG
from lightning_localsgd.algorithms.periodic import PeriodicAlgorithm
from lightning_localsgd.comm import ring_all_reduce_bytes, run_simulated
from lightning_localsgd.comm.topology import ring

RUNS: dict[str, Callable[[], PeriodicAlgorithm]] = {
    "synchronous SGD (fully connected gossip)": partial(DPSGD, "fully_connected", check_every=10**6),
    "D-PSGD, ring": partial(DPSGD, "ring", check_every=10**6),
    "DeTAG, ring, R = 1": partial(DeTAG, "ring", gossip_rounds=1, check_every=10**6),
    "DeTAG, ring, R = 2": partial(DeTAG, "ring", gossip_rounds=2, check_every=10**6),
}


def curve(workload: Workload, make: Callable[[], PeriodicAlgorithm], world: int, steps: int, every: int) -> dict:
    """Train ``world`` simulated ranks; the average's evaluation (loss, accuracy) every ``every`` steps, and rank 0's
    communication counters."""

    def worker(rank: int, comm: Any) -> dict[str, Any]:
        torch.manual_seed(0)
        model = workload.build_model()
        optimizer = workload.make_optimizer(model.parameters())
        algorithm = make()
        algorithm.setup(model, comm, [optimizer])
        batches = batches_forever(workload.train_loader(rank, world))
        points = []
        for step in range(1, steps + 1):
            train_step(workload, model, optimizer, algorithm, next(batches))
            if step % every == 0:
                with algorithm.consensus():  # collective: every rank enters, rank 0 scores
                    scores = workload.evaluate(model, world) if rank == 0 else {}
                points.append((step, scores, algorithm.metrics().get("comm/consensus_distance", 0.0)))
        return {"points": points, "stats": algorithm.comm.stats.state_dict()}

    return run_simulated(world, worker, timeout=600.0)[0]


def first_step_at(points: list, target: float) -> str:
    return next((str(step) for step, scores, _ in points if scores["loss"] <= target), "not reached")


def bytes_table(workload: Workload) -> list[str]:
    numel = sum(p.numel() for p in workload.build_model().parameters())
    rows = [
        "| ranks | gossip on a ring: MB sent per step per rank | messages in sequence | "
        "ring all-reduce: MB sent per step per rank | messages in sequence |",
        "|---:|---:|---:|---:|---:|",
    ]
    for world in (2, 4, 8):
        make = partial(DPSGD, "ring", check_every=10**6)
        stats = curve(workload, make, world, steps=2, every=10**9)["stats"]  # two steps, no evaluation
        gossip = stats["exchange_bytes_sent"] / stats["exchanges"]
        all_reduce = ring_all_reduce_bytes(numel * 4, world)
        phases = len(ring(world).phases(0))  # one neighbour after the other
        rows.append(f"| {world} | {gossip / 1e6:.3f} | {phases} | {all_reduce / 1e6:.3f} | {2 * (world - 1)} |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", choices=sorted(WORKLOADS), default="cnn")
    parser.add_argument("--ranks", type=int, default=4)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--eval-every", type=int, default=20)
    parser.add_argument("--target-loss", type=float, default=0.3)
    parser.add_argument("--out", type=Path, default=Path("results/gossip"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    workload = WORKLOADS[args.workload]
    args.out.mkdir(parents=True, exist_ok=True)
    print(f"{workload.what}; {args.ranks} simulated ranks on a ring, label-sorted, {args.steps} steps\n")
    print(f"| run | steps to loss <= {args.target_loss:g} | final loss | final accuracy | consensus distance | s |")
    print("|---|---:|---:|---:|---:|---:|")
    curves = {}
    for label, make in RUNS.items():
        start = time.perf_counter()
        result = curve(workload, make, args.ranks, args.steps, args.eval_every)
        points = result["points"]
        curves[label] = points
        _, last, distance = points[-1]
        accuracy = f"{100 * last['acc']:.1f} %" if "acc" in last else "-"
        print(
            f"| {label} | {first_step_at(points, args.target_loss)} | {last['loss']:.3f} | {accuracy} | "
            f"{distance:.3f} | {time.perf_counter() - start:.0f} |",
            flush=True,
        )
    print()
    print("\n".join(bytes_table(workload)))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    figure, axis = plt.subplots(figsize=(6, 4))
    for label, points in curves.items():
        axis.plot([s for s, _, _ in points], [scores["loss"] for _, scores, _ in points], label=label)
    axis.set_xlabel("step")
    axis.set_ylabel("evaluation loss of the average")
    axis.set_yscale("log")
    axis.legend()
    figure.tight_layout()
    figure.savefig(args.out / "loss.png", dpi=120)
    print(f"\nplot: {args.out / 'loss.png'}")


if __name__ == "__main__":
    main()
