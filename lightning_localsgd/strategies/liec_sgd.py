"""``Trainer(strategy="liec_sgd")``: LIEC-SGD, 1-bit compression in both directions with error compensation."""

from __future__ import annotations

from typing import Any

from lightning_localsgd.algorithms import LIECSGD
from lightning_localsgd.algorithms.buffers import BufferSelection
from lightning_localsgd.comm.flat import DEFAULT_BUCKET_CAP_MB
from lightning_localsgd.compression.compressors import DEFAULT_BLOCK_SIZE_MB, block_numel_of
from lightning_localsgd.strategies.base import LocalUpdateStrategy


class LIECSGDStrategy(LocalUpdateStrategy):
    """LIEC-SGD (Cheng et al., arXiv 2402.11857): every step's gradients exchanged as scaled signs, about 1/32 of
    float32 on the wire, with the local immediate error used at once and one persistent server error.

    Use it when every step must see every rank's gradient (no local drift of the kind Local SGD has) and the link
    is too slow for float32 gradients.

    Args:
        full_sync_period: p, steps between full-precision rounds (parameters and gradients averaged, the server
            error added and reset). The paper uses 32 and 100; smaller keeps the replicas closer.
        block_size_mb: MiB of float32 per compression block, one float32 scale each (the reference code: 5 MiB).
            Smaller blocks follow the gradient's scale per layer more closely at a few bytes per block.
        variance_reduction: add VRL-SGD's control variate (no extra bytes): each rank learns, at the full rounds,
            how its replica drifts from the average and cancels that drift at every step. Turn it on when the
            ranks' data differ (each rank a few labels, a few users, a few domains); it changes nothing the
            mean model does.
        server: ``"auto"`` (default: sharded at more than two ranks, where it sends fewer bytes), ``"sharded"``
            (rank k serves the k-th part of every chunk: an all-to-all of the packed gradients, an all-gather of the
            packed server result, ``2 (N - 1) / N`` payloads per rank at any N) or ``"replicated"`` (an all-gather,
            every rank computes the whole server step: ``N - 1`` payloads per rank). Both give the same bits.
        warmup_steps: initial steps of synchronous full-precision SGD.
        bucket_cap_mb: flat bucket size for the full-precision rounds; each bucket is one collective.
        buffers: which module buffers are averaged at the full rounds (see :class:`LocalSGDStrategy`).
        **kwargs: :class:`LocalUpdateStrategy` / :class:`~lightning.pytorch.strategies.DDPStrategy` arguments.
    """

    strategy_names = ("liec_sgd",)

    def __init__(
        self,
        full_sync_period: int = 32,
        block_size_mb: float = DEFAULT_BLOCK_SIZE_MB,
        warmup_steps: int = 0,
        bucket_cap_mb: float = DEFAULT_BUCKET_CAP_MB,
        buffers: BufferSelection = None,
        variance_reduction: bool = False,
        server: str = "auto",
        **kwargs: Any,
    ) -> None:
        block_numel_of(block_size_mb)  # a clear error for a bad block size, before any process starts
        algorithm = LIECSGD(
            full_sync_period,
            block_size_mb,
            warmup_steps,
            bucket_cap_mb,
            buffers,
            variance_reduction=variance_reduction,
            server=server,
        )
        super().__init__(algorithm, **kwargs)
