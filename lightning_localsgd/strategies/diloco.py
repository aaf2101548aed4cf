"""``Trainer(strategy="diloco")``: DiLoCo, Local SGD whose rounds are steps of an outer optimizer."""

from __future__ import annotations

from typing import Any, Optional

from lightning_localsgd.algorithms import DiLoCo
from lightning_localsgd.algorithms.buffers import BufferSelection
from lightning_localsgd.algorithms.diloco import DEFAULT_OUTER_OPTIMIZER
from lightning_localsgd.comm.flat import DEFAULT_BUCKET_CAP_MB
from lightning_localsgd.strategies.base import LocalUpdateStrategy


class DiLoCoStrategy(LocalUpdateStrategy):
    """DiLoCo (Douillard et al., arXiv 2311.08455): every ``period`` steps the replicas' average becomes a
    pseudo-gradient ``theta - mean_j x_j`` for an outer optimizer on global parameters kept apart (on the CPU by
    default), and every replica restarts from the new global model.

    Use it for long periods (hundreds of steps) on slow links: the outer Nesterov momentum recovers much of what
    Local SGD loses at such periods. Your LightningModule's optimizer is the inner optimizer.

    Args:
        period: inner steps between outer steps (H; the paper: 500 for language models).
        outer_optimizer: a ``torch.optim`` class name (default ``"SGD"``).
        outer_optimizer_options: its keyword arguments (default for SGD: ``{lr: 0.7, momentum: 0.9, nesterov:
            true}``; ``{lr: 1.0}`` with SGD is Local SGD).
        global_device: ``"cpu"`` (default) or ``"device"``: where theta and the outer optimizer's state live.
        overlap: the delayed outer step (Streaming DiLoCo): each round's all-reduce runs behind the next ``period``
            inner steps and its outer step is applied one round late; the transfer never blocks training.
        warmup_steps, bucket_cap_mb, buffers: as for :class:`LocalSGDStrategy`.
        **kwargs: :class:`LocalUpdateStrategy` / :class:`~lightning.pytorch.strategies.DDPStrategy` arguments.
    """

    strategy_names = ("diloco",)

    def __init__(
        self,
        period: int = 100,
        outer_optimizer: str = DEFAULT_OUTER_OPTIMIZER,
        outer_optimizer_options: Optional[dict[str, Any]] = None,
        global_device: str = "cpu",
        overlap: bool = False,
        warmup_steps: int = 0,
        bucket_cap_mb: float = DEFAULT_BUCKET_CAP_MB,
        buffers: BufferSelection = None,
        **kwargs: Any,
    ) -> None:
        algorithm = DiLoCo(
            period,
            outer_optimizer,
            outer_optimizer_options,
            global_device,
            overlap,
            warmup_steps,
            bucket_cap_mb,
            buffers,
        )
        super().__init__(algorithm, **kwargs)
