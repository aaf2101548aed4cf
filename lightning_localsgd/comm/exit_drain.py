"""Let torch's worker threads finish before the interpreter shuts down.

A gloo collective is run by one of the process group's worker threads (``pt_gloo_runloop``). When it finishes,
``wait()`` returns in the main thread, and only afterwards does the worker drop its reference to the collective's
tensors. A tensor whose Python object the caller has already released (Lightning's ``broadcast`` and
``all_gather_object``, DCP's planning, any ``dist.all_reduce(torch.tensor(...))``) then has its Python object freed
by that worker, which takes the GIL to do so. If the main thread has meanwhile reached interpreter finalization, the
GIL cannot be taken any more: CPython ends the worker with ``pthread_exit``, whose unwinding through a ``noexcept``
destructor aborts the process ("terminate called without an active exception", SIGABRT) after a run that succeeded.
Reported upstream as pytorch/pytorch#190489; seen here in about one launch in ten under load (backtrace:
``take_gil`` <- ``TensorImpl::decref_pyobject`` <- ``~AsyncAllgatherWork`` <- ``ProcessGroupGloo::runLoop``).

``destroy_process_group`` does not help while anything (a ``DeviceMesh``, FSDP, a communicator) still references a
group: its threads keep running. What does help is to release the GIL at exit until those workers are idle, which is
what the ``atexit`` hook installed here does. It runs before finalization and before the ``atexit`` hooks registered
earlier (``atexit`` runs them last-in, first-out), and returns as soon as torch's threads (named ``pt_...``) have
been seen off the CPU twice with the GIL released in between, at most after ``_LONGEST_WAIT_S``.
"""

from __future__ import annotations

import atexit
import os
import time
from typing import Optional

_TORCH_THREAD_PREFIX = "pt_"  # torch names its native threads so: pt_gloo_runloop, pt_nccl_watchdg, pt_autograd_0
_POLL_S = 0.005
_SHORTEST_WAIT_S = 0.02  # even where /proc says nothing: a worker that wants the GIL gets it within this
_LONGEST_WAIT_S = 1.0
_QUIET_POLLS_NEEDED = 2

_installed = False


def install_exit_drain() -> None:
    """Register the exit hook once per process (idempotent), wherever the process will run gloo collectives; in one
    that never does, it only adds the shortest wait to its exit."""
    global _installed
    if not _installed:
        atexit.register(wait_for_torch_threads_to_idle)
        _installed = True


def torch_threads() -> Optional[list[tuple[str, str]]]:
    """Torch's native threads in this process as (name, state) pairs, state as /proc gives it (``R``: on or waiting
    for a CPU, ``S``: blocked); ``None`` where /proc cannot tell."""
    try:
        tids = os.listdir("/proc/self/task")
    except OSError:
        return None
    threads = []
    for tid in tids:
        try:
            with open(f"/proc/self/task/{tid}/stat") as stat_file:
                stat = stat_file.read()
        except OSError:
            continue  # the thread ended meanwhile
        # "<tid> (<name>) <state> ...": the name may itself hold spaces and parentheses, so cut at the last ')'.
        name_end = stat.rfind(")")
        name = stat[stat.find("(") + 1 : name_end]
        if name.startswith(_TORCH_THREAD_PREFIX):
            threads.append((name, stat[name_end + 2 : name_end + 3]))
    return threads


def wait_for_torch_threads_to_idle(longest_wait_s: float = _LONGEST_WAIT_S) -> float:
    """Sleep (the GIL released) until torch's threads are idle; returns the seconds waited.

    A worker blocked on the GIL is woken when the main thread sleeps, so it shows as running until it is done: two
    quiet polls in a row, with sleeps between, mean no worker is left mid-cleanup.
    """
    start = time.monotonic()
    quiet = 0
    while True:
        time.sleep(_POLL_S)
        waited = time.monotonic() - start
        threads = torch_threads()
        running = None if threads is None else sum(state == "R" for _, state in threads)
        quiet = quiet + 1 if running == 0 else 0
        if waited >= longest_wait_s:
            return waited
        if waited >= _SHORTEST_WAIT_S and (running is None or quiet >= _QUIET_POLLS_NEEDED):
            return waited
