"""``Trainer(strategy="local_sgd")``: Local SGD with post-local warm-up."""

from __future__ import annotations

from typing import Any

from lightning_localsgd.algorithms import LocalSGD
from lightning_localsgd.algorithms.buffers import BufferSelection
from lightning_localsgd.comm.flat import DEFAULT_BUCKET_CAP_MB
from lightning_localsgd.strategies.base import LocalUpdateStrategy


class LocalSGDStrategy(LocalUpdateStrategy):
    """Local SGD (Stich, arXiv 1805.09767) with post-local SGD warm-up (Lin et al., arXiv 1808.07217).

    Args:
        period: optimizer steps between parameter averages. Larger means fewer rounds; on identical data
            16-32 keeps accuracy for most vision models, theory allows up to about sqrt(total steps / ranks).
        warmup_steps: initial steps of synchronous SGD; post-local SGD switches to local steps at the first
            learning-rate decay.
        first_period_one_step: round right after the first local step, then every ``period`` steps (the phase
            of torch's ``PeriodicModelAverager``). False: rounds after local steps ``period``, 2 ``period``, ...
        bucket_cap_mb: flat bucket size; each bucket is one collective.
        buffers: which module buffers are averaged with the replicas: ``"norm"`` (default: normalisation running
            statistics), ``"all"`` floating-point buffers, ``"none"``, a regular expression on the buffer's
            qualified name, or a predicate ``(name, buffer) -> bool``. The others (masks, queues, caches, frozen
            projections) stay each rank's own and are checkpointed per rank.
        log_comm_metrics: log ``comm/*`` metrics to the trainer's loggers.
        **kwargs: :class:`LocalUpdateStrategy` / :class:`~lightning.pytorch.strategies.DDPStrategy` arguments
            (``timeout``, ``process_group_backend``, ``start_method``, ...).
    """

    strategy_names = ("local_sgd",)

    def __init__(
        self,
        period: int = 16,
        warmup_steps: int = 0,
        first_period_one_step: bool = True,
        bucket_cap_mb: float = DEFAULT_BUCKET_CAP_MB,
        buffers: BufferSelection = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(LocalSGD(period, warmup_steps, first_period_one_step, bucket_cap_mb, buffers), **kwargs)
