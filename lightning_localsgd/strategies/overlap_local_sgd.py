"""``Trainer(strategy="overlap_local_sgd")``: Overlap Local-SGD."""

from __future__ import annotations

from typing import Any

from lightning_localsgd.algorithms import OverlapLocalSGD
from lightning_localsgd.algorithms.buffers import BufferSelection
from lightning_localsgd.comm.flat import DEFAULT_BUCKET_CAP_MB
from lightning_localsgd.strategies.base import LocalUpdateStrategy


class OverlapLocalSGDStrategy(LocalUpdateStrategy):
    """Overlap Local-SGD (Wang, Liang, Joshi, arXiv 2002.09539): Local SGD with the averaging in the background.

    Each round starts a non-blocking all-reduce that completes while the next ``period`` local steps run; the
    replicas are pulled toward the anchor it produced one round earlier. On a link where one all-reduce of
    the model takes less time than ``period`` local steps, communication disappears from the wall clock.

    Args:
        period: local steps between rounds (tau; the paper uses 2). Pick the smallest period whose local steps
            take longer than one all-reduce of the model on your link: then the transfer is fully hidden.
        pullback: alpha, how far each replica moves toward the anchor at a round (default 0.2; the paper: 0.6,
            which trailed Local SGD by far in our tuning runs at periods 2 to 32, see docs/strategies.md). Larger keeps
            replicas closer together at the price of leaning more on an anchor one round old.
        anchor_momentum: beta, momentum on the anchor's movement (paper: 0.7); compensates the step-size loss
            of pulling back. Use 0 to make the anchor the plain (one round late) average.
        warmup_steps: initial steps of synchronous SGD.
        bucket_cap_mb: flat bucket size; each bucket is one collective.
        buffers: which module buffers are averaged with the replicas: ``"norm"`` (default: normalisation running
            statistics), ``"all"`` floating-point buffers, ``"none"``, a regular expression on the buffer's
            qualified name, or a predicate ``(name, buffer) -> bool``. The others (masks, queues, caches, frozen
            projections) stay each rank's own and are checkpointed per rank.
        **kwargs: :class:`LocalUpdateStrategy` / :class:`~lightning.pytorch.strategies.DDPStrategy` arguments
            (``log_comm_metrics``, ``comm_progress_bar``, ``init_timeout``, ``timeout``, ``process_group_backend``,
            ``start_method``, ...).
    """

    strategy_names = ("overlap_local_sgd",)

    def __init__(
        self,
        period: int = 2,
        pullback: float = 0.2,
        anchor_momentum: float = 0.7,
        warmup_steps: int = 0,
        bucket_cap_mb: float = DEFAULT_BUCKET_CAP_MB,
        buffers: BufferSelection = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            OverlapLocalSGD(period, pullback, anchor_momentum, warmup_steps, bucket_cap_mb, buffers), **kwargs
        )
