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

Memory: the round-start snapshot and the transfer buffer, 2 model copies (float32 for half-precision
parameters). Communication: one model all-reduce per period, overlapped with the period's computation.
Averaged buffers (normalisation statistics) follow the same rule, sent with the transfer (``late_buffers.py``).
"""

from __future__ import annotations

from torch import Tensor

from lightning_localsgd.algorithms.buffers import BufferSelection
from lightning_localsgd.algorithms.periodic import PeriodicAlgorithm
from lightning_localsgd.algorithms.precision import in_state_precision, write_back
from lightning_localsgd.algorithms.rank_state import StateInit
from lightning_localsgd.comm.flat import DEFAULT_BUCKET_CAP_MB


class CoCoDSGD(PeriodicAlgorithm):
    """CoCoD-SGD with a round every ``period`` steps."""

    rounds_synchronise = False
    applies_rounds_late = True

    def __init__(
        self,
        period: int = 2,
        warmup_steps: int = 0,
        bucket_cap_mb: float = DEFAULT_BUCKET_CAP_MB,
        buffers: BufferSelection = None,
    ) -> None:
        super().__init__(period, warmup_steps, False, bucket_cap_mb, buffers)

    @property
    def _round_start(self) -> list[Tensor]:  # x_i^s
        return self.state_buckets("round_start")

    @property
    def _start_mean(self) -> list[Tensor]:  # x_i^s, then mean_j x_j^s once the transfer lands
        return self.state_buckets("round_start_mean")

    def _declare_state_buffers(self) -> dict[str, StateInit]:
        # A parameter joining later (unfrozen) is identical on every rank: its round start and their mean are x.
        return {"round_start": "params", "round_start_mean": "params"}

    def _begin_local_phase(self) -> None:
        self._start_round()

    def _start_round(self) -> None:
        self._settle_in_flight()
        for start, mean, x in zip(self._round_start, self._start_mean, self.flat.buckets):
            start.copy_(x)
            mean.copy_(x)
        self._start_transfers(self._start_mean)

    def _round(self) -> None:
        self._settle_in_flight()
        worked = in_state_precision(self.flat.buckets)
        for x, start, mean in zip(worked, self._round_start, self._start_mean):
            x.sub_(start).add_(mean)  # x_i^e - x_i^s + mean_j x_j^s
        write_back(self.flat.buckets, worked)
        self._start_round()
