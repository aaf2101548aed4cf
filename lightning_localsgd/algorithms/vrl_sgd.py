"""VRL-SGD: Local SGD with a variance-reduction correction, for non-identical data across ranks.

Paper: "Variance Reduced Local SGD with Lower Communication Complexity" (Liang, Shen, Liu, Pan, Chen,
Cheng, arXiv 1912.12844).

Update rule, per rank i (Delta_i starts at 0):
    d_i = optimizer direction (momentum and coupled weight decay included)
    x_i <- x_i - lr * (d_i - Delta_i)                       every step; implemented as the optimizer's own
                                                            step followed by x_i += lr * Delta_i, so the
                                                            correction lands on the *final* direction, after
                                                            momentum (correcting the raw gradient before
                                                            momentum over-corrects by about 1 / (1 - beta))
    every `period` steps:
        x_hat = mean_j x_j
        Delta_i <- Delta_i + (x_hat - x_i) / sum(lr over the period)    (x_i before averaging; the sum of the
                                                                         learning rates is k * lr when lr is
                                                                         constant)
        x_i <- x_hat

Invariants: sum_i Delta_i = 0 after every round; with period 1 the trajectory is synchronous SGD.
Delta_i is a control variate (like SCAFFOLD's) that costs no extra communication.

VRL-SGD-W (``first_period_one_step=True``): the first round comes after one local step, so Delta_i starts at
g_i - mean_j g_j before the long periods begin. The paper's exact warm-up could not be confirmed; this
reading is the one its analysis supports (Delta_i near grad f_i - grad f).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from lightning_localsgd.algorithms.periodic import PeriodicAlgorithm, _copy_checked
from lightning_localsgd.comm.flat import DEFAULT_BUCKET_CAP_MB

GroupKey = tuple[int, int]  # (optimizer index, parameter group index)


class VRLSGD(PeriodicAlgorithm):
    """VRL-SGD (and VRL-SGD-W with ``first_period_one_step=True``). Defaults: the paper's k = 20."""

    def __init__(
        self,
        period: int = 20,
        warmup_steps: int = 0,
        first_period_one_step: bool = False,
        bucket_cap_mb: float = DEFAULT_BUCKET_CAP_MB,
    ) -> None:
        super().__init__(period, warmup_steps, first_period_one_step, bucket_cap_mb)
        self._delta: list[Tensor] = []
        self._delta_views: list[Tensor] = []
        self._before_average: list[Tensor] = []
        self._lr_sums: dict[GroupKey, float] = {}
        # Per (optimizer, group): the managed parameters, their Delta views and their indices in flat.params.
        self._members: dict[GroupKey, tuple[list[Tensor], list[Tensor], list[int], int]] = {}

    @property
    def delta(self) -> list[Tensor]:
        """Delta_i, in the flat bucket layout of the parameters (gradient units)."""
        return self._delta

    def _on_setup(self) -> None:
        self._delta = self.flat.zeros_like_buckets()
        self._delta_views = self.flat.views_of(self._delta)
        self._before_average = self.flat.zeros_like_buckets()
        self._lr_sums = {}
        self._members = {}

    def register_optimizers(self, optimizers: Any) -> None:
        super().register_optimizers(optimizers)
        self._members = {}
        for optimizer in self._optimizers:
            self._group_members(optimizer)

    def _group_members(self, optimizer: Optimizer) -> list[tuple[GroupKey, dict[str, Any]]]:
        """(key, param group) pairs of ``optimizer``; (re)builds the member lists of new or changed groups."""
        index = self._optimizer_index(optimizer)
        pairs = []
        for group_index, group in enumerate(optimizer.param_groups):
            key = (index, group_index)
            cached = self._members.get(key)
            if cached is None or cached[3] != len(group["params"]):
                position = self.flat.index_of
                indices = [position[id(p)] for p in group["params"] if id(p) in position]
                params: list[Tensor] = [self.flat.params[i] for i in indices]
                deltas = [self._delta_views[i] for i in indices]
                self._members[key] = (params, deltas, indices, len(group["params"]))
            pairs.append((key, group))
        return pairs

    def after_optimizer_step(self, optimizer: Optimizer) -> None:
        if self.in_warmup():
            return  # synchronous SGD: Delta is still 0 and the period has not begun
        with torch.no_grad():
            for key, group in self._group_members(optimizer):
                params, deltas, _, _ = self._members[key]
                if not params:
                    continue
                lr = float(group["lr"])
                torch._foreach_add_(params, deltas, alpha=lr)  # x_i += lr * Delta_i
                self._lr_sums[key] = self._lr_sums.get(key, 0.0) + lr

    def _round(self) -> None:
        for saved, bucket in zip(self._before_average, self.flat.buckets):
            saved.copy_(bucket)
        super()._round()
        with torch.no_grad():
            # _before_average becomes x_hat - x_i, then Delta_i += (x_hat - x_i) / sum(lr) per group.
            for diff, bucket in zip(self._before_average, self.flat.buckets):
                diff.neg_().add_(bucket)
            diffs = self.flat.views_of(self._before_average)
            for key, lr_sum in self._lr_sums.items():
                if lr_sum == 0.0 or key not in self._members:
                    continue  # a group with lr 0 did not move: its Delta stays
                _, deltas, indices, _ = self._members[key]
                if deltas:
                    torch._foreach_add_(deltas, [diffs[i] for i in indices], alpha=1.0 / lr_sum)
        self._lr_sums = {}

    def _extra_state(self) -> dict[str, Any]:
        return {
            "delta": [d.detach().clone() for d in self._delta],
            "lr_sums": [[key[0], key[1], value] for key, value in self._lr_sums.items()],
        }

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        _copy_checked("Delta bucket", self._delta, state["delta"])
        self._lr_sums = {(int(a), int(b)): float(v) for a, b, v in state["lr_sums"]}
