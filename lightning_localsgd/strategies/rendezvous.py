"""Process-group start-up that fails fast, with a message, when some ranks never arrive.

``torch.distributed.init_process_group`` waits for every rank of the world for the whole process-group timeout
(Lightning's default: 30 minutes) and then reports a timeout of the store. The common cause is a multi-node
configuration (``Trainer(num_nodes=2)``) started on one node only: Lightning's launcher starts the processes of
its own node, nothing starts the others. Here every rank checks in on the store first, within ``init_timeout``;
if the world is incomplete then, the error says how many ranks arrived, which are missing and how to start them.
"""

from __future__ import annotations

import os
import shlex
import sys
from datetime import timedelta
from typing import Any, Optional

import torch.distributed as dist
from lightning.fabric.utilities.distributed import _init_dist_connection

from lightning_localsgd.strategies.safety import elastic_attempt_store

ARRIVALS = "lightning_localsgd/arrivals"
LISTED_RANKS_AT_MOST = 1024  # beyond that the error gives counts only (one store query per rank)


class RanksMissingError(RuntimeError):
    """Some ranks of the world did not start (or could not reach the main process) within ``init_timeout``."""


def init_process_group(strategy: Any) -> None:
    """As Lightning's ``_init_dist_connection`` for a DDP strategy (Trainer's or Fabric's, world ranks already set),
    on a store every rank has checked in on within ``strategy.init_timeout`` (see :func:`connect_world`)."""
    env = strategy.cluster_environment
    assert env is not None
    kwargs: dict[str, Any] = {"timeout": strategy._timeout}
    kwargs["device_id"] = strategy.root_device if strategy.root_device.type != "cpu" else None
    if not dist.is_initialized():
        kwargs["store"] = connect_world(
            env.main_address,
            env.main_port,
            strategy.global_rank,
            strategy.world_size,
            strategy.num_processes,
            strategy.init_timeout,
            strategy._timeout,
            type(strategy).__name__,
        )
    _init_dist_connection(env, strategy._process_group_backend, **kwargs)


def connect_world(
    main_address: str,
    main_port: int,
    global_rank: int,
    world_size: int,
    ranks_per_node: int,
    init_timeout: timedelta,
    timeout: Optional[timedelta],
    strategy: str,
) -> dist.Store:
    """A store that every rank of the world has reached, for ``init_process_group(store=...)``.

    Its timeout is ``timeout`` (the process group's) once every rank is in. Raises :class:`RanksMissingError`
    after ``init_timeout`` if the main process (rank 0) cannot be reached or some ranks never check in.
    """
    describe = _Describe(main_address, main_port, world_size, ranks_per_node, init_timeout, strategy)
    store = elastic_attempt_store(init_timeout)  # under torchrun: its agent's store, already serving
    if store is None:
        try:
            # Rank 0 serves, as in torch's env:// rendezvous (multi-tenant: a second group in this process may
            # reuse the server), but does not wait for the others here: the check-in below does, with a count.
            store = dist.TCPStore(
                main_address,
                main_port,
                world_size,
                is_master=global_rank == 0,
                # A client's connection is retried after a random back-off, as long again: half keeps it near.
                timeout=init_timeout if global_rank == 0 else init_timeout / 2,
                wait_for_workers=False,
                multi_tenant=True,
            )
        except dist.DistNetworkError as error:
            if global_rank == 0:
                raise
            raise RanksMissingError(describe.unreachable(global_rank)) from error
    check_in(store, global_rank, world_size, describe)
    store.set_timeout(timeout or timedelta(minutes=30))
    return store


def check_in(store: dist.Store, global_rank: int, world_size: int, describe: _Describe) -> None:
    """Mark this rank arrived; wait until all ``world_size`` ranks have, or raise :class:`RanksMissingError`."""
    store.set(f"{ARRIVALS}/rank{global_rank}", "1")
    if store.add(f"{ARRIVALS}/count", 1) >= world_size:
        store.set(f"{ARRIVALS}/all", "1")  # the last rank in releases everyone at once
    try:
        store.wait([f"{ARRIVALS}/all"], describe.timeout)
    except dist.DistError as error:  # a timeout, or the main process gave up first and its store is gone
        raise RanksMissingError(describe.missing(store, global_rank)) from error


class _Describe:
    """The error messages: what was expected, what arrived, and how to start the missing processes."""

    def __init__(
        self,
        main_address: str,
        main_port: int,
        world_size: int,
        ranks_per_node: int,
        init_timeout: timedelta,
        strategy: str,
    ) -> None:
        self.address = f"{main_address}:{main_port}"
        self.world_size = world_size
        self.ranks_per_node = max(1, ranks_per_node)
        self.num_nodes = max(1, world_size // self.ranks_per_node)
        self.timeout = init_timeout
        self.seconds = f"{init_timeout.total_seconds():g}"
        self.strategy = strategy

    def expected(self) -> str:
        return (
            f"expected: {self.world_size} processes, `Trainer(num_nodes={self.num_nodes}, "
            f"devices={self.ranks_per_node})`"
        )

    def unreachable(self, global_rank: int) -> str:
        return (
            f"{self.strategy}: rank {global_rank} could not reach the main process (rank 0) at {self.address} within "
            f"`init_timeout={self.seconds}` s; {self.expected()}. Rank 0 was not started, failed before it listened, "
            f"or MASTER_ADDR/MASTER_PORT do not point at it. {self.how_to_start()}"
        )

    def missing(self, store: dist.Store, global_rank: int) -> str:
        try:
            arrived = store.add(f"{ARRIVALS}/count", 0)
            listed = self.world_size <= LISTED_RANKS_AT_MOST
            present = [r for r in range(self.world_size) if store.check([f"{ARRIVALS}/rank{r}"])] if listed else []
        except dist.DistError:
            return (
                f"{self.strategy}: rank {global_rank} waited for the other ranks and the main process (rank 0) stopped "
                f"waiting first: not every rank arrived within `init_timeout={self.seconds}` s; {self.expected()}. "
                f"See rank 0's error for which ranks came. {self.how_to_start()}"
            )
        what = f"only {arrived} of {self.world_size} ranks arrived within `init_timeout={self.seconds}` s"
        if present:
            absent = sorted(set(range(self.world_size)) - set(present))
            nodes = sorted({rank // self.ranks_per_node for rank in absent})
            what += f" (missing: {_ranges(absent)}, on node(s) {_ranges(nodes)})"
        return f"{self.strategy} (rank {global_rank}): {what}; {self.expected()}. {self.how_to_start()}"

    def how_to_start(self) -> str:
        if os.environ.get("TORCHELASTIC_RUN_ID") is not None:
            return (
                "Under torchrun, run one `torchrun` per node with the same `--nnodes`, `--nproc-per-node`, "
                "`--master-addr` and `--master-port` and `--node-rank` 0 to N-1; raise `init_timeout` if nodes start "
                "far apart."
            )
        if os.environ.get("SLURM_JOB_ID") is not None:
            return (
                "Under SLURM, `srun` starts every task: ask for `--nodes` equal to `num_nodes` and `--ntasks-per-node` "
                "equal to `devices`; raise `init_timeout` if tasks start far apart."
            )
        if self.num_nodes == 1:
            return "A process of this node stopped before it reached start-up: see its output above."
        script = shlex.join(sys.argv) if sys.argv and sys.argv[0].endswith(".py") else "train.py ..."
        commands = [
            f"`torchrun --nnodes {self.num_nodes} --nproc-per-node {self.ranks_per_node} --node-rank {node} "
            f"--master-addr 127.0.0.1 --master-port 29500 {script}`"
            for node in range(min(self.num_nodes, 3))
        ]
        if self.num_nodes > 3:
            commands.append(f"... up to `--node-rank {self.num_nodes - 1}`")
        return (
            "Lightning's launcher starts the processes of its own node only: start every node. On one machine, one "
            f"command per node, each in its own shell: {'; '.join(commands)}. On several machines, give node 0's "
            "address as `--master-addr`. Raise `init_timeout` if nodes start far apart."
        )


def _ranges(values: list[int]) -> str:
    """``[0, 1, 2, 5]`` -> ``"0-2, 5"``."""
    parts: list[str] = []
    start = previous = None
    for value in values:
        if previous is not None and value == previous + 1:
            previous = value
            continue
        if start is not None:
            parts.append(f"{start}" if start == previous else f"{start}-{previous}")
        start = previous = value
    if start is not None:
        parts.append(f"{start}" if start == previous else f"{start}-{previous}")
    return ", ".join(parts)
