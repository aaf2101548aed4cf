"""``Trainer(strategy="hierarchical_local_sgd")``: Local SGD with a fast level within each node and a slow one
across nodes."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import torch.distributed as dist
from typing_extensions import override

from lightning_localsgd.algorithms import HierarchicalLocalSGD
from lightning_localsgd.algorithms.buffers import BufferSelection
from lightning_localsgd.comm import ProcessGroupCommunicator
from lightning_localsgd.comm.flat import DEFAULT_BUCKET_CAP_MB
from lightning_localsgd.driving import WorldLayout
from lightning_localsgd.strategies.base import LocalUpdateStrategy


class HierarchicalLocalSGDStrategy(LocalUpdateStrategy):
    """Hierarchical Local SGD (Lin et al., arXiv 1808.07217): average within each node every ``intra_period`` steps
    over the fast local links, and over every rank every ``inter_period`` steps, crossing the slow link once per node.

    The nodes are the launcher's: ``Trainer(num_nodes=..., devices=...)`` under SLURM, torchrun or Lightning's own
    launcher, ranks numbered node by node. ``comm/intra_node_mb_sent`` and ``comm/inter_node_mb_sent`` count the two
    levels apart (``comm/mb_sent`` holds the world collectives: the guard's flags, consensus, warm-up).

    Args:
        intra_period: steps between averages within a node.
        inter_period: steps between averages over every rank; a multiple of ``intra_period``.
        warmup_steps, bucket_cap_mb, buffers: as for :class:`LocalSGDStrategy`.
        **kwargs: :class:`LocalUpdateStrategy` / :class:`~lightning.pytorch.strategies.DDPStrategy` arguments.
    """

    strategy_names = ("hierarchical_local_sgd",)

    def __init__(
        self,
        intra_period: int = 4,
        inter_period: int = 32,
        warmup_steps: int = 0,
        bucket_cap_mb: float = DEFAULT_BUCKET_CAP_MB,
        buffers: BufferSelection = None,
        **kwargs: Any,
    ) -> None:
        algorithm = HierarchicalLocalSGD(intra_period, inter_period, warmup_steps, bucket_cap_mb, buffers)
        super().__init__(algorithm, **kwargs)

    @override
    def prepare_algorithm(self, layout: WorldLayout) -> None:
        assert isinstance(self.algorithm, HierarchicalLocalSGD)
        self.algorithm.set_node_groups(*node_communicators(layout, self.collective_timeout, type(self).__name__))


def node_communicators(
    layout: WorldLayout, timeout: timedelta, strategy: str
) -> tuple[ProcessGroupCommunicator, ProcessGroupCommunicator]:
    """One group per node and one per local rank across nodes; every rank creates all of them, in one order."""
    nodes, local = layout.num_nodes, layout.processes_per_node
    if nodes * local != layout.world_size:
        raise ValueError(f"{strategy}: {nodes} nodes x {local} processes do not make the world of {layout.world_size}.")
    node_groups = [dist.new_group([n * local + r for r in range(local)], timeout=timeout) for n in range(nodes)]
    cross_groups = [dist.new_group([n * local + r for n in range(nodes)], timeout=timeout) for r in range(local)]
    node, local_rank = divmod(layout.global_rank, local)
    return (
        ProcessGroupCommunicator(node_groups[node], timeout=timeout),
        ProcessGroupCommunicator(cross_groups[local_rank], timeout=timeout),
    )
