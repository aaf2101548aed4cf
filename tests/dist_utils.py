"""Run a function in N real processes over gloo, for tests that need torch.distributed itself."""

from __future__ import annotations

import io
import os
import socket
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, fn: Callable[..., Any], args: tuple, queue: Any) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        buffer = io.BytesIO()
        torch.save(fn(rank, *args), buffer)  # plain bytes: shared-memory tensors die with the child
        queue.put((rank, buffer.getvalue()))
    finally:
        dist.destroy_process_group()


def run_processes(world: int, fn: Callable[..., Any], *args: Any, timeout: float = 120.0) -> list[Any]:
    """Run ``fn(rank, *args)`` in ``world`` gloo processes; return the results in rank order."""
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    port = free_port()
    procs = [ctx.Process(target=_entry, args=(r, world, port, fn, args, queue)) for r in range(world)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(timeout)
    for proc in procs:
        if proc.is_alive():
            proc.kill()
    codes = [proc.exitcode for proc in procs]
    if any(code != 0 for code in codes):
        raise RuntimeError(f"worker processes exited with codes {codes}")
    results: list[Any] = [None] * world
    while not queue.empty():
        rank, payload = queue.get()
        results[rank] = torch.load(io.BytesIO(payload), weights_only=False)
    return results
