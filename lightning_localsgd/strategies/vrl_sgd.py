"""``Trainer(strategy="vrl_sgd")``: VRL-SGD, Local SGD with a variance-reduction correction."""

from __future__ import annotations

from typing import Any

from lightning_localsgd.algorithms import VRLSGD
from lightning_localsgd.algorithms.buffers import BufferSelection
from lightning_localsgd.comm.flat import DEFAULT_BUCKET_CAP_MB
from lightning_localsgd.strategies.base import LocalUpdateStrategy


class VRLSGDStrategy(LocalUpdateStrategy):
    """VRL-SGD (Liang et al., arXiv 1912.12844): Local SGD whose ranks correct their steps by a control variate.

    Use it when the data differ across ranks (label-skewed shards, per-site data): it keeps the accuracy of
    synchronous SGD at periods where Local SGD degrades, at the same communication cost.

    Args:
        period: optimizer steps between rounds (k; the paper uses 20 for LeNet/MNIST and 50 for TextCNN).
        warmup_steps: initial steps of synchronous SGD before local steps begin.
        first_period_one_step: VRL-SGD-W: a one-step first period, so the correction starts near each rank's
            gradient bias before long periods begin. Helps when ``period`` is large and data very skewed.
        bucket_cap_mb: flat bucket size; each bucket is one collective.
        buffers: which module buffers are averaged with the replicas: ``"norm"`` (default: normalisation running
            statistics), ``"all"`` floating-point buffers, ``"none"``, a regular expression on the buffer's
            qualified name, or a predicate ``(name, buffer) -> bool``. The others (masks, queues, caches, frozen
            projections) stay each rank's own and are checkpointed per rank.
        log_comm_metrics: log ``comm/*`` metrics to the trainer's loggers.
        **kwargs: :class:`LocalUpdateStrategy` / :class:`~lightning.pytorch.strategies.DDPStrategy` arguments
            (``timeout``, ``process_group_backend``, ``start_method``, ...).

    Works with any optimizer whose parameter groups have an ``lr``: the correction is added after the
    optimizer's own step, so momentum, weight decay and adaptive scaling stay the optimizer's business.
    """

    strategy_names = ("vrl_sgd",)

    def __init__(
        self,
        period: int = 20,
        warmup_steps: int = 0,
        first_period_one_step: bool = False,
        bucket_cap_mb: float = DEFAULT_BUCKET_CAP_MB,
        buffers: BufferSelection = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(VRLSGD(period, warmup_steps, first_period_one_step, bucket_cap_mb, buffers), **kwargs)
