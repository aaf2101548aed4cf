"""Overlap Local-SGD: Local SGD whose averaging runs in the background, pulled toward an anchor.

Paper: "Overlap Local-SGD: An Algorithmic Approach to Hide Communication Delays in Distributed SGD"
(Wang, Liang, Joshi, 2020, arXiv 2002.09539).

Per rank i, with an anchor z (the same on every rank, z = x0 at first) and an anchor momentum v_i:
    x_i <- x_i - lr * (optimizer direction)                  every step, as Local SGD
    every `period` (tau) steps, at round m >= 1:
        z <- result of the all-reduce started at round m - 1     (round 1: nothing in flight, z = x0)
        x_i <- x_i + alpha * (z - x_i)                          pull back toward the anchor (exact when x_i = z)
        v_i <- beta * v_i + (z - x_i) / lr                       anchor momentum (v_i = 0 before round 1)
        start a non-blocking all-reduce of (z - lr * v_i) / N    it completes during the next tau steps

With beta = 0 the next anchor is the mean of the pulled-back models, one round late; anchor momentum
compensates the step-size shrinkage (1 - alpha) that pulling back causes. The replicas never agree:
evaluation and checkpoints use their average.

``lr`` is the learning rate each parameter's group stepped with at the round's step (read right after the
optimizer step, before a per-step scheduler moves it on). Where it is 0 (a group with lr 0, or parameters no
optimizer steps), v_i keeps its value (gradient units, never mixed with displacements) and the payload is the
pulled-back x_i, the limit of z - lr * v_i as lr goes to 0. z and v_i are float32 for half-precision parameters.

Memory: z and v_i, 2 model copies. Communication: one model all-reduce per period, hidden behind the next
period's computation. Averaged buffers (normalisation statistics) travel with it and are applied one round late,
keeping each rank's own updates since (``late_buffers.py``).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.optim import Optimizer

from lightning_localsgd._validation import check_unit_interval
from lightning_localsgd.algorithms.buffers import BufferSelection
from lightning_localsgd.algorithms.param_groups import GroupKey
from lightning_localsgd.algorithms.periodic import PeriodicAlgorithm
from lightning_localsgd.algorithms.precision import in_state_precision, write_back
from lightning_localsgd.algorithms.rank_state import StateInit
from lightning_localsgd.comm.flat import DEFAULT_BUCKET_CAP_MB


class OverlapLocalSGD(PeriodicAlgorithm):
    """Overlap Local-SGD. Defaults: the paper's tau = 2 and beta = 0.7, and alpha = 0.2 (the paper: 0.6), which
    trained better at this period in our tuning runs (docs/strategies.md, Overlap Local-SGD)."""

    rounds_synchronise = False
    applies_rounds_late = True

    def __init__(
        self,
        period: int = 2,
        pullback: float = 0.2,
        anchor_momentum: float = 0.7,
        warmup_steps: int = 0,
        bucket_cap_mb: float = DEFAULT_BUCKET_CAP_MB,
        buffers: BufferSelection = None,
    ) -> None:
        super().__init__(period, warmup_steps, False, bucket_cap_mb, buffers)
        self.pullback = check_unit_interval("pullback", pullback)
        self.anchor_momentum = check_unit_interval("anchor_momentum", anchor_momentum, include_one=False)
        self._step_lr: dict[GroupKey, float] = {}  # each group's lr at its latest optimizer step

    @property
    def anchor(self) -> list[Tensor]:
        """z, in the bucket layout of the parameters (settle in-flight work before reading it)."""
        return self.state_buckets("anchor")

    @property
    def _velocity(self) -> list[Tensor]:
        return self.state_buckets("anchor_velocity")

    def _declare_state_buffers(self) -> dict[str, StateInit]:
        # z starts as x0; a parameter joining later (unfrozen) is identical on every rank, so z = x for it.
        return {"anchor": "params", "anchor_velocity": "zeros"}

    def _begin_local_phase(self) -> None:
        self._settle_in_flight()
        for z, x in zip(self.anchor, self.flat.buckets):
            z.copy_(x)  # z = x0: the replicas are in sync here
        for v in self._velocity:
            v.zero_()

    def after_optimizer_step(self, optimizer: Optimizer) -> None:
        index = self._optimizer_index(optimizer)
        for members in self._groups.groups_of(index, self._optimizers, self.flat):
            self._step_lr[members.key] = members.lr

    def _in_slices(self, stepped: list[tuple[float, list[int]]]) -> list[tuple[float, list[int]]]:
        """Each group's parameters in slices of at most one bucket's elements (a lone larger parameter alone):
        the pull ``z - x`` is a temporary of one slice, never of the whole model; the rule is elementwise."""
        cap = max(b.numel() for b in self.flat.buckets) if self.flat.buckets else 0
        slices: list[tuple[float, list[int]]] = []
        for lr, indices in stepped:
            current: list[int] = []
            size = 0
            for i in indices:
                numel = self.flat.params[i].numel()
                if current and size + numel > cap:
                    slices.append((lr, current))
                    current, size = [], 0
                current.append(i)
                size += numel
            if current:
                slices.append((lr, current))
        return slices

    def _round(self) -> None:
        self._settle_in_flight()  # 1. z <- the all-reduce started one round ago
        alpha, beta = self.pullback, self.anchor_momentum
        stepped = [
            (self._step_lr.get(m.key, 0.0), m.indices) for m in self._groups.all_groups(self._optimizers, self.flat)
        ]
        stepped.append((0.0, self._groups.unstepped_indices(self._optimizers, self.flat)))
        anchors, velocities = self.state_views("anchor"), self.state_views("anchor_velocity")
        with torch.no_grad():
            for lr, indices in self._in_slices(stepped):
                params = [self.flat.params[i].data for i in indices]
                x = in_state_precision(params)
                z, v = [anchors[i] for i in indices], [velocities[i] for i in indices]
                pull = torch._foreach_sub(z, x)
                torch._foreach_add_(x, pull, alpha=alpha)  # 2. x <- x + alpha (z - x)
                if lr > 0:
                    # 3. v <- beta v + (z - x) / lr; after step 2, z - x = (1 - alpha) pull: one pass fewer
                    torch._foreach_mul_(v, beta)
                    torch._foreach_add_(v, pull, alpha=(1 - alpha) / lr)
                    torch._foreach_add_(z, v, alpha=-lr)  # 4. z <- z - lr v, the payload
                else:
                    torch._foreach_copy_(z, x)  # lr = 0: the payload's limit, the pulled-back model
                write_back(params, x)
        self._start_transfers(self.anchor)
