"""What one all-reduce costs the CPU on the lab's link: the share of a hidden round that no overlap can hide.

    sudo python -m benchmarks.transfer_cpu --link 200mbit [--numel 1317898] [--repeats 10]

Two ranks in the lab (each in its own namespace, one thread) all-reduce a float32 tensor of ``--numel`` elements
(default: the lab MLP's parameters, 5.3 MB) ``--repeats`` times. Per transfer it prints the wall time, the CPU
seconds of each rank's process (the training thread waits; gloo's threads work) and the machine's softirq and
system time (the kernel's TCP, veth and tbf work for both ranks), medians (the kernel's: means) over the repeats.
A background transfer needs that CPU while the training threads run: on a machine with no core to spare it slows
the local steps.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

from benchmarks.netlab import DEFAULT_MTU, NetLab
from benchmarks.slow_link import rank_env

TICKS = os.sysconf("SC_CLK_TCK")


def kernel_seconds() -> tuple[float, float]:
    """(softirq, system) seconds of the whole machine so far, from /proc/stat."""
    fields = open("/proc/stat").readline().split()[1:]  # noqa: SIM115 (read once)
    return int(fields[6]) / TICKS, int(fields[2]) / TICKS


def worker(numel: int, repeats: int) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    tensor = torch.randn(numel)
    for _ in range(3):
        dist.all_reduce(tensor)  # connections set up, buffers allocated
    rows = []
    for _ in range(repeats):
        dist.barrier()
        cpu, wall, (softirq, system) = time.process_time(), time.perf_counter(), kernel_seconds()
        dist.all_reduce(tensor)
        after = kernel_seconds()
        rows.append(
            {
                "wall_ms": 1e3 * (time.perf_counter() - wall),
                "cpu_ms": 1e3 * (time.process_time() - cpu),
                "softirq_ms": 1e3 * (after[0] - softirq),
                "system_ms": 1e3 * (after[1] - system),
            }
        )
    # The kernel's counters tick every 1 / SC_CLK_TCK s (10 ms here): their mean, not their median, says the cost.
    summary = {key: statistics.median(row[key] for row in rows) for key in ("wall_ms", "cpu_ms")}
    summary.update({key: statistics.mean(row[key] for row in rows) for key in ("softirq_ms", "system_ms")})
    print(json.dumps({"rank": dist.get_rank(), **summary}), flush=True)
    dist.destroy_process_group()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--link", default="200mbit")
    parser.add_argument("--mtu", type=int, default=DEFAULT_MTU)
    parser.add_argument("--numel", type=int, default=1_317_898)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args.numel, args.repeats)
        return
    command = [sys.executable, "-m", "benchmarks.transfer_cpu", "--worker", "--numel", str(args.numel)]
    command += ["--repeats", str(args.repeats)]
    with NetLab(2, args.link, args.mtu) as lab:
        print(lab.notice, flush=True)
        ranks = [
            subprocess.Popen(
                lab.ranks[r].wrap(command), env=rank_env(lab, r, 2, 29801), stdout=subprocess.PIPE, text=True
            )
            for r in range(2)
        ]
        results = [json.loads(rank.communicate()[0].strip().splitlines()[-1]) for rank in ranks]
    size = f"{4 * args.numel / 1e6:.1f} MB"
    print(f"\n{size} all-reduced {args.repeats} times: wall and process CPU medians, kernel means\n")
    print("| rank | wall ms | process CPU ms | machine softirq ms | machine system ms |")
    print("|---:|---:|---:|---:|---:|")
    for r in results:
        print(
            f"| {r['rank']} | {r['wall_ms']:.1f} | {r['cpu_ms']:.1f} | {r['softirq_ms']:.0f} | {r['system_ms']:.0f} |"
        )


if __name__ == "__main__":
    main()
