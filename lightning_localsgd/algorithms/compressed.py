"""What every algorithm with a compressed gradient exchange at each step shares (LIEC-SGD, EF-SGD).

Each local step's gradients go through the core's per-step exchange moment (``gradient_exchange.py``: the flag
collective first, so an inf/NaN never enters an error buffer), are compressed into a packed payload, and the
payloads are all-gathered: sign bits and top-k indices cannot be summed on the wire, so every rank decodes all of
them and computes the same mean. Every ``period`` steps a round averages the normalisation buffers (and, for
LIEC-SGD, parameters and gradients in full precision).

The exchange streams: an optimizer's gradients, read as one long vector, go chunk by chunk (:mod:`.chunks`), each
chunk through the whole rule (compress, update the error, all-gather, decode the mean) in a few float32 buffers of
one chunk that are kept between steps, and the direction is written back into ``.grad`` before the next chunk is
read. Chunks are about half of ``bucket_cap_mb`` long and cut where the compressor's blocks end
(:meth:`~lightning_localsgd.compression.Compressor.chunk_numel`), so every element is compressed in the block it
was compressed in as one vector: the results are the same bits, and the memory beyond the algorithm's own state is
a few chunks whatever the model size. A compressor whose result depends on the whole vector (top-k) takes the
whole vector as one chunk.

Why an all-gather and not a root that gathers and scatters (the reference code of LIEC-SGD): with N ranks the
all-gather puts ``(N - 1) * b`` bytes on each rank's link for a payload of ``b`` bytes, the root's gather plus
scatter puts ``2 (N - 1) * b`` on the root's link and waits for two transfers in a row; at the 2 to 8 ranks a
slow link joins, the symmetric collective is cheaper and needs no rank to be special.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn

from lightning_localsgd.algorithms.averaging import mean_packed_
from lightning_localsgd.algorithms.buffers import BufferSelection
from lightning_localsgd.algorithms.chunks import (
    Chunk,
    ChunkBuffers,
    ChunkPlan,
    ChunkWriter,
    chunk_view,
    gather_chunk,
    gradient_of,
)
from lightning_localsgd.algorithms.periodic import PeriodicAlgorithm
from lightning_localsgd.comm.flat import DEFAULT_BUCKET_CAP_MB
from lightning_localsgd.compression import Compressor

# One chunk's rule: (chunk, g) -> the buffer holding the direction (times the ``divisor`` given to ``_stream``).
# ``g`` holds the chunk's unscaled float32 gradients and may be overwritten.
ChunkRule = Callable[[Chunk, Tensor], Tensor]


class CompressedExchangeAlgorithm(PeriodicAlgorithm):
    """A :class:`PeriodicAlgorithm` whose local steps exchange compressed gradients (see the module docstring)."""

    exchanges_every_step = True
    sharding_refused_because = (
        "it compresses and exchanges the whole gradient across the replicas at every step, which FSDP2's per-step "
        "reduce-scatter inside a group would have to be replaced by; with replica groups, only periodic averaging "
        "(local_sgd, vrl_sgd, diloco, overlap_local_sgd, cocod_sgd, stl_sgd) is supported"
    )

    def __init__(
        self,
        compressor: Compressor,
        period: int,
        warmup_steps: int = 0,
        bucket_cap_mb: float = DEFAULT_BUCKET_CAP_MB,
        buffers: BufferSelection = None,
    ) -> None:
        super().__init__(period, warmup_steps, False, bucket_cap_mb, buffers)
        if not isinstance(compressor, Compressor):
            raise ValueError(f"`compressor` must be a Compressor, got {compressor!r}.")
        self.compressor = compressor

    def _on_setup(self) -> None:
        self.compressor.seed_for_rank(self.comm.rank)
        self._work = ChunkBuffers()

    # ------------------------------------------------------------------ the streamed exchange
    def _chunk_plan(self, params: Sequence[nn.Parameter]) -> ChunkPlan:
        """``params``' elements in chunks of about ``bucket_cap_mb`` of float32, cut at the compressor's blocks."""
        numels = [p.numel() for p in params]
        chunk = self.compressor.chunk_numel(self._chunk_target())
        return ChunkPlan(numels, chunk if chunk is not None else max(1, sum(numels)))

    def _chunk_target(self) -> int:
        """The chunk length aimed at: half of ``bucket_cap_mb`` in float32 (the compressor then cuts at its blocks).
        An exchange keeps three or four chunk-sized buffers: half-bucket chunks hold them near two buckets."""
        return max(1, int(self.bucket_cap_mb * 2**20) // 8)

    def _buffer(self, name: str, chunk: Chunk) -> Tensor:
        """A float32 work buffer of the chunk's length, reused from step to step."""
        return self._work.get(name, chunk.numel, torch.float32, self.flat.buckets[0].device)

    def _stream(self, params: list[nn.Parameter], scale: float, rule: ChunkRule, divisor: float = 1.0) -> None:
        """Run ``rule`` on every chunk of ``params``' unscaled float32 gradients and write what it returns, divided
        by ``divisor`` and times ``scale``, into their ``.grad`` (in the same pass as the write where it can). A
        missing gradient reads as zeros and gets a ``.grad`` (the caller left out the parameters no rank has a
        gradient for)."""
        grads = [p.grad for p in params]  # read before any chunk creates a missing one
        writer = ChunkWriter(gradient_of(params))
        for chunk in self._chunk_plan(params):
            g = gather_chunk(chunk, grads, self._buffer("g", chunk))
            if scale != 1.0:
                g.div_(scale)
            writer.write(chunk, rule(chunk, g), divisor, scale)
        writer.finish()

    def _read_state(self, chunk: Chunk, views: Sequence[Tensor], name: str) -> Tensor:
        """The chunk's elements of per-parameter state ``views`` (the exchange's order) in work buffer ``name``."""
        return gather_chunk(chunk, views, self._buffer(name, chunk))

    def _state_chunk(self, chunk: Chunk, views: Sequence[Tensor], name: str) -> tuple[Tensor, bool]:
        """The chunk's float32 state: a view of the state itself where its pieces lie back to back (True: writing
        it is updating the state), else a copy in work buffer ``name`` (False: write it back)."""
        view = chunk_view(chunk, views, torch.float32)
        return (view, True) if view is not None else (self._read_state(chunk, views, name), False)

    def _gathered_sum_into(self, payload: Tensor, out: Tensor, scratch: Tensor, own: Optional[Tensor] = None) -> Tensor:
        """``out`` = the sum over ranks of what every rank's ``payload`` decodes to (the same bits on every rank:
        summed in rank order from 0); ``scratch`` is overwritten. ``own``: this rank's payload already decoded."""
        gathered = self.comm.all_gather_(payload)

        def term(rank: int, buffer: Tensor) -> Tensor:
            mine = own is not None and rank == self.comm.rank
            return own if mine else self.compressor.decode_into(gathered[rank], buffer)

        # The first two terms are added into `out` in one pass (no zeroed start, no copy of a term).
        first = term(0, out)
        if len(gathered) == 1:
            return out if first is out else out.copy_(first)
        torch.add(first, term(1, scratch), out=out)
        for rank in range(2, len(gathered)):
            out.add_(term(rank, scratch))
        return out

    def _gathered_mean_into(
        self, payload: Tensor, out: Tensor, scratch: Tensor, own: Optional[Tensor] = None
    ) -> Tensor:
        """As :meth:`_gathered_sum_into`, divided by the number of ranks."""
        return self._gathered_sum_into(payload, out, scratch, own).div_(self.comm.world_size)

    def _round(self) -> None:
        """Normalisation buffers only: the parameters were dealt with by the step's exchange."""
        mean_packed_(self.averaged_buffers(), self.comm)

    def _extra_state(self) -> dict[str, Any]:
        # The parameters stepped since the last full-precision step (LIEC-SGD; always empty for EF-SGD): one left out
        # of the next full-precision step for want of a gradient is still averaged there, also after a resume.
        return {"compressor": self.compressor.state_dict(), "stepped_since_full": self._stepped_state()}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        self.compressor.load_state_dict(state.get("compressor", {}))
        self._load_stepped_state(state.get("stepped_since_full"))
