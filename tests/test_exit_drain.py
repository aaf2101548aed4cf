"""A finished run exits with code 0: torch's gloo workers are left to finish before the interpreter shuts down.

Without the exit hook, a script whose last collectives gather temporaries aborted at exit in about half of the 2-rank
launches here ("terminate called without an active exception", SIGABRT; see ``comm/exit_drain.py``), so six clean
launches in a row are what the hook buys: by chance, about 3 in 100 without it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from dist_utils import EXIT_ABORT, free_port, run_processes

from lightning_localsgd.comm import exit_drain

# Ends the way Lightning's fit does, on object collectives whose tensors the caller drops at once: nothing between
# the last of them and the interpreter's exit.
_SCRIPT = textwrap.dedent(
    """
    import torch
    import torch.distributed as dist

    from lightning_localsgd.comm.communicator import ProcessGroupCommunicator

    dist.init_process_group("gloo")
    ProcessGroupCommunicator().all_reduce_mean_([torch.ones(10)])
    print("started", flush=True)
    for _ in range(50):
        dist.all_reduce(torch.ones(1000))
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, {"rank": dist.get_rank()})
    """
)

LAUNCHES = 6


def _launch(script: Path, world: int) -> list[subprocess.CompletedProcess]:
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": str(world)}
    env["OMP_NUM_THREADS"] = "1"
    procs = [
        subprocess.Popen(
            [sys.executable, str(script)],
            env={**env, "RANK": str(rank)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in range(world)
    ]
    finished = []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=120)
            finished.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()  # a rank stuck after a timeout: nothing left running
    return finished


def test_runs_that_end_on_gathered_temporaries_exit_cleanly(tmp_path: Path) -> None:
    script = tmp_path / "ends_on_gathers.py"
    script.write_text(_SCRIPT)
    for launch in range(LAUNCHES):
        for rank, proc in enumerate(_launch(script, world=2)):
            assert "started" in proc.stdout, proc.stderr[-2000:]
            assert EXIT_ABORT not in proc.stderr, f"launch {launch}, rank {rank} aborted at exit"
            assert proc.returncode == 0, proc.stderr[-2000:]


def _idle_after_collectives(rank: int) -> tuple[object, float]:
    import torch
    import torch.distributed as dist

    for _ in range(5):
        dist.all_reduce(torch.ones(10))
    return exit_drain.torch_threads(), exit_drain.wait_for_torch_threads_to_idle()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_the_wait_sees_the_gloo_workers_and_returns_once_they_are_idle() -> None:
    for threads, waited in run_processes(2, _idle_after_collectives):
        assert threads is not None and [name for name, _ in threads].count("pt_gloo_runloop") >= 2, threads
        assert exit_drain._SHORTEST_WAIT_S <= waited < exit_drain._LONGEST_WAIT_S
