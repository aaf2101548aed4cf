"""``Trainer(strategy="vrl_sgd")``: VRL-SGD, Local SGD with a variance-reduction correction."""

from __future__ import annotations

from datetime import timedelta
from typing import Any, Literal, Optional

import lightning.pytorch as pl
from lightning.fabric.plugins import CheckpointIO, ClusterEnvironment
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.pytorch.plugins.precision import Precision

from lightning_localsgd.algorithms import VRLSGD
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
        log_comm_metrics: log ``comm/*`` metrics to the trainer's loggers.
        Other arguments: as :class:`~lightning.pytorch.strategies.DDPStrategy`.

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
        log_comm_metrics: bool = True,
        accelerator: Optional[pl.accelerators.Accelerator] = None,
        parallel_devices: Optional[list[Any]] = None,
        cluster_environment: Optional[ClusterEnvironment] = None,
        checkpoint_io: Optional[CheckpointIO] = None,
        precision_plugin: Optional[Precision] = None,
        process_group_backend: Optional[str] = None,
        timeout: Optional[timedelta] = default_pg_timeout,
        start_method: Literal["popen", "spawn", "fork", "forkserver"] = "popen",
    ) -> None:
        super().__init__(
            VRLSGD(period, warmup_steps, first_period_one_step, bucket_cap_mb),
            log_comm_metrics=log_comm_metrics,
            accelerator=accelerator,
            parallel_devices=parallel_devices,
            cluster_environment=cluster_environment,
            checkpoint_io=checkpoint_io,
            precision_plugin=precision_plugin,
            process_group_backend=process_group_backend,
            timeout=timeout,
            start_method=start_method,
        )
