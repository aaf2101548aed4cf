"""What moving a model's bytes costs on loopback gloo here: the floor under a per-step exchange's time.

    python -m benchmarks.loopback_transfer [--mib 382] [--chunks 32] [--repeats 3]

Two ranks (one thread each, loopback gloo) time, means over ``--repeats`` after one warm-up: a ring all-reduce of
``--mib`` MiB of float32 (what DDP sends per step, there hidden under backward); a neighbour exchange of the same
bytes each way in one message and in ``--chunks`` messages one after the other (what ``dpsgd`` sends per step; DeTAG
sends twice that, its tracker too); the same chunks pipelined as the gossip does (the next one posted before the
last is waited for); and a memcpy of the bytes on one rank.

Then whether a transfer can hide under compute here: each rank runs a chain of one-thread matrix products about as
long as the one-message exchange, alone, and again while the exchange (and, as DDP overlaps it with backward, the
all-reduce) travels in gloo's background threads. "Hidden" is the share of the transfer's own time that running
both at once saved: 100 % where the transfer rides under the compute for free, 0 % where both at once cost their sum.

A benchmark, not a test: the numbers belong to this machine (here a 2-core VM, where the transfers are CPU copies on
the cores the ranks train on).
"""

from __future__ import annotations

import argparse
import os
import socket
import time
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def exchange(tensor: torch.Tensor, out: torch.Tensor, peer: int) -> list[dist.Work]:
    ops = [dist.P2POp(dist.isend, tensor, peer), dist.P2POp(dist.irecv, out, peer)]
    return list(dist.batch_isend_irecv(ops))


PRODUCT_SIZE = 1024  # the compute: square float32 matrix products of this size, one thread


def calibrated_products(seconds: float, a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> int:
    """How many products ``a @ b`` (one thread) take about ``seconds`` on this rank (at least one)."""
    torch.mm(a, b, out=out)
    start = time.perf_counter()
    for _ in range(3):
        torch.mm(a, b, out=out)
    return max(1, round(seconds / ((time.perf_counter() - start) / 3)))


def wait_all(works: list[dist.Work]) -> None:
    for work in works:
        work.wait()


def timed(run: Callable[[], object], repeats: int) -> float:
    """Mean seconds of ``run`` on every rank at once, after one warm-up, between barriers."""
    dist.barrier()
    run()
    dist.barrier()
    start = time.perf_counter()
    for _ in range(repeats):
        run()
    dist.barrier()
    return (time.perf_counter() - start) / repeats


def overlap_cases(x: torch.Tensor, received: torch.Tensor, peer: int, repeats: int, results: dict, rank: int) -> None:
    """Compute alone, each transfer alone, and both at once (see the module docstring)."""
    transfers: list[tuple[str, Callable[[], list[dist.Work]]]] = [
        ("neighbour exchange, one message", lambda: exchange(x, received, peer)),
        ("ring all-reduce", lambda: [dist.all_reduce(x, async_op=True)]),
    ]
    alone_transfer = {name: timed(lambda start=start: wait_all(start()), repeats) for name, start in transfers}
    a, b = torch.randn(PRODUCT_SIZE, PRODUCT_SIZE), torch.randn(PRODUCT_SIZE, PRODUCT_SIZE)
    out = torch.empty(PRODUCT_SIZE, PRODUCT_SIZE)
    products = torch.tensor([calibrated_products(alone_transfer[transfers[0][0]], a, b, out)])
    dist.broadcast(products, 0)  # every rank computes alike

    def compute() -> None:
        for _ in range(int(products)):
            torch.mm(a, b, out=out)

    def while_computing(start: Callable[[], list[dist.Work]]) -> Callable[[], None]:
        def run() -> None:
            works = start()
            compute()
            wait_all(works)

        return run

    alone = timed(compute, repeats)
    for name, start in transfers:
        both = timed(while_computing(start), repeats)
        if rank == 0:
            results[name] = (alone, alone_transfer[name], both)


def rank_main(rank: int, port: int, args: argparse.Namespace, results: dict, overlaps: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    peer = 1 - rank
    numel = int(args.mib * 2**20) // 4
    x, received = torch.randn(numel), torch.empty(numel)
    cut = numel // args.chunks

    def chunked() -> None:
        for k in range(args.chunks):
            part = slice(k * cut, numel if k == args.chunks - 1 else (k + 1) * cut)
            for work in exchange(x[part], received[part], peer):
                work.wait()

    def pipelined() -> None:
        pending: list[dist.Work] = []
        for k in range(args.chunks):
            part = slice(k * cut, numel if k == args.chunks - 1 else (k + 1) * cut)
            following = exchange(x[part], received[part], peer)
            for work in pending:
                work.wait()
            pending = following
        for work in pending:
            work.wait()

    cases: list[tuple[str, Callable[[], object]]] = [
        ("ring all-reduce", lambda: dist.all_reduce(x)),
        ("neighbour exchange, one message", lambda: [w.wait() for w in exchange(x, received, peer)]),
        (f"neighbour exchange, {args.chunks} messages in turn", chunked),
        (f"neighbour exchange, {args.chunks} messages pipelined", pipelined),
        ("memcpy on one rank", lambda: received.copy_(x)),
    ]
    for name, run in cases:
        seconds = timed(run, args.repeats)
        if rank == 0:
            results[name] = seconds
    overlap_cases(x, received, peer, args.repeats, overlaps, rank)
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mib", type=float, default=382.0, help="MiB of float32 (default: the 100 M-parameter MLP)")
    parser.add_argument("--chunks", type=int, default=32, help="messages per exchange, as the gossip cuts them")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with mp.Manager() as manager:
        results, overlaps = manager.dict(), manager.dict()
        mp.spawn(rank_main, args=(port, args, results, overlaps), nprocs=2)
        print(f"{args.mib:g} MiB of float32, 2 ranks on loopback gloo, one thread each, mean of {args.repeats}")
        print()
        print("| operation | ms | ms per GiB each way |")
        print("|---|---:|---:|")
        for name, seconds in results.items():
            print(f"| {name} | {seconds * 1e3:.3f} | {seconds * 1e3 / (args.mib / 1024):.1f} |")
        print()
        print("| transfer under compute | compute alone, ms | transfer alone, ms | both at once, ms | hidden |")
        print("|---|---:|---:|---:|---:|")
        for name, (alone, transfer, both) in overlaps.items():
            hidden = (alone + transfer - both) / transfer
            print(f"| {name} | {alone * 1e3:.1f} | {transfer * 1e3:.1f} | {both * 1e3:.1f} | {hidden:.0%} |")


if __name__ == "__main__":
    main()
