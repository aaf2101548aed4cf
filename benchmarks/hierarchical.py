"""Hierarchical Local SGD against flat Local SGD: inter-node bytes for the accuracy each reaches.

    python -m benchmarks.hierarchical [--workload cnn] [--nodes 2] [--local 2] [--steps 544]

The ranks run as simulated workers posing as ``--nodes`` nodes of ``--local`` ranks (the strategies' algorithm
code; loss per step does not depend on the link). Inter-node bytes: the hierarchical strategy counts them itself
(``comm/inter_node_mb_sent``); for flat Local SGD a ring all-reduce over node-major ranks crosses between nodes on
``nodes`` of its ``N`` hops, each carrying ``2 (N - 1) / N`` of the model per round. A benchmark, not a test.
"""

from __future__ import annotations

import argparse
from functools import partial
from typing import Any, Callable

import torch

from benchmarks.simulated import batches_forever, train_step
from benchmarks.workloads import WORKLOADS, Workload
from lightning_localsgd.algorithms import HierarchicalLocalSGD, LocalSGD
from lightning_localsgd.algorithms.periodic import PeriodicAlgorithm
from lightning_localsgd.comm import ring_all_reduce_bytes
from lightning_localsgd.comm.simulated import run_simulated_nodes


def train(workload: Workload, make: Callable[[], PeriodicAlgorithm], nodes: int, local: int, steps: int) -> dict:
    world = nodes * local

    def worker(rank: int, comm: Any, intra: Any, cross: Any) -> dict[str, Any]:
        torch.manual_seed(0)
        model = workload.build_model()
        optimizer = workload.make_optimizer(model.parameters())
        algorithm = make()
        if isinstance(algorithm, HierarchicalLocalSGD):
            algorithm.set_node_groups(intra, cross)
        algorithm.setup(model, comm, [optimizer])
        batches = batches_forever(workload.train_loader(rank, world))
        for _ in range(steps):
            train_step(workload, model, optimizer, algorithm, next(batches))
        algorithm.finalize()
        scores = workload.evaluate(model, world) if rank == 0 else {}
        return {"scores": scores, "rounds": algorithm.rounds, "metrics": algorithm.metrics()}

    return run_simulated_nodes(nodes, local, worker, timeout=600.0)[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", choices=sorted(WORKLOADS), default="cnn")
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--local", type=int, default=2)
    parser.add_argument("--steps", type=int, default=544)
    args = parser.parse_args()
    torch.set_num_threads(1)
    workload = WORKLOADS[args.workload]
    world = args.nodes * args.local
    model_bytes = sum(p.numel() for p in workload.build_model().parameters()) * 4
    runs = {
        "Local SGD, period 4": partial(LocalSGD, 4, first_period_one_step=False),
        "Local SGD, period 32": partial(LocalSGD, 32, first_period_one_step=False),
        "hierarchical, intra 4, inter 32": partial(HierarchicalLocalSGD, 4, 32),
    }
    print(f"{workload.what}; {args.nodes} nodes x {args.local} simulated ranks, {args.steps} steps\n")
    print("| run | final loss | final accuracy | inter-node MB (all nodes) |\n|---|---:|---:|---:|")
    for label, make in runs.items():
        result = train(workload, make, args.nodes, args.local, args.steps)
        if "comm/inter_node_mb_sent" in result["metrics"]:
            inter = result["metrics"]["comm/inter_node_mb_sent"] * world  # every rank carries its share
        else:  # a ring over node-major ranks: `nodes` of its `world` hops cross between nodes
            inter = result["rounds"] * args.nodes * ring_all_reduce_bytes(model_bytes, world) / 1e6
        accuracy = f"{100 * result['scores']['acc']:.1f} %" if "acc" in result["scores"] else "-"
        print(f"| {label} | {result['scores']['loss']:.3f} | {accuracy} | {inter:.1f} |", flush=True)


if __name__ == "__main__":
    main()
