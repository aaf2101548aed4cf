"""CoCoD-SGD: computation and communication decoupled.

Paper: "Faster Distributed Deep Net Training: Computation and Communication Decoupled Stochastic Gradient
Descent" (Shen, Xu, et al., IJCAI 2019, arXiv 1906.12043).

Per rank i, per round of `period` (tau) steps:
    at the round's start: x_i^s = x_i; start a non-blocking all-reduce of x_i^s
    meanwhile: tau local steps, x_i <- x_i - lr * (optimizer direction), ending at x_i^e
    at the round's end: x_i <- mean_j(x_j^s) + (x_i^e - x_i^s)       then the next round starts at once

A round leaves the mean of the replicas unchanged (mean_i x_i = mean_i x_i^e afterwards), so the mean
moves exactly as Local SGD's averaged sequence does; the replicas themselves never coincide (they differ by
their own displacements), so evaluation and checkpoints use their average.

Memory: the round-start snapshot and the transfer buffer, 2 model copies. Communication: one model
all-reduce per period, overlapped with the period's computation. Floating-point buffers (small) are
averaged with a blocking collective at each round's end.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from lightning_localsgd.algorithms.periodic import PeriodicAlgorithm, _copy_checked
from lightning_localsgd.comm import average_float_buffers
from lightning_localsgd.comm.flat import DEFAULT_BUCKET_CAP_MB


class CoCoDSGD(PeriodicAlgorithm):
    """CoCoD-SGD with a round every ``period`` steps."""

    rounds_synchronise = False

    def __init__(self, period: int = 2, warmup_steps: int = 0, bucket_cap_mb: float = DEFAULT_BUCKET_CAP_MB) -> None:
        super().__init__(period, warmup_steps, first_period_one_step=False, bucket_cap_mb=bucket_cap_mb)
        self._round_start: list[Tensor] = []  # x_i^s
        self._start_mean: list[Tensor] = []  # x_i^s, then mean_j x_j^s once the transfer lands

    def _on_setup(self) -> None:
        self._round_start = self.flat.zeros_like_buckets()
        self._start_mean = self.flat.zeros_like_buckets()

    def _begin_local_phase(self) -> None:
        self._start_round()

    def _start_round(self) -> None:
        self._settle_in_flight()
        for start, mean, x in zip(self._round_start, self._start_mean, self.flat.buckets):
            start.copy_(x)
            mean.copy_(x)
        self._in_flight = [self.comm.start_all_reduce_mean_(mean) for mean in self._start_mean]

    def _round(self) -> None:
        self._settle_in_flight()
        for x, start, mean in zip(self.flat.buckets, self._round_start, self._start_mean):
            x.sub_(start).add_(mean)  # x_i^e - x_i^s + mean_j x_j^s
        average_float_buffers(self.module, self.comm)
        self._start_round()

    def _extra_state(self) -> dict[str, Any]:
        return {
            "round_start": [b.detach().clone() for b in self._round_start],
            "round_start_mean": [b.detach().clone() for b in self._start_mean],
        }

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        _copy_checked("round-start bucket", self._round_start, state["round_start"])
        _copy_checked("round-start mean bucket", self._start_mean, state["round_start_mean"])
