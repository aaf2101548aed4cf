"""How a launcher laid the ranks out (nodes x processes), and the per-node process groups built from it."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Optional

import torch.distributed as dist

from lightning_localsgd.comm.communicator import ProcessGroupCommunicator


@dataclass(frozen=True)
class WorldLayout:
    """``num_nodes`` nodes of ``processes_per_node`` ranks each, numbered node by node (as launchers do).

    ``members`` are the global ranks of the training group in its rank order (None: the whole world), and
    ``group_rank`` this process's rank in that group. ``node_rank``, when known, is the node the cluster environment
    (SLURM, torchrun, ...) says this process runs on: :func:`node_communicators` then checks that the numbering
    really is node by node before building per-node groups on that assumption.
    """

    num_nodes: int
    processes_per_node: int
    group_rank: int
    members: Optional[Sequence[int]] = None
    node_rank: Optional[int] = None

    @property
    def world_size(self) -> int:
        return self.num_nodes * self.processes_per_node


def node_communicators(
    layout: WorldLayout, timeout: timedelta, label: str
) -> tuple[ProcessGroupCommunicator, ProcessGroupCommunicator]:
    """Collective: one group per node and one per local rank across nodes, every rank creating all of them in one
    order. Returns this rank's node communicator and its cross-node one."""
    nodes, local = layout.num_nodes, layout.processes_per_node
    members = list(layout.members) if layout.members is not None else list(range(dist.get_world_size()))
    if nodes * local != len(members):
        raise ValueError(f"{label}: {nodes} nodes x {local} processes do not make the world of {len(members)}.")
    if layout.node_rank is not None and layout.members is None:
        node_ranks: list[Any] = [None] * len(members)
        dist.all_gather_object(node_ranks, layout.node_rank)  # every rank judges the same list: all raise or none
        check_node_major(node_ranks, local, label)
    grid = [[members[n * local + r] for r in range(local)] for n in range(nodes)]  # grid[node][local rank]
    node_groups = [dist.new_group(grid[n], timeout=timeout) for n in range(nodes)]
    cross_groups = [dist.new_group([grid[n][r] for n in range(nodes)], timeout=timeout) for r in range(local)]
    node, local_rank = divmod(layout.group_rank, local)
    return (
        ProcessGroupCommunicator(node_groups[node], timeout=timeout),
        ProcessGroupCommunicator(cross_groups[local_rank], timeout=timeout),
    )


def check_node_major(node_ranks: Sequence[int], processes_per_node: int, label: str) -> None:
    """Refuse a rank numbering that is not node by node: ``node_ranks[g]``, the node global rank ``g`` runs on
    (as its cluster environment reports it), must be ``g // processes_per_node``. Per-node groups are built from
    the numbering; under a cyclic numbering (SLURM ``--distribution=cyclic``) a "node" group would span machines
    and every intra-node round would cross the slow link it is meant to avoid."""
    misplaced = [(rank, node) for rank, node in enumerate(node_ranks) if node != rank // processes_per_node]
    if not misplaced:
        return
    shown = ", ".join(f"rank {rank} on node {node}" for rank, node in misplaced[:4])
    more = f" and {len(misplaced) - 4} more" if len(misplaced) > 4 else ""
    raise ValueError(
        f"{label}: the ranks are not numbered node by node ({shown}{more}; expected rank r on node "
        f"r // {processes_per_node}), so per-node groups would span machines. Start the ranks node-major: under "
        "SLURM use `--distribution=block` (the default) rather than `cyclic` or a custom rank order; torchrun and "
        "Lightning's launcher number node by node already."
    )
