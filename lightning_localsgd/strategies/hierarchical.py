"""``Trainer(strategy="hierarchical_local_sgd")``: Local SGD with a fast level within each node and a slow one
across nodes."""

from __future__ import annotations

from typing import Any

from lightning_localsgd.algorithms import HierarchicalLocalSGD
from lightning_localsgd.algorithms.buffers import BufferSelection
from lightning_localsgd.comm.flat import DEFAULT_BUCKET_CAP_MB
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
