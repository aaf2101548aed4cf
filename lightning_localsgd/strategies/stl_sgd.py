"""``Trainer(strategy="stl_sgd")``: STL-SGD, Local SGD in stages of growing length and period, shrinking lr."""

from __future__ import annotations

from typing import Any, Optional

import lightning.pytorch as pl
from typing_extensions import override

from lightning_localsgd.algorithms import STLSGD
from lightning_localsgd.algorithms.buffers import BufferSelection
from lightning_localsgd.comm.flat import DEFAULT_BUCKET_CAP_MB
from lightning_localsgd.strategies.base import LocalUpdateStrategy


class STLSGDStrategy(LocalUpdateStrategy):
    """STL-SGD (Shen et al., arXiv 2006.06377): stage s = 1, 2, ... lasts ``first_stage_steps * 2**(s-1)`` steps
    (rounded up to whole periods) with period ``round(first_period * growth**(s-1))`` (the nearest integer, an exact
    half to the even one, from ``first_period`` each stage: 4, 6, 8, 11, 16, ... for 4 and x sqrt(2)), and every stage
    boundary (a round) multiplies the learning rates of your own optimizers by ``lr_decay``; ``configure_optimizers``
    stays as it is. A second ``fit`` on the same Trainer continues the stages and their learning rate.

    An LR scheduler of your own would overwrite the stage's learning rate at its next step, so with
    ``lr_decay != 1`` the strategy refuses to start when the LightningModule returns one; pass ``lr_decay=1.0`` to
    keep your scheduler and use the stages for the period only.

    Args:
        first_stage_steps: T_1, local steps of the first stage (each next stage is twice as long).
        first_period: k_1, the first stage's period.
        period_growth: ``"non_identical"`` (x sqrt(2) per stage, default), ``"identical"`` (x2) or a number >= 1;
            non-integer periods are rounded as above.
        lr_decay: learning-rate factor at each stage boundary (0.5).
        proximal: gamma of the non-convex variant's proximal term (1 / (2 gamma)) ||x - x_s||^2, or None.
        warmup_steps, bucket_cap_mb, buffers: as for :class:`LocalSGDStrategy`.
        **kwargs: :class:`LocalUpdateStrategy` / :class:`~lightning.pytorch.strategies.DDPStrategy` arguments.
    """

    strategy_names = ("stl_sgd",)

    def __init__(
        self,
        first_stage_steps: int = 256,
        first_period: int = 4,
        period_growth: Any = "non_identical",
        lr_decay: float = 0.5,
        proximal: Optional[float] = None,
        warmup_steps: int = 0,
        bucket_cap_mb: float = DEFAULT_BUCKET_CAP_MB,
        buffers: BufferSelection = None,
        **kwargs: Any,
    ) -> None:
        algorithm = STLSGD(
            first_stage_steps, first_period, period_growth, lr_decay, proximal, warmup_steps, bucket_cap_mb, buffers
        )
        super().__init__(algorithm, **kwargs)

    @override
    def setup(self, trainer: pl.Trainer) -> None:
        super().setup(trainer)
        assert isinstance(self.algorithm, STLSGD)
        if self.algorithm.lr_decay != 1.0 and trainer.lr_scheduler_configs:
            names = [type(config.scheduler).__name__ for config in trainer.lr_scheduler_configs]
            raise ValueError(
                f"STL-SGD sets the learning rate at every stage boundary (lr_decay={self.algorithm.lr_decay}), and the "
                f"LR scheduler(s) {names} returned by `configure_optimizers` would overwrite it. Remove the scheduler, "
                "or pass `lr_decay=1.0` to keep it and let the stages change the period only."
            )
