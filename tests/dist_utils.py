"""Run a function in N real processes over gloo, for tests that need torch.distributed itself."""

from __future__ import annotations

import io
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
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
    # Read the results before joining: a child blocks on a full pipe until its result is read.
    results: list[Any] = [None] * world
    deadline = time.monotonic() + timeout
    received = 0
    while received < world and time.monotonic() < deadline:
        if not queue.empty():
            rank, payload = queue.get()
            results[rank] = torch.load(io.BytesIO(payload), weights_only=False)
            received += 1
        elif not any(proc.is_alive() for proc in procs) and queue.empty():
            break
        else:
            time.sleep(0.01)
    for proc in procs:
        proc.join(max(0.0, deadline - time.monotonic()))
    for proc in procs:
        if proc.is_alive():
            proc.kill()
    codes = [proc.exitcode for proc in procs]
    if any(code != 0 for code in codes):
        raise RuntimeError(f"worker processes exited with codes {codes}")
    return results


def run_script(
    script: Path, out: Path, *args: str, warnings: str = "default", timeout: float = 300.0
) -> subprocess.CompletedProcess:
    """Run an end-to-end script (``tests/e2e/*.py``) in ``out`` as a user would: ``python script --out out ...``.

    Lightning's launcher starts the other ranks by re-running the script. Returns the finished process (the
    caller checks its exit code: some runs are meant to fail).
    """
    out.mkdir(parents=True, exist_ok=True)
    return subprocess.run(
        [sys.executable, str(script), "--out", str(out), *args],
        cwd=out,
        env={**os.environ, "PYTHONWARNINGS": warnings},
        capture_output=True,
        text=True,
        timeout=timeout,
    )
