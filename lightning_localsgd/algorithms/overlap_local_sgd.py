"""Overlap Local-SGD: Local SGD whose averaging runs in the background, pulled toward an anchor.

Paper: "Overlap Local-SGD: An Algorithmic Approach to Hide Communication Delays in Distributed SGD"
(Wang, Liang, Joshi, 2020, arXiv 2002.09539).

Per rank i, with an anchor z (the same on every rank, z = x0 at first) and an anchor momentum v_i:
    x_i <- x_i - lr * (optimizer direction)                  every step, as Local SGD
    every `period` (tau) steps, at round m >= 1:
        z <- result of the all-reduce started at round m - 1     (round 1: nothing in flight, z = x0)
        x_i <- (1 - alpha) * x_i + alpha * z                     pull back toward the anchor
        v_i <- beta * v_i + (z - x_i) / lr                       anchor momentum (v_i = 0 before round 1)
        start a non-blocking all-reduce of (z - lr * v_i) / N    it completes during the next tau steps

With beta = 0 the next anchor is the mean of the pulled-back models, one round late; anchor momentum
compensates the step-size shrinkage (1 - alpha) that pulling back causes. The replicas never agree:
evaluation and checkpoints use their average.

``lr`` is each parameter's current learning rate at the round; parameters no optimizer steps use 1 (their
v_i is then a displacement), which changes nothing while their learning rate is constant.

Memory: z and v_i, 2 model copies. Communication: one model all-reduce per period, hidden behind the next
period's computation. Floating-point buffers (small) are averaged with a blocking collective at each round.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lightning_localsgd._validation import check_unit_interval
from lightning_localsgd.algorithms.periodic import PeriodicAlgorithm, _copy_checked
from lightning_localsgd.comm import average_float_buffers
from lightning_localsgd.comm.flat import DEFAULT_BUCKET_CAP_MB


class OverlapLocalSGD(PeriodicAlgorithm):
    """Overlap Local-SGD. Defaults are the paper's: tau = 2, alpha = 0.6, beta = 0.7."""

    rounds_synchronise = False

    def __init__(
        self,
        period: int = 2,
        pullback: float = 0.6,
        anchor_momentum: float = 0.7,
        warmup_steps: int = 0,
        bucket_cap_mb: float = DEFAULT_BUCKET_CAP_MB,
    ) -> None:
        super().__init__(period, warmup_steps, first_period_one_step=False, bucket_cap_mb=bucket_cap_mb)
        self.pullback = check_unit_interval("pullback", pullback)
        self.anchor_momentum = check_unit_interval("anchor_momentum", anchor_momentum, include_one=False)
        self._anchor: list[Tensor] = []  # z; while a transfer is in flight, the buffer it is writing
        self._velocity: list[Tensor] = []  # v_i, in gradient units
        self._anchor_views: list[Tensor] = []  # per-parameter views of the buckets above
        self._velocity_views: list[Tensor] = []

    @property
    def anchor(self) -> list[Tensor]:
        """z, in the bucket layout of the parameters (settle in-flight work before reading it)."""
        return self._anchor

    def _on_setup(self) -> None:
        self._anchor = [b.detach().clone() for b in self.flat.buckets]
        self._velocity = self.flat.zeros_like_buckets()
        self._anchor_views = self.flat.views_of(self._anchor)
        self._velocity_views = self.flat.views_of(self._velocity)

    def _begin_local_phase(self) -> None:
        self._settle_in_flight()
        for z, x in zip(self._anchor, self.flat.buckets):
            z.copy_(x)  # z = x0: the replicas are in sync here
        for v in self._velocity:
            v.zero_()

    def _round(self) -> None:
        self._settle_in_flight()  # 1. z <- the all-reduce started one round ago
        alpha, beta = self.pullback, self.anchor_momentum
        with torch.no_grad():
            for lr, indices in self._params_by_lr():
                scale = lr if lr > 0 else 1.0
                x, z, v = self._views(indices)
                torch._foreach_mul_(x, 1 - alpha)  # 2. x <- (1 - alpha) x + alpha z
                torch._foreach_add_(x, z, alpha=alpha)
                torch._foreach_mul_(v, beta)  # 3. v <- beta v + (z - x) / lr
                torch._foreach_add_(v, z, alpha=1 / scale)
                torch._foreach_add_(v, x, alpha=-1 / scale)
                torch._foreach_add_(z, v, alpha=-scale)  # 4. z <- z - lr v, the payload
        average_float_buffers(self.module, self.comm)
        self._in_flight = [self.comm.start_all_reduce_mean_(z) for z in self._anchor]

    def _views(self, indices: list[int]) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
        x = [self.flat.params[i].data for i in indices]
        return x, [self._anchor_views[i] for i in indices], [self._velocity_views[i] for i in indices]

    def _extra_state(self) -> dict[str, Any]:
        return {
            "anchor": [z.detach().clone() for z in self._anchor],
            "anchor_velocity": [v.detach().clone() for v in self._velocity],
        }

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        _copy_checked("anchor bucket", self._anchor, state["anchor"])
        _copy_checked("anchor-velocity bucket", self._velocity, state["anchor_velocity"])
