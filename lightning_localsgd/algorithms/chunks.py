"""A list of tensors read as one long vector, a chunk at a time, without ever building that vector.

The per-step exchanges (compressed gradients, gossip) used to concatenate a whole optimizer's gradients, errors and
results into vectors of the whole model, several at once: seven or eight float32 copies of the model at the peak.
A :class:`ChunkPlan` cuts the concatenation of ``numels`` into chunks of a fixed length and says, for each chunk,
which slice of which tensor lands where. :func:`gather_chunk` copies one chunk into a reused buffer (converting the
dtype, a missing tensor reading as zeros) and a :class:`ChunkWriter` writes chunks back, so an exchange holds a few
chunk-sized buffers whatever the model size. Elements are in each tensor's logical (row-major) order, the order of
``tensor.reshape(-1)``, as the whole-vector code had them: results do not depend on where the chunks are cut.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor


@dataclass(frozen=True)
class Piece:
    """Elements ``[start, start + length)`` of tensor ``index`` sit at ``[at, at + length)`` of the chunk."""

    index: int
    start: int
    length: int
    at: int


@dataclass(frozen=True)
class Chunk:
    """``numel`` consecutive elements of the whole vector, from ``start``, and the tensor slices they come from."""

    start: int  # offset of the chunk in the whole vector
    numel: int
    pieces: tuple[Piece, ...]

    def part(self, start: int, numel: int) -> Chunk:
        """Elements ``[start, start + numel)`` of this chunk, as a chunk of their own (e.g. one rank's shard)."""
        end = start + numel
        pieces = []
        for piece in self.pieces:
            low, high = max(piece.at, start), min(piece.at + piece.length, end)
            if low < high:
                pieces.append(Piece(piece.index, piece.start + low - piece.at, high - low, low - start))
        return Chunk(self.start + start, numel, tuple(pieces))


def chunk_lengths(numel: int, chunk_numel: int, absorb_tail: bool = False) -> list[int]:
    """The lengths of the chunks that cut ``numel`` elements every ``chunk_numel`` (the last one shorter). With
    ``absorb_tail``, a last chunk shorter than half a chunk joins the one before it: a collective for a few
    elements would cost a whole round trip."""
    lengths = [min(chunk_numel, numel - start) for start in range(0, numel, chunk_numel)]
    if absorb_tail and len(lengths) > 1 and lengths[-1] < chunk_numel // 2:
        lengths[-2:] = [lengths[-2] + lengths[-1]]
    return lengths


class ChunkPlan:
    """The concatenation of tensors of ``numels`` elements, in chunks of ``chunk_numel`` (see :func:`chunk_lengths`;
    every chunk but the last starts at a multiple of ``chunk_numel``)."""

    def __init__(self, numels: Sequence[int], chunk_numel: int, absorb_tail: bool = False) -> None:
        if chunk_numel < 1:
            raise ValueError(f"`chunk_numel` must be at least 1, got {chunk_numel}.")
        self.numels = list(numels)
        self.numel = sum(self.numels)
        self.chunk_numel = chunk_numel
        self.chunks: list[Chunk] = []
        index, offset = 0, 0  # the tensor being cut and how far into it
        start = 0
        for length in chunk_lengths(self.numel, chunk_numel, absorb_tail):
            pieces, at = [], 0
            while at < length:
                while self.numels[index] == offset:  # skip empty tensors and finished ones
                    index, offset = index + 1, 0
                take = min(length - at, self.numels[index] - offset)
                pieces.append(Piece(index, offset, take, at))
                offset += take
                at += take
            self.chunks.append(Chunk(start, length, tuple(pieces)))
            start += length

    def __len__(self) -> int:
        return len(self.chunks)

    def __iter__(self) -> Iterator[Chunk]:
        return iter(self.chunks)


def _flat_view(tensor: Tensor) -> Optional[Tensor]:
    """``tensor`` as a 1-D view in logical order, or None where no view exists (e.g. channels_last)."""
    return tensor.view(-1) if tensor.is_contiguous() else None


def gather_chunk(chunk: Chunk, tensors: Sequence[Optional[Tensor]], out: Tensor) -> Tensor:
    """``out[:chunk.numel]``, filled with the chunk's elements of ``tensors`` (None: zeros) in ``out``'s dtype."""
    target = out[: chunk.numel]
    for piece in chunk.pieces:
        destination = target[piece.at : piece.at + piece.length]
        source = tensors[piece.index]
        if source is None:
            destination.zero_()
            continue
        flat = _flat_view(source)
        if flat is None:  # a strided tensor: its logical order needs a copy of it (one parameter, not the model)
            flat = source.reshape(-1)
        destination.copy_(flat[piece.start : piece.start + piece.length])
    return target


def chunk_view(chunk: Chunk, tensors: Sequence[Optional[Tensor]], dtype: torch.dtype) -> Optional[Tensor]:
    """The chunk's elements as one 1-D view of ``tensors``' memory, where its pieces lie back to back in one storage
    and in ``dtype`` (state buffers of consecutive parameters in a bucket): the exchange then updates the state in
    place instead of copying it out and back. ``None`` where they do not."""
    first: Optional[Tensor] = None
    end = 0
    for piece in chunk.pieces:
        tensor = tensors[piece.index]
        if tensor is None or tensor.dtype != dtype or not tensor.is_contiguous():
            return None
        part = tensor.view(-1)[piece.start : piece.start + piece.length]
        if first is None:
            first = part
        elif part.untyped_storage().data_ptr() != first.untyped_storage().data_ptr() or part.storage_offset() != end:
            return None
        end = part.storage_offset() + piece.length
    return None if first is None else first.as_strided((chunk.numel,), (1,))


class ChunkWriter:
    """Writes chunks (as from :func:`gather_chunk`) into the tensors ``target_of(index)`` returns (``None``: leave
    that tensor alone), converting to each tensor's dtype.

    A strided target (no flat view) is staged as a copy in logical order and written whole by :meth:`finish`: until
    then it keeps its values, so chunks gathered later still read what it held, and elements no chunk wrote (another
    rank's shard) stay as they were.
    """

    def __init__(self, target_of: Callable[[int], Optional[Tensor]]) -> None:
        self.target_of = target_of
        self._staged: dict[int, tuple[Tensor, Tensor]] = {}

    def write(self, chunk: Chunk, values: Tensor, divisor: float = 1.0, scale: float = 1.0) -> None:
        """Write ``values / divisor * scale`` (rounded after each operation, as in ``values``' dtype). Where a
        target is a flat view in that dtype, the division and scaling land in it directly (no pass over ``values``
        first); elsewhere they are done in ``values``, which is then scratch."""
        for piece in chunk.pieces:
            target = self.target_of(piece.index)
            if target is None:
                continue
            part = values[piece.at : piece.at + piece.length]
            flat = _flat_view(target)
            if flat is not None and flat.dtype == part.dtype and (divisor != 1.0 or scale != 1.0):
                destination = flat[piece.start : piece.start + piece.length]
                if divisor != 1.0:
                    torch.div(part, divisor, out=destination)
                else:
                    destination.copy_(part)
                if scale != 1.0:
                    destination.mul_(scale)
                continue
            if divisor != 1.0:
                part.div_(divisor)
            if scale != 1.0:
                part.mul_(scale)
            if flat is None:
                staged = self._staged.get(piece.index)
                if staged is None:
                    staged = self._staged[piece.index] = (target, target.reshape(-1).clone())
                flat = staged[1]
            flat[piece.start : piece.start + piece.length].copy_(part)

    def finish(self) -> None:
        """Write the staged strided targets."""
        for target, values in self._staged.values():
            target.copy_(values.view(target.shape))
        self._staged = {}


def gradient_of(params: Sequence[Tensor]) -> Callable[[int], Tensor]:
    """A :class:`ChunkWriter` target: ``params[i].grad``, created where it is missing (in the parameter's memory
    format, as autograd would give it), for exchanges that write the direction to step on chunk by chunk."""

    def target(index: int) -> Tensor:
        param = params[index]
        if param.grad is None:
            param.grad = torch.empty_like(param)
        return param.grad

    return target


class ChunkBuffers:
    """Chunk-sized work buffers, kept between steps (allocated once per size, dtype and device)."""

    def __init__(self) -> None:
        self._buffers: dict[tuple[str, torch.dtype, torch.device], Tensor] = {}

    def get(self, name: str, numel: int, dtype: torch.dtype, device: torch.device) -> Tensor:
        key = (name, dtype, device)
        buffer = self._buffers.get(key)
        if buffer is None or buffer.numel() < numel:
            buffer = self._buffers[key] = torch.empty(numel, dtype=dtype, device=device)
        return buffer[:numel]

    def clear(self) -> None:
        self._buffers = {}
