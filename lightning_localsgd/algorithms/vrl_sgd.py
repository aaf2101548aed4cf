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

Invariants: sum_i Delta_i = 0 after every round; with period 1 the trajectory is synchronous SGD. Both need
every rank to divide by the same sum of learning rates: a step the fp16 grad scaler skips on one rank still
counts its learning rate and applies its correction (as a step whose direction is zero), and the round's flag
collective checks that the sums agree. Delta is kept in float32 for half-precision parameters.
Delta_i is a control variate (like SCAFFOLD's) that costs no extra communication (``control_variate.py``,
shared with LIEC-SGD's ``variance_reduction`` option).

VRL-SGD-W (``first_period_one_step=True``): the first round comes after one local step, so Delta_i starts at
g_i - mean_j g_j before the long periods begin. The paper's exact warm-up could not be confirmed; this
reading is the one its analysis supports (Delta_i near grad f_i - grad f).
"""

from __future__ import annotations

from typing import Any

import torch
from torch.optim import Optimizer

from lightning_localsgd.algorithms.averaging import mean_, mean_packed_
from lightning_localsgd.algorithms.buffers import BufferSelection
from lightning_localsgd.algorithms.chunks import ChunkBuffers
from lightning_localsgd.algorithms.control_variate import ControlVariate
from lightning_localsgd.algorithms.periodic import PeriodicAlgorithm
from lightning_localsgd.algorithms.precision import in_state_precision, write_back
from lightning_localsgd.algorithms.rank_state import StateInit
from lightning_localsgd.comm.flat import DEFAULT_BUCKET_CAP_MB


class VRLSGD(PeriodicAlgorithm):
    """VRL-SGD (and VRL-SGD-W with ``first_period_one_step=True``). Defaults: the paper's k = 20."""

    def __init__(
        self,
        period: int = 20,
        warmup_steps: int = 0,
        first_period_one_step: bool = False,
        bucket_cap_mb: float = DEFAULT_BUCKET_CAP_MB,
        buffers: BufferSelection = None,
    ) -> None:
        super().__init__(period, warmup_steps, first_period_one_step, bucket_cap_mb, buffers)
        self._variate = ControlVariate()
        self._drift = ChunkBuffers()  # one bucket's x_i at a round, kept between rounds

    @property
    def delta(self) -> list[torch.Tensor]:
        """Delta_i, in the flat bucket layout of the parameters (gradient units; float32 for half precision)."""
        return self.state_buckets("delta")

    def _declare_state_buffers(self) -> dict[str, StateInit]:
        return {"delta": "zeros"}

    def _on_setup(self) -> None:
        self._variate.reset()

    def after_optimizer_step(self, optimizer: Optimizer) -> None:
        if self.in_warmup():
            return  # synchronous SGD: Delta is still 0 and the period has not begun
        groups = self._groups.groups_of(self._optimizer_index(optimizer), self._optimizers, self.flat)
        self._variate.correct_(self.flat.params, self.state_views("delta"), groups)

    def _lr_state_fingerprint(self) -> float:
        return self._variate.fingerprint()

    def _round(self) -> None:
        # Bucket by bucket, so x_i is kept aside one bucket at a time (never a copy of the model): the bucket is
        # averaged and Delta updated from its drift. Averaged in float32 for half-precision parameters, and Delta
        # updated from that float32 mean: the mean rounded back to bf16 would leave sum_i (x_hat - x_i) =
        # N * (rounding error), not 0.
        groups = self._groups.all_groups(self._optimizers, self.flat)
        lr_sums = self._variate.take_sums(groups)
        deltas = self.state_views("delta")
        with torch.no_grad():
            for index, bucket in enumerate(self.flat.buckets):
                (mean,) = in_state_precision([bucket])
                drift = self._drift.get("drift", mean.numel(), mean.dtype, mean.device)
                drift.copy_(mean)  # x_i before averaging
                mean_([mean], self.comm)
                drift.neg_().add_(mean)  # x_hat - x_i
                self._variate.update_(deltas, self.flat.views_in_bucket(index, drift), groups, lr_sums)
                write_back([bucket], [mean])
        mean_packed_(self.averaged_buffers(), self.comm)
        self._variate.reset()

    def _extra_state(self) -> dict[str, Any]:
        return {"lr_sums": self._variate.state_dict()}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        self._variate.load_state_dict(state["lr_sums"])
