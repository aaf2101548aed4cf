"""STL-SGD: Local SGD in stages whose length and period grow while the learning rate shrinks.

Paper: "STL-SGD: Speeding Up Local SGD with Stagewise Communication Period" (Shen et al., AAAI 2021, arXiv
2006.06377).

Stage s = 1, 2, ... runs Local SGD from x_s (the averaged model at the stage's start) for T_s steps with learning
rate lr_s and period k_s, where (the paper's constants; configurable)
    T_{s+1} = 2 T_s,   k_{s+1} = 2 k_s (identical data) or sqrt(2) k_s (non-identical data),   lr_{s+1} = lr_s / 2.
A period is a whole number of steps: stage s's (0-based) is round(k_1 * growth**s), the nearest integer with halves
to even (Python's round), computed from k_1 each stage so that rounding never compounds (k_1 = 4, x sqrt(2): 4, 6,
8, 11, 16, 23, 32). Stages end at rounds (T_s is rounded up to whole periods), so every rank changes stage after the
same round. The learning rates are those of the user's own optimizers, multiplied by ``lr_decay`` at every stage
boundary. The non-convex variant adds the proximal term (1 / (2 gamma)) ||x - x_s||^2 to each stage's objective:
its gradient (x - x_s) / gamma is added to every gradient before the optimizer steps.

Claimed rounds for strongly convex / PL objectives: O(N log T) on identical data, O(sqrt(N T)) on non-identical data.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Optional

import torch
from torch.optim import Optimizer

from lightning_localsgd._validation import check_int, check_positive_float
from lightning_localsgd.algorithms.buffers import BufferSelection
from lightning_localsgd.algorithms.periodic import PeriodicAlgorithm
from lightning_localsgd.algorithms.rank_state import StateInit
from lightning_localsgd.algorithms.schedule import StagewiseSchedule
from lightning_localsgd.comm.flat import DEFAULT_BUCKET_CAP_MB

PERIOD_GROWTH = {"identical": 2.0, "non_identical": math.sqrt(2.0)}
# The param-group entry naming the stage a group's "lr" belongs to (0 where absent: configure_optimizers' rates).
STAGE_KEY = "stl_sgd_stage"


class STLSGD(PeriodicAlgorithm):
    """STL-SGD (see the module docstring).

    Args:
        first_stage_steps: T_1, local steps of the first stage.
        first_period: k_1, the first stage's period.
        period_growth: ``"identical"`` (x2 per stage), ``"non_identical"`` (x sqrt(2), the default: safe on any
            data) or a number of at least 1. Stage s's period is ``round(first_period * period_growth**s)`` (nearest
            integer, halves to even), computed from ``first_period`` each stage.
        lr_decay: factor applied to every learning rate of the user's optimizers at each stage boundary (0.5; 1
            leaves the learning rates, and an LR scheduler, alone).
        proximal: gamma of the non-convex variant's proximal term, or None (default) for none.
        warmup_steps, bucket_cap_mb, buffers: as :class:`PeriodicAlgorithm`.
    """

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
    ) -> None:
        check_int("first_period", first_period, 1)  # named as the user spells it
        check_int("first_stage_steps", first_stage_steps, 1)
        super().__init__(first_period, warmup_steps, False, bucket_cap_mb, buffers)
        growth = PERIOD_GROWTH.get(period_growth, period_growth) if isinstance(period_growth, str) else period_growth
        if isinstance(growth, str):
            raise ValueError(f"`period_growth` must be {sorted(PERIOD_GROWTH)} or a number, got {period_growth!r}.")
        self.schedule = StagewiseSchedule(first_stage_steps, first_period, growth, warmup_steps)
        self.lr_decay = check_positive_float("lr_decay", lr_decay)
        if self.lr_decay > 1:
            raise ValueError(f"`lr_decay` must be in (0, 1], got {lr_decay!r}.")
        self.proximal = None if proximal is None else check_positive_float("proximal", proximal)

    @property
    def stage(self) -> int:
        """Stages completed (0 during the first)."""
        assert isinstance(self.schedule, StagewiseSchedule)
        return self.schedule.stage

    def _declare_state_buffers(self) -> dict[str, StateInit]:
        return {"stage_start": "params"} if self.proximal is not None else {}

    def _begin_local_phase(self) -> None:
        self._keep_stage_start()

    def register_optimizers(self, optimizers: Sequence[Optimizer]) -> None:
        """Bring every param group's learning rate to the current stage's, ``lr * lr_decay**stage``, as a run that
        never stopped has it: optimizers built anew by a second ``fit`` start at ``configure_optimizers``' rates,
        which are stage 0's. Each group records the stage its ``lr`` belongs to (:data:`STAGE_KEY`, saved with the
        optimizer's state), so an optimizer registered again (a module that keeps its optimizer between fits) or
        loaded from a checkpoint is not decayed twice."""
        super().register_optimizers(optimizers)
        if self.lr_decay == 1.0:
            return
        for optimizer in optimizers:
            for group in optimizer.param_groups:
                behind = self.stage - int(group.get(STAGE_KEY, 0))
                if behind:
                    group["lr"] = group["lr"] * self.lr_decay**behind
                group[STAGE_KEY] = self.stage

    def _begin_stage(self) -> None:
        """After the round that ended a stage (the replicas hold their average): the next stage's x_s and lr."""
        self._keep_stage_start()
        if self.lr_decay != 1.0:
            for optimizer in self._optimizers:
                for group in optimizer.param_groups:
                    group["lr"] = group["lr"] * self.lr_decay
                    group[STAGE_KEY] = self.stage

    def _keep_stage_start(self) -> None:
        if self.proximal is not None:
            for start, x in zip(self.state_buckets("stage_start"), self.flat.buckets):
                start.copy_(x)

    def reads_gradients_before_step(self) -> bool:
        return super().reads_gradients_before_step() or self.proximal is not None

    def before_optimizer_step(self, optimizer: Optimizer) -> None:
        super().before_optimizer_step(optimizer)
        if self.proximal is None or self.in_warmup():
            return
        scale = float(self.grad_scale()) if self.grad_scale is not None else 1.0  # gradients may still be scaled
        starts = self.state_views("stage_start")
        index_of = self.flat.index_of
        with torch.no_grad():
            for p in self._managed_params_of(optimizer):
                if p.grad is not None:
                    start = starts[index_of[id(p)]]
                    p.grad.add_((p.detach() - start.to(p.dtype)) * (scale / self.proximal))
