"""``Trainer(strategy="ef_sign")``: per-step compressed gradients with error feedback (EF-SignSGD by default)."""

from __future__ import annotations

from typing import Any, Optional

from lightning_localsgd.algorithms import ErrorFeedbackSGD
from lightning_localsgd.algorithms.buffers import BufferSelection
from lightning_localsgd.comm.flat import DEFAULT_BUCKET_CAP_MB
from lightning_localsgd.compression import make_compressor
from lightning_localsgd.strategies.base import LocalUpdateStrategy


class ErrorFeedbackStrategy(LocalUpdateStrategy):
    """Error-feedback compressed SGD (Karimireddy et al., arXiv 1901.09847): every step, each rank sends its
    gradient plus its own error, compressed; every rank steps on the same mean, so the replicas never drift.

    The same compressors and error feedback as :mod:`lightning_localsgd.hooks` (for plain DDP), run through the
    strategies' shared per-step exchange, so it works on every device type (Lightning registers DDP hooks on
    CUDA only) and shares their guard, checkpoints and metrics.

    Args:
        compressor: ``"sign"`` (scaled sign per block, about 1/32 of float32), ``"topk"``, ``"qsgd"`` or ``"none"``.
        compressor_options: keyword arguments of the compressor (``{"block_size_mb": 1}``, ``{"ratio": 0.01}``,
            ``{"levels": 15}``).
        period: steps between rounds that average the normalisation buffers (the parameters agree every step).
        warmup_steps: initial steps of synchronous full-precision SGD.
        bucket_cap_mb, buffers: as for :class:`LocalSGDStrategy`.
        **kwargs: :class:`LocalUpdateStrategy` / :class:`~lightning.pytorch.strategies.DDPStrategy` arguments.
    """

    strategy_names = ("ef_sign",)

    def __init__(
        self,
        compressor: str = "sign",
        compressor_options: Optional[dict[str, Any]] = None,
        period: int = 100,
        warmup_steps: int = 0,
        bucket_cap_mb: float = DEFAULT_BUCKET_CAP_MB,
        buffers: BufferSelection = None,
        **kwargs: Any,
    ) -> None:
        self.compressor_name = compressor
        chosen = make_compressor(compressor, **(compressor_options or {}))
        super().__init__(ErrorFeedbackSGD(chosen, period, warmup_steps, bucket_cap_mb, buffers), **kwargs)
