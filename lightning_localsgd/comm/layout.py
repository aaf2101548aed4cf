"""How a launcher laid the ranks out (nodes x processes), and the per-node process groups built from it."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Optional

import torch.distributed as dist

from lightning_localsgd.comm.communicator import ProcessGroupCommunicator


@dataclass(frozen=True)
class WorldLayout:
    """``num_nodes`` nodes of ``processes_per_node`` ranks each, numbered node by node (as launchers do).

    ``members`` are the global ranks of the training group in its rank order (None: the whole world), and
    ``group_rank`` this process's rank in that group.
    """

    num_nodes: int
    processes_per_node: int
    group_rank: int
    members: Optional[Sequence[int]] = None

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
    grid = [[members[n * local + r] for r in range(local)] for n in range(nodes)]  # grid[node][local rank]
    node_groups = [dist.new_group(grid[n], timeout=timeout) for n in range(nodes)]
    cross_groups = [dist.new_group([grid[n][r] for n in range(nodes)], timeout=timeout) for r in range(local)]
    node, local_rank = divmod(layout.group_rank, local)
    return (
        ProcessGroupCommunicator(node_groups[node], timeout=timeout),
        ProcessGroupCommunicator(cross_groups[local_rank], timeout=timeout),
    )
