"""Local SGD and post-local SGD.

Papers: "Local SGD Converges Fast and Communicates Little" (Stich, ICLR 2019, arXiv 1805.09767);
"Don't Use Large Mini-Batches, Use Local SGD" (Lin, Stich, Patel, Jaggi, ICLR 2020, arXiv 1808.07217).

Update rule, per rank i:
    x_i <- x_i - lr * (optimizer direction from g_i)        every step (momentum and optimizer state stay local)
    x_i <- mean_j x_j                                        every `period` steps (normalisation statistics too)
The first `warmup_steps` steps are synchronous SGD (post-local SGD).

Communication: one all-reduce of the model per period, against one per step for synchronous SGD.
"""

from __future__ import annotations

from lightning_localsgd.algorithms.buffers import BufferSelection
from lightning_localsgd.algorithms.periodic import PeriodicAlgorithm
from lightning_localsgd.comm.flat import DEFAULT_BUCKET_CAP_MB


class LocalSGD(PeriodicAlgorithm):
    """Local SGD with post-local warm-up.

    By default the round schedule has the phase of torch's ``PeriodicModelAverager`` (first round right after
    the first local step, then every ``period`` steps), so that with the same ``period`` and ``warmup_steps``
    both produce the same parameters step for step.
    """

    def __init__(
        self,
        period: int = 16,
        warmup_steps: int = 0,
        first_period_one_step: bool = True,
        bucket_cap_mb: float = DEFAULT_BUCKET_CAP_MB,
        buffers: BufferSelection = None,
    ) -> None:
        super().__init__(period, warmup_steps, first_period_one_step, bucket_cap_mb, buffers)
