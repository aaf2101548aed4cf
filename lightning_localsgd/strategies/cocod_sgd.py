"""``Trainer(strategy="cocod_sgd")``: CoCoD-SGD."""

from __future__ import annotations

from typing import Any

from lightning_localsgd.algorithms import CoCoDSGD
from lightning_localsgd.algorithms.buffers import BufferSelection
from lightning_localsgd.comm.flat import DEFAULT_BUCKET_CAP_MB
from lightning_localsgd.strategies.base import LocalUpdateStrategy


class CoCoDSGDStrategy(LocalUpdateStrategy):
    """CoCoD-SGD (Shen et al., arXiv 1906.12043): each round's all-reduce runs during that round's local steps.

    At a round's start each rank sends its model in the background and keeps training; at the round's end
    it lands on the average of the round-start models plus its own progress. The mean of the replicas moves
    exactly as Local SGD's does, with the communication overlapped.

    Args:
        period: local steps per round (tau). As with Overlap Local-SGD, the transfer is hidden when ``period``
            local steps take longer than one all-reduce of the model.
        warmup_steps: initial steps of synchronous SGD.
        bucket_cap_mb: flat bucket size; each bucket is one collective.
        buffers: which module buffers are averaged with the replicas: ``"norm"`` (default: normalisation running
            statistics), ``"all"`` floating-point buffers, ``"none"``, a regular expression on the buffer's
            qualified name, or a predicate ``(name, buffer) -> bool``. The others (masks, queues, caches, frozen
            projections) stay each rank's own and are checkpointed per rank.
        log_comm_metrics: log ``comm/*`` metrics to the trainer's loggers.
        **kwargs: :class:`LocalUpdateStrategy` / :class:`~lightning.pytorch.strategies.DDPStrategy` arguments
            (``timeout``, ``process_group_backend``, ``start_method``, ...).
    """

    strategy_names = ("cocod_sgd",)

    def __init__(
        self,
        period: int = 2,
        warmup_steps: int = 0,
        bucket_cap_mb: float = DEFAULT_BUCKET_CAP_MB,
        buffers: BufferSelection = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(CoCoDSGD(period, warmup_steps, bucket_cap_mb, buffers), **kwargs)
