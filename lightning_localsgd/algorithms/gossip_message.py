"""A gossip message and its header: what a neighbour exchange carries, read as one vector and cut into chunks.

A message is one optimizer's parameters, the normalisation buffers gossiped this step, then what the algorithm
carries beside them (DeTAG's tracker), in that order (:class:`Message`). Each chunk travels after a small header:
"this chunk is finite" and the sender's position (step and round within the step), which the receiver checks before
it mixes anything (:mod:`.gossip`). The inf/NaN checks here read each value once, through the C kernels where they
run (:mod:`.gossip_native`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor

from lightning_localsgd.algorithms.chunks import Chunk, ChunkPlan, Piece, gather_chunk
from lightning_localsgd.algorithms.gossip_native import kernels_for
from lightning_localsgd.algorithms.guard import SYNC_POINT_KINDS

HEADER = 3  # slots: finite flag, position split in two exact halves (float32 holds integers below 2**24)
_HALF = 2**22
ROUNDS_PER_STEP = 64  # at most this many gossip rounds in one step (positions count them)

# One chunk of a message (the chunk and its values' buffer): take the gossip's result for it.
ChunkFn = Callable[[Chunk, Tensor], None]
# ... or fill it, and say whether the values are all finite where the fill found out on the way (None: it did not,
# and the exchange reads them once more to check).
FillFn = Callable[[Chunk, Tensor], Optional[bool]]
# Where a chunk's last round may write straight away (no pass through the message buffer): for each range of the
# chunk, its offset, length, a flat CPU float32 view to write, and an optional second one (DeTAG's direction).
Output = tuple[int, int, Tensor, Optional[Tensor]]
TargetsFn = Callable[[Chunk], Optional[list[Output]]]


def write_header(message: Tensor, finite: bool, at: int) -> None:
    """The header's slots of ``message``: its finiteness and the sender's position ``at``."""
    # Filled on the message's device: a header built on the host would be a blocking copy to the GPU per exchange.
    message[0] = 1.0 if finite else 0.0
    message[1] = float(at // _HALF)
    message[2] = float(at % _HALF)


def describe_position(at: int) -> str:
    """A header's position in words, for errors."""
    step = at // ROUNDS_PER_STEP // len(SYNC_POINT_KINDS)
    return f"step {step}, gossip round {at % ROUNDS_PER_STEP}"


def read_headers(messages: Sequence[Tensor]) -> list[tuple[bool, int]]:
    """Each message's header: finite, position. One host read for all of them (one sync per exchange on a GPU)."""
    if not messages:
        return []
    values = torch.stack([m[:HEADER] for m in messages]).tolist()
    return [(flag == 1.0, int(high) * _HALF + int(low)) for flag, high, low in values]


def values_finite(tensors: Sequence[Tensor]) -> bool:
    """Whether every element is finite: one read of each tensor, one host sync, and no copy of it (a float64 sum or
    ``isfinite`` would allocate a tensor's size again). Exact: a minimum or maximum is inf/NaN iff an element is."""
    flags = []
    for t in tensors:
        if t.numel() == 0:
            continue
        kernels = kernels_for(t)
        if kernels is not None:  # CPU float32: the kernel reads the exponent bits, no comparisons
            if not kernels.all_finite(t):
                return False
            continue
        flags.append(torch.isfinite(torch.stack(torch.aminmax(t.detach()))).all())
    return bool(torch.stack(flags).all()) if flags else True


def gather_chunk_checked(chunk: Chunk, tensors: Sequence[Optional[Tensor]], out: Tensor) -> Optional[bool]:
    """:func:`~.chunks.gather_chunk`, and whether the chunk is all finite where the kernels could tell on the way
    (every piece a CPU float32 vector copied into a float32 chunk), else None."""
    target = out[: chunk.numel]
    finite: Optional[bool] = True
    for piece in chunk.pieces:
        destination = target[piece.at : piece.at + piece.length]
        source = tensors[piece.index]
        kernels = kernels_for(source, destination) if source is not None else None
        if kernels is not None:
            assert source is not None
            piece_finite = kernels.copy_finite(source.view(-1)[piece.start : piece.start + piece.length], destination)
            if finite is not None:
                finite = finite and piece_finite
            continue
        gather_chunk(Chunk(0, piece.length, (Piece(piece.index, piece.start, piece.length, 0),)), tensors, destination)
        if source is not None:
            finite = None
    return finite


def offset_of(chunk: Chunk, first_segment: int) -> int:
    """Where in ``chunk`` the elements of segment ``first_segment`` and later begin (segments come in order)."""
    return next((piece.at for piece in chunk.pieces if piece.index >= first_segment), chunk.numel)


def shifted(chunk: Chunk, at: int, first_segment: int) -> Chunk:
    """Elements ``[at, numel)`` of ``chunk`` as a chunk of their own, segment ``first_segment`` renumbered 0 (the
    part of a message that one list of tensors, e.g. DeTAG's per-parameter tracker, fills)."""
    part = chunk.part(at, chunk.numel - at)
    pieces = tuple(Piece(piece.index - first_segment, piece.start, piece.length, piece.at) for piece in part.pieces)
    return Chunk(part.start, part.numel, pieces)


@dataclass(frozen=True)
class Message:
    """What one optimizer's gossip carries, read as one vector: ``segments`` in order (the replica's parameters,
    then the buffers gossiped this step, then the carried per-parameter state), cut into ``plan``'s chunks."""

    segments: list[Tensor]
    plan: ChunkPlan
    first_buffer: int  # segments [first_buffer, first_carried) are normalisation buffers: mixed by plain gossip
    first_carried: int

    @property
    def chunks(self) -> list[Chunk]:
        # An empty message is still one (empty) exchange: every rank issues the same exchanges, and a guard flag.
        return self.plan.chunks or [Chunk(0, 0, ())]

    def plain(self, chunk: Chunk) -> slice:
        """The chunk's elements that are buffers."""
        return slice(offset_of(chunk, self.first_buffer), offset_of(chunk, self.first_carried))
