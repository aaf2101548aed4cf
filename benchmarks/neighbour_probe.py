"""How long one gossip exchange takes on the lab's link, against an all-reduce of the same tensor.

    python -m benchmarks.neighbour_probe [--ranks 4] [--link 200mbit] [--mb 5.28] [--repeats 8]

Each rank (in its own network namespace, as in the lab) times, median of ``--repeats``: a ring all-reduce of the
tensor; an exchange with both ring neighbours at once; and the communicator's neighbour exchange (what D-PSGD does
every step: the topology's phases, one neighbour after the other, one TCP flow per link at a time). Prints the
times and each one's fraction of its wire-time bound. A benchmark, not a test.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.netlab import NetLab, rate_bits

REPO = Path(__file__).resolve().parent.parent


def rank_main(args: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist

    from lightning_localsgd.comm import ProcessGroupCommunicator
    from lightning_localsgd.comm.topology import ring

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    comm = ProcessGroupCommunicator()
    tensor = torch.randn(int(args.mb * 1e6 / 4))
    left, right = (rank - 1) % world, (rank + 1) % world
    peers = sorted({left, right})

    phases = ring(world).phases(rank)

    def at_once() -> None:
        ops = []
        for peer in peers:
            ops += [dist.P2POp(dist.isend, tensor, peer), dist.P2POp(dist.irecv, torch.empty_like(tensor), peer)]
        for work in dist.batch_isend_irecv(ops):
            work.wait()

    timings = {}
    for label, run in (
        ("ring all-reduce", lambda: dist.all_reduce(tensor)),
        ("neighbour exchange, both at once", at_once),
        ("neighbour exchange, in phases (the communicator's)", lambda: comm.neighbour_exchange_(tensor, phases)),
    ):
        run()  # connections up
        samples = []
        for _ in range(args.repeats):
            dist.barrier()
            start = time.perf_counter()
            run()
            samples.append(time.perf_counter() - start)
        timings[label] = statistics.median(samples)
    if rank == 0:
        link = rate_bits(args.link) / 8
        nbytes = tensor.numel() * 4
        bounds = {
            "ring all-reduce": 2 * (world - 1) / world * nbytes / link,
            "neighbour exchange, both at once": len(peers) * nbytes / link,
            "neighbour exchange, in phases (the communicator's)": len(peers) * nbytes / link,
        }
        print(f"{world} ranks, {args.link}, {nbytes / 1e6:.2f} MB per message, median of {args.repeats}")
        print("| operation | seconds | wire-time bound | of the bound |\n|---|---:|---:|---:|")
        for label, seconds in timings.items():
            print(f"| {label} | {seconds:.3f} | {bounds[label]:.3f} | {bounds[label] / seconds:.0%} |")
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=4)
    parser.add_argument("--link", default="200mbit")
    parser.add_argument("--mb", type=float, default=5.28)
    parser.add_argument("--repeats", type=int, default=8)
    parser.add_argument("--rank", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rank is not None:
        rank_main(args)
        return
    with NetLab(args.ranks, args.link) as lab:
        print(lab.notice)
        procs = []
        for rank in range(args.ranks):
            env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": str(args.ranks), "PYTHONPATH": str(REPO)}
            env.update({"MASTER_ADDR": lab.master_addr, "MASTER_PORT": "29533"})
            env["GLOO_SOCKET_IFNAME"] = lab.ranks[rank].interface
            argv = [sys.executable, "-m", "benchmarks.neighbour_probe", *sys.argv[1:], "--rank", str(rank)]
            procs.append(subprocess.Popen(lab.ranks[rank].wrap(argv), env=env))
        for proc in procs:
            proc.wait(timeout=600)


if __name__ == "__main__":
    main()
