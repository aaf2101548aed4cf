"""One rank of one peer: trains, then writes ``rank<r>.json`` and ``rank<r>.pt`` into ``--out``.

Started by :mod:`benchmarks.slow_link` (inside the rank's network namespace when there is one), with the
torchelastic variables (RANK, WORLD_SIZE, MASTER_ADDR, ...) and GLOO_SOCKET_IFNAME already set.
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import replace
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from benchmarks.lightning_run import run_lightning
from benchmarks.peers import Peer
from benchmarks.plain_loop import run_plain
from benchmarks.recorder import wire_counter
from benchmarks.workloads import WORKLOADS


def seeded(build: Callable[[], nn.Module], seed: int) -> Callable[[], nn.Module]:
    def build_seeded() -> nn.Module:
        torch.manual_seed(seed)
        return build()

    return build_seeded


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peer", required=True, help="JSON of a benchmarks.peers.Peer")
    parser.add_argument("--workload", required=True, choices=sorted(WORKLOADS))
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--world-size", type=int, required=True)
    parser.add_argument("--warmup", type=int, required=True)
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--eval-every", type=int, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=0, help="the initial weights' seed, the same on every rank")
    args = parser.parse_args()

    torch.set_num_threads(1)  # one core per rank: the machine's cores are the ranks
    peer = Peer(**json.loads(args.peer))
    workload = WORKLOADS[args.workload]
    if args.seed:  # the runners seed 0 before building the model; another seed must come after, just before it
        workload = replace(workload, build_model=seeded(workload.build_model, args.seed))
    interface = os.environ.get("GLOO_SOCKET_IFNAME")
    recorder_args = {
        "warmup": args.warmup,
        "steps": args.steps,
        "eval_every": args.eval_every,
        "wire_bytes": wire_counter(interface),
    }
    run = run_lightning if peer.kind == "lightning" else run_plain
    recorder = run(peer, workload, args.rank, args.world_size, recorder_args)
    recorder.save(args.out, args.rank, {"label": peer.label, "interface": interface})


if __name__ == "__main__":
    main()
