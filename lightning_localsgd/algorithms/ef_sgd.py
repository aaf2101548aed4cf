"""EF-SGD: every step's gradients compressed with error feedback, averaged over ranks; no local drift.

Paper: "Error Feedback Fixes SignSGD and other Gradient Compression Schemes" (Karimireddy, Rebjock, Stich, Jaggi,
arXiv 1901.09847), in its distributed form with one error per rank (as torch's PowerSGD hook keeps it).

Update rule per step, rank i (``e_i`` starts at 0):
    p_i = g_i + e_i;  payload_i = C(p_i);  e_i <- p_i - decode(payload_i)
    every rank steps on mean_j decode(payload_j)      (the same bits everywhere: replicas stay identical)

Invariant: after T steps, ``sum_t mean_j decode_t,j = sum_t mean_j g_t,j - mean_j e_T,j``: what the compression
lost is delayed, never dropped. With :class:`NoCompression` it is synchronous SGD. Every ``period`` steps a round
averages the normalisation buffers, which each rank updates from its own batches.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn
from torch.optim import Optimizer

from lightning_localsgd.algorithms.buffers import BufferSelection
from lightning_localsgd.algorithms.chunks import Chunk, ChunkWriter
from lightning_localsgd.algorithms.compressed import CompressedExchangeAlgorithm
from lightning_localsgd.algorithms.rank_state import StateInit
from lightning_localsgd.comm.flat import DEFAULT_BUCKET_CAP_MB
from lightning_localsgd.compression import Compressor, ScaledSign


class ErrorFeedbackSGD(CompressedExchangeAlgorithm):
    """EF-SGD with any compressor (default: scaled sign, i.e. EF-SignSGD).

    Args:
        compressor: what each rank sends (:class:`ScaledSign` by default).
        period: steps between rounds that average the normalisation buffers (the parameters agree at every step).
        warmup_steps, bucket_cap_mb, buffers: as for :class:`PeriodicAlgorithm`.
    """

    rounds_synchronise = True  # every step leaves identical parameters; a round brings the buffers along

    def __init__(
        self,
        compressor: Compressor | None = None,
        period: int = 100,
        warmup_steps: int = 0,
        bucket_cap_mb: float = DEFAULT_BUCKET_CAP_MB,
        buffers: BufferSelection = None,
    ) -> None:
        compressor = compressor if compressor is not None else ScaledSign()
        super().__init__(compressor, period, warmup_steps, bucket_cap_mb, buffers)

    @property
    def error(self) -> list[Tensor]:
        """``e_i``, in the flat bucket layout of the parameters (float32 for half-precision parameters)."""
        return self.state_buckets("error")

    def _declare_state_buffers(self) -> dict[str, StateInit]:
        return {"error": "zeros"}

    def _errors_of(self, indices: list[int]) -> list[Tensor]:
        views = self.state_views("error")
        return [views[i] for i in indices]

    def _prepare_chunk(self, chunk: Chunk, g: Tensor, indices: list[int]) -> tuple[Tensor, Any]:
        e, in_place = self._state_chunk(chunk, self._errors_of(indices), "e")  # read, not yet written
        compensated = g.add_(e)  # p_i = g_i + e_i, in g
        payload = self.compressor.encode(compensated)
        return payload, (e, in_place, payload)

    def _exchange_gradients(
        self, optimizer: Optimizer, params: list[nn.Parameter], indices: list[int], scale: float
    ) -> None:
        writer = ChunkWriter(self._errors_of(indices).__getitem__)

        def finish(chunk: Chunk, compensated: Tensor, context: Any, gathered: list[Tensor]) -> Tensor:
            e, in_place, payload = context
            # C(p_i) into `own` (also its mean term) and e_i <- p_i - C(p_i), in one pass: only now, once every rank's
            # flags were read.
            own = self.compressor.residual_into(compensated, e, self._buffer("own", chunk), payload=payload)
            if not in_place:
                writer.write(chunk, e)
            scratch = self._buffer("scratch", chunk) if in_place else e  # e's copy is written: reuse it
            return self._decoded_sum_into(gathered, compensated, scratch, own)  # sum_j C(p_j), divided when written

        self._stream_exchanged(params, indices, scale, finish, divisor=self.comm.world_size)  # mean_j C(p_j)
        writer.finish()
