"""Run a function, or an end-to-end script, in N real processes over gloo, for tests that need torch.distributed."""

from __future__ import annotations

import io
import os
import runpy
import socket
import subprocess
import sys
import time
import traceback
import uuid
import warnings as warnings_module
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


# Children fork from one server that imported these once: a spawned child or a script re-run by Lightning's launcher
# spends about 6 s of CPU importing torch and Lightning, longer than most of the runs below take to train.
_PRELOAD = ["torch", "torch.distributed", "lightning.pytorch", "lightning_localsgd", "dist_utils"]


FAILURE_GRACE_SECONDS = 5.0


def _context() -> Any:
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(_PRELOAD)
    return ctx


def run_processes(world: int, fn: Callable[..., Any], *args: Any, timeout: float = 120.0) -> list[Any]:
    """Run ``fn(rank, *args)`` in ``world`` gloo processes; return the results in rank order."""
    ctx = _context()
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


def _script_rank(script: str, argv: list[str], out: str, env: dict[str, str], log: str, warnings: str) -> None:
    """One rank of ``run_ranks``: the script as ``__main__``, output in ``log``; exits with the script's code."""
    with open(log, "w") as sink:
        os.dup2(sink.fileno(), 1)
        os.dup2(sink.fileno(), 2)
    os.environ.update(env)
    os.chdir(out)
    sys.argv = [script, *argv]
    sys.path.insert(0, str(Path(script).parent))
    warnings_module.resetwarnings()
    warnings_module.simplefilter(warnings)  # as PYTHONWARNINGS would at start-up
    code = 0
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
    except BaseException:
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def run_ranks(
    script: Path,
    out: Path,
    *args: str,
    world: int = 2,
    nodes: int = 1,
    warnings: str = "default",
    timeout: float = 300.0,
    cyclic: bool = False,
) -> subprocess.CompletedProcess:
    """``run_script`` with the ranks started as torchrun would: ``world`` processes, each told its rank by the
    environment (Lightning then launches nothing itself), forked from a server that has Lightning imported.

    ``nodes``: the ranks pose as that many nodes of ``world / nodes`` ranks each (node-major, as launchers number
    them; ``cyclic=True``: round-robin over the nodes, as SLURM's ``--distribution=cyclic``). The returned process's
    ``returncode`` is the first non-zero rank's (0 when all succeeded; -9 for a rank killed at the timeout),
    ``stdout`` holds every rank's output one after another and ``stderr`` the same.
    """
    out.mkdir(parents=True, exist_ok=True)
    ctx = _context()
    env = {
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
        "WORLD_SIZE": str(world),
        "LOCAL_WORLD_SIZE": str(world // nodes),
        "TORCHELASTIC_RUN_ID": uuid.uuid4().hex,
    }
    logs = [out / f"rank{r}.log" for r in range(world)]
    procs = []
    for r in range(world):
        node, local_rank = (r % nodes, r // nodes) if cyclic else divmod(r, world // nodes)
        rank_env = {**env, "RANK": str(r), "LOCAL_RANK": str(local_rank), "GROUP_RANK": str(node)}
        argv = ["--out", str(out), *args]
        proc = ctx.Process(target=_script_rank, args=(str(script), argv, str(out), rank_env, str(logs[r]), warnings))
        proc.start()
        procs.append(proc)
    # As torchrun's agent and Lightning's launcher do: once a rank failed, the others get a moment to fail
    # with their own message, then are stopped (a stalled rank would otherwise run into the timeout).
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(proc.is_alive() for proc in procs):
        if any(proc.exitcode not in (None, 0) for proc in procs):
            deadline = min(deadline, time.monotonic() + FAILURE_GRACE_SECONDS)
        time.sleep(0.05)
    for proc in procs:
        if proc.is_alive():
            proc.kill()
        proc.join()
    codes = [proc.exitcode or 0 for proc in procs]
    output = "".join(log.read_text() for log in logs if log.exists())
    code = next((c for c in codes if c != 0), 0)
    return subprocess.CompletedProcess([str(script), *args], code, output, output)


# What a process that aborts at interpreter exit prints (comm/exit_drain.py says why and how it is avoided).
EXIT_ABORT = "terminate called without an active exception"
