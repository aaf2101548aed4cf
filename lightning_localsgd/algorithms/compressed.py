"""What every algorithm with a compressed gradient exchange at each step shares (LIEC-SGD, EF-SGD).

Each local step's gradients go through the core's per-step exchange moment (``gradient_exchange.py``: the flag
collective first, so an inf/NaN never enters an error buffer), are compressed into a packed payload, and the
payloads are all-gathered: sign bits and top-k indices cannot be summed on the wire, so every rank decodes all of
them and computes the same mean. Every ``period`` steps a round averages the normalisation buffers (and, for
LIEC-SGD, parameters and gradients in full precision).

The exchange streams: an optimizer's gradients, read as one long vector, go chunk by chunk (:mod:`.chunks`), each
chunk through the whole rule (compress, update the error, all-gather, decode the mean) in a few float32 buffers of
one chunk that are kept between steps, and the direction is written back into ``.grad``. Two chunks are on hand at
a time, in two sets of buffers: one whose payloads travel (a non-blocking all-gather) while the next is compressed.
Chunks are about a quarter of ``bucket_cap_mb`` long and cut where the compressor's blocks end
(:meth:`~lightning_localsgd.compression.Compressor.chunk_numel`), so every element is compressed in the block it
was compressed in as one vector: the results are the same bits, and the memory beyond the algorithm's own state is
a few chunks whatever the model size. A compressor whose result depends on the whole vector (top-k) takes the
whole vector as one chunk.

The step's flags (``guard.py``: finiteness, position, fingerprints, requests) travel with its first chunk: every
synchronisation point of these algorithms is one all-gather of frames of one size, ``[flags | payload area]``
(``frames.agree_in_frames``), and at a compressed step the area holds the first chunk's payload, prepared before the
verdict by :meth:`CompressedExchangeAlgorithm._prepare_chunk`, which writes no state. Where the verdict allows
exactly that exchange (every rank finite and in step, the same parameters exchanged) the chunk goes on from there;
elsewhere it is dropped (a random compressor's state restored) and the step goes as without it. The area is as
large as the largest first payload the model allows, so that ranks out of step still meet frames of one size.
LIEC-SGD's sharded server starts its chunks with an all-to-all instead: its frames are all-to-all pieces, each with
the whole flag vector and room for the destination's shard of that payload.

Why an all-gather and not a root that gathers and scatters (the reference code of LIEC-SGD): with N ranks the
all-gather puts ``(N - 1) * b`` bytes on each rank's link for a payload of ``b`` bytes, the root's gather plus
scatter puts ``2 (N - 1) * b`` on the root's link and waits for two transfers in a row; at the 2 to 8 ranks a
slow link joins, the symmetric collective is cheaper and needs no rank to be special.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from lightning_localsgd.algorithms.averaging import mean_packed_
from lightning_localsgd.algorithms.buffers import BufferSelection
from lightning_localsgd.algorithms.chunks import (
    Chunk,
    ChunkBuffers,
    ChunkPlan,
    ChunkWriter,
    chunk_lengths,
    chunk_view,
    gather_chunk,
    gradient_of,
)
from lightning_localsgd.algorithms.frames import HeaderCapacity, HeaderPayload
from lightning_localsgd.algorithms.periodic import PeriodicAlgorithm
from lightning_localsgd.comm.flat import DEFAULT_BUCKET_CAP_MB
from lightning_localsgd.compression import Compressor

# One chunk's rule: (chunk, g) -> the buffer holding the direction (times the ``divisor`` given to ``_stream``).
# ``g`` holds the chunk's unscaled float32 gradients and may be overwritten.
ChunkRule = Callable[[Chunk, Tensor], Tensor]
# The second half of a rule whose chunk goes through one collective (``_stream_exchanged``): (chunk, g, what
# ``_prepare_chunk`` returned with the payload, the payloads received) -> the buffer holding the direction.
FinishRule = Callable[[Chunk, Tensor, Any, list[Tensor]], Tensor]


@dataclass
class Speculation:
    """A step's first chunk, prepared before the step's flags were agreed (see the module docstring)."""

    params: list[int]  # ids of the parameters exchanged, in order: the exchange must be over exactly these
    plan: ChunkPlan  # the exchange's chunks, the first of them prepared
    g: Tensor  # the chunk's buffer as ``_prepare_chunk`` left it
    payload: HeaderPayload
    context: Any  # what ``_prepare_chunk`` returned with the payload
    compressor_state: Optional[dict[str, Any]]  # a random compressor's state before it drew (restored if dropped)
    gathered: list[Tensor] = field(default_factory=list)  # every rank's payload, once the verdict allows it


@dataclass
class _ChunkInFlight:
    """A chunk whose payload was sent and whose rule is still to be finished (see ``_stream_exchanged``)."""

    chunk: Chunk
    g: Tensor
    context: Any
    receive: Callable[[], list[Tensor]]  # waits for the payloads received
    slot: int  # its work buffers


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
        self._speculation: Optional[Speculation] = None
        self._slot = 0  # which set of work buffers `_buffer` hands out
        self.header_capacity = self._first_payload_capacity()

    # ------------------------------------------------------------------ the first payload, with the flags
    def _model_first_chunk(self) -> int:
        """The elements of the first chunk of an exchange of every parameter of the model (the same on every rank:
        all parameters, frozen or not, and the configuration), which sizes the frames. An exchange of fewer
        parameters has a first chunk no longer, except where a short tail joins it (a few elements more): that one
        goes after the flags instead (:meth:`_speculate`)."""
        total = max(1, sum(p.numel() for p in self.module.parameters()))
        chunk = self.compressor.chunk_numel(self._chunk_target())
        return chunk_lengths(total, chunk, absorb_tail=True)[0] if chunk is not None else total

    def _first_payload_capacity(self, numel: Optional[int] = None) -> HeaderCapacity:
        """The room a first chunk of ``numel`` elements (default: the model's, which sizes the frames) needs in a
        frame (``frames.HeaderCapacity``): its payload, sent to every rank."""
        return self.compressor.payload_bytes(self._model_first_chunk() if numel is None else numel)

    def _fits_frames(self, chunk: Chunk) -> bool:
        """Whether ``chunk``'s payload fits the frames (see :meth:`_model_first_chunk`)."""
        needed, room = self._first_payload_capacity(chunk.numel), self.header_capacity
        if isinstance(needed, int) and isinstance(room, int):
            return needed <= room
        assert isinstance(needed, list) and isinstance(room, list)
        return all(a <= b for a, b in zip(needed, room))

    def _prepare_chunk(self, chunk: Chunk, g: Tensor, indices: list[int]) -> tuple[HeaderPayload, Any]:
        """The first half of a chunk's rule, up to the payload it sends, changing no state (it may run before the
        flags are agreed): returns the payload (uint8: one for every rank, all-gathered, or one per destination rank,
        sent all-to-all) and what the rest of the rule needs. ``g`` as for :data:`ChunkRule`; ``indices`` are the
        exchanged parameters' places in ``flat.params``."""
        raise NotImplementedError(f"{type(self).__name__} has no gathered exchange.")

    def _received_length(self, payload: HeaderPayload) -> int:
        """The bytes of each payload this rank receives for ``payload`` sent (the same from every rank)."""
        if isinstance(payload, Tensor):
            return payload.numel()
        assert payload is not None
        return payload[self.comm.rank].numel()

    def _speculate(self, optimizer: Optimizer, params: list[nn.Parameter], scale: float) -> Optional[Speculation]:
        self._speculation = None  # one left by an exchange that failed half-way is stale
        if not self.header_capacity or not params:
            return None
        plan = self._chunk_plan(params)
        chunk = plan.chunks[0]
        if not self._fits_frames(chunk):  # every rank alike, where they agree; the verdict names them where not
            return None
        self._slot = 0  # the first chunk's slot in `_stream_exchanged`
        state = None if self.compressor.deterministic else self.compressor.state_dict()
        g = gather_chunk(chunk, [p.grad for p in params], self._buffer("g", chunk))
        if scale != 1.0:
            g.div_(scale)
        indices = [self.flat.index_of[id(p)] for p in params]
        payload, context = self._prepare_chunk(chunk, g, indices)
        return Speculation([id(p) for p in params], plan, g, payload, context, state)

    def _settle_speculation(self, speculation: Speculation, areas: Optional[list[Tensor]]) -> None:
        if areas is None:
            if speculation.compressor_state is not None:
                self.compressor.load_state_dict(speculation.compressor_state)  # as if it had never drawn
            return
        length = self._received_length(speculation.payload)
        speculation.gathered = [area[:length] for area in areas]
        self._speculation = speculation

    # ------------------------------------------------------------------ the streamed exchange
    def _chunk_plan(self, params: Sequence[nn.Parameter]) -> ChunkPlan:
        """``params``' elements in chunks of about ``bucket_cap_mb`` of float32, cut at the compressor's blocks."""
        numels = [p.numel() for p in params]
        chunk = self.compressor.chunk_numel(self._chunk_target())
        # A short tail joins the last chunk: it starts at a block boundary and ends the vector, so it is compressed
        # in the blocks it would be in as one vector, without a round trip of its own.
        return ChunkPlan(numels, chunk if chunk is not None else max(1, sum(numels)), absorb_tail=True)

    def _chunk_target(self) -> int:
        """The chunk length aimed at: a quarter of ``bucket_cap_mb`` in float32 (the compressor then cuts at its
        blocks). An exchange keeps three or four chunk-sized buffers for each of the two chunks it has on hand (one
        in flight, the next being prepared): quarter-bucket chunks hold them near two buckets."""
        return max(1, int(self.bucket_cap_mb * 2**20) // 16)

    def _buffer(self, name: str, chunk: Chunk) -> Tensor:
        """A float32 work buffer of the chunk's length, reused from step to step; one set per slot (see
        :meth:`_stream_exchanged`)."""
        return self._work.get(f"{name}/{self._slot}", chunk.numel, torch.float32, self.flat.buckets[0].device)

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

    def _stream_exchanged(
        self, params: list[nn.Parameter], indices: list[int], scale: float, finish: FinishRule, divisor: float = 1.0
    ) -> None:
        """:meth:`_stream` for a rule made of :meth:`_prepare_chunk`, one collective of its payload, and ``finish``.
        The first chunk is the one prepared before the flags and sent with them, where the step kept it.

        Pipelined: a chunk's payloads travel (a non-blocking all-gather) while this rank prepares the next chunk,
        and only then is it finished. The two chunks on hand use two sets of work buffers (slots 0 and 1, in turn);
        ``_prepare_chunk`` writes no state, so preparing the next chunk before finishing this one changes nothing
        but the order of the work."""
        speculation, self._speculation = self._speculation, None
        if speculation is not None and speculation.params != [id(p) for p in params]:
            raise RuntimeError("The speculated first chunk was prepared for another exchange.")  # a bug, not input
        plan = speculation.plan if speculation is not None else self._chunk_plan(params)
        grads = [p.grad for p in params]
        writer = ChunkWriter(gradient_of(params))
        on_hand: Optional[_ChunkInFlight] = None
        try:
            for number, chunk in enumerate(plan):
                self._slot = number % 2
                if number == 0 and speculation is not None:
                    g, payload, context = speculation.g, speculation.payload, speculation.context
                    receive: Callable[[], list[Tensor]] = lambda gathered=speculation.gathered: gathered  # noqa: E731
                else:
                    g = gather_chunk(chunk, grads, self._buffer("g", chunk))
                    if scale != 1.0:
                        g.div_(scale)
                    payload, context = self._prepare_chunk(chunk, g, indices)
                    receive = self._start_send(payload)
                if on_hand is not None:
                    self._finish_on_hand(on_hand, finish, writer, divisor, scale)
                on_hand = _ChunkInFlight(chunk, g, context, receive, self._slot)
                if not isinstance(payload, Tensor):  # an all-to-all: nothing travels in the background, finish now
                    self._finish_on_hand(on_hand, finish, writer, divisor, scale)
                    on_hand = None
            if on_hand is not None:
                self._finish_on_hand(on_hand, finish, writer, divisor, scale)
        finally:
            self._slot = 0
        writer.finish()

    def _finish_on_hand(
        self, on_hand: _ChunkInFlight, finish: FinishRule, writer: ChunkWriter, divisor: float, scale: float
    ) -> None:
        slot, self._slot = self._slot, on_hand.slot  # its own work buffers
        direction = finish(on_hand.chunk, on_hand.g, on_hand.context, on_hand.receive())
        writer.write(on_hand.chunk, direction, divisor, scale)
        self._slot = slot

    def _start_send(self, payload: HeaderPayload) -> Callable[[], list[Tensor]]:
        """Send what :meth:`_prepare_chunk` returned; the returned function waits for what this rank receives, in
        rank order: every rank's payload (a non-blocking all-gather), or the pieces addressed to this rank (an
        all-to-all, which has no non-blocking form here: done at once)."""
        if isinstance(payload, Tensor):
            return self.comm.start_all_gather_(payload).wait
        assert payload is not None
        received = self.comm.all_to_all_(torch.cat(payload), [p.numel() for p in payload])
        return lambda: received

    def _read_state(self, chunk: Chunk, views: Sequence[Tensor], name: str) -> Tensor:
        """The chunk's elements of per-parameter state ``views`` (the exchange's order) in work buffer ``name``."""
        return gather_chunk(chunk, views, self._buffer(name, chunk))

    def _state_chunk(self, chunk: Chunk, views: Sequence[Tensor], name: str) -> tuple[Tensor, bool]:
        """The chunk's float32 state: a view of the state itself where its pieces lie back to back (True: writing
        it is updating the state), else a copy in work buffer ``name`` (False: write it back)."""
        view = chunk_view(chunk, views, torch.float32)
        return (view, True) if view is not None else (self._read_state(chunk, views, name), False)

    def _decoded_sum_into(
        self, gathered: list[Tensor], out: Tensor, scratch: Tensor, own: Optional[Tensor] = None
    ) -> Tensor:
        """``out`` = the sum over ranks of what every rank's payload in ``gathered`` decodes to (the same bits on
        every rank: summed in rank order from 0); ``scratch`` is overwritten. ``own``: this rank's payload already
        decoded, which may be ``out`` itself with two ranks (a sum of two terms has the same bits in either order).
        Each payload is decoded and added in one pass where the compressor can (``decode_add_into``)."""
        compressor, rank = self.compressor, self.comm.rank
        if own is not None and own is out:
            if len(gathered) != 2:
                raise ValueError("Only a sum of two payloads can start from this rank's own in `out`.")
            return compressor.decode_add_into(gathered[1 - rank], out, out, scratch)
        if len(gathered) == 1:
            return out.copy_(own) if own is not None else compressor.decode_into(gathered[0], out)
        if own is not None and rank < 2:  # the first two terms: this rank's own plus the other's, in one pass
            compressor.decode_add_into(gathered[1 - rank], own, out, scratch)
        else:
            compressor.decode_add_into(gathered[1], compressor.decode_into(gathered[0], out), out, scratch)
        for other in range(2, len(gathered)):
            if own is not None and other == rank:
                out.add_(own)
            else:
                compressor.decode_add_into(gathered[other], out, out, scratch)
        return out

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
