"""Quantisers for DiLoCo's pseudo-gradients: per-block int8 / int4, and SparseLoCo's chunked top-k.

* :class:`Int8Quantizer` (``"int8"``) and :class:`Int4Quantizer` (``"int4"``): symmetric round-to-nearest
  quantisation with one float32 scale per block, as INTELLECT-1 (int8 with per-row scales) and Streaming DiLoCo
  (Douillard et al., arXiv 2501.18512, 4-bit) send their pseudo-gradients.
* :class:`SparseTopK` (``"sparse_topk"``): the ``k`` largest magnitudes of every chunk, with their positions in the
  chunk and their values on 2, 4 or 8 bits ("Communication Efficient LLM Pre-training with SparseLoCo", Sarfi et
  al., arXiv 2508.15706).

All three are deterministic (the same input gives the same payload bits on every rank, which DiLoCo's all-gather
of payloads needs: every rank decodes every payload itself), and cut into independent blocks or chunks, so that a
vector compressed chunk by chunk at :meth:`~Compressor.chunk_numel` gives what it gives compressed whole.

Whole blocks are processed as one ``(blocks, block_numel)`` view and the shorter last block on its own: no Python
loop over blocks (their default size, 4096, makes millions of blocks for a large model).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from lightning_localsgd._validation import check_int
from lightning_localsgd.compression.compressors import Compressor, _check_payload, _flat_float32, _whole_blocks
from lightning_localsgd.compression.packing import as_bytes, from_bytes

MAX_SPARSE_CHUNK = 2**15  # positions within a chunk are stored as int16


def _split(flat: Tensor, block: int) -> tuple[Tensor, Tensor]:
    """``flat`` (contiguous) as a ``(whole blocks, block)`` view and the shorter last block (possibly empty)."""
    whole = flat.numel() // block
    return flat[: whole * block].view(whole, block), flat[whole * block :]


def _pack_codes(codes: Tensor, bits: int) -> Tensor:
    """Unsigned ``bits``-bit codes (a uint8 vector) packed ``8 // bits`` to a byte, little-endian: code ``i`` is at
    bit ``(i * bits) % 8`` of byte ``i * bits // 8``; unused high bits of the last byte are zero."""
    per = 8 // bits
    if per == 1:
        return codes.clone()
    padding = (-codes.numel()) % per
    if padding:
        codes = torch.cat([codes, codes.new_zeros(padding)])
    rows = codes.view(-1, per)
    packed = rows[:, 0].clone()
    for slot in range(1, per):  # at most 4 slots: one vectorised shift-or per slot, not per element
        packed.bitwise_or_(rows[:, slot] << (slot * bits))
    return packed


def _unpack_codes(packed: Tensor, bits: int, count: int) -> Tensor:
    """The first ``count`` codes packed by :func:`_pack_codes`, as uint8."""
    per = 8 // bits
    if per == 1:
        return packed[:count]
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)
    return ((packed.unsqueeze(1) >> shifts) & ((1 << bits) - 1)).reshape(-1)[:count]


class BlockQuantizer(Compressor):
    """Symmetric round-to-nearest quantisation with one float32 scale per block of ``block_numel`` elements (the
    last block may be shorter); the base of :class:`Int8Quantizer` and :class:`Int4Quantizer`.

    Per block: ``scale = max|v| / qmax`` and ``code = round(v / scale)`` clamped to ``[-qmax, qmax]`` (``torch.round``:
    halves to even); a block of zeros has scale 0 and codes 0. Decoded: ``code * scale``, so every element is within
    ``scale / 2`` of its value and the block's largest magnitude is sent (up to rounding) exactly.

    Payload: the float32 scales of the blocks in order, then the codes (see the subclasses for their layout).

    Args:
        block_numel: elements per block (at least 1). Smaller blocks follow the values more closely and cost
            4 bytes each.
    """

    bits: int = 0  # bits per code: set by the subclasses
    qmax: int = 0

    def __init__(self, block_numel: int = 4096) -> None:
        if self.bits not in (4, 8):
            raise TypeError(f"{type(self).__name__} is a base class: use Int8Quantizer or Int4Quantizer.")
        self.block_numel = check_int("block_numel", block_numel, 1)

    def _blocks(self, numel: int) -> int:
        return math.ceil(numel / self.block_numel)

    def _code_bytes(self, numel: int) -> int:
        return (numel * self.bits + 7) // 8

    def payload_bytes(self, numel: int) -> int:
        return 4 * self._blocks(numel) + self._code_bytes(numel)

    def chunk_numel(self, target: int) -> int:
        return _whole_blocks(target, self.block_numel)

    def _scales(self, flat: Tensor) -> Tensor:
        """``max|v| / qmax`` of every block. ``aminmax`` instead of ``abs().amax()``: no temporary the size of the
        vector; a maximum is exact, so the result does not depend on how the reduction is split across threads."""
        head, tail = _split(flat, self.block_numel)
        amax = flat.new_empty(self._blocks(flat.numel()))
        if head.numel():
            low, high = torch.aminmax(head, dim=1)
            torch.maximum(high, low.neg(), out=amax[: head.shape[0]])
        if tail.numel():
            low, high = torch.aminmax(tail)
            amax[-1] = torch.maximum(high, low.neg())  # a 0-dim tensor: no read on the host
        return amax.div_(self.qmax)

    def _codes_into(self, flat: Tensor, scales: Tensor, out: Tensor) -> Tensor:
        """``round(v / scale)`` clamped to ``[-qmax, qmax]``, as float32 written into ``out``."""
        safe = torch.where(scales > 0, scales, torch.ones_like(scales))  # a zero block: 0 / 1 = 0, not 0 / 0 = NaN
        head, tail = _split(flat, self.block_numel)
        out_head, out_tail = _split(out, self.block_numel)
        if head.numel():
            torch.div(head, safe[: head.shape[0]].unsqueeze(1), out=out_head)
        if tail.numel():
            torch.div(tail, safe[-1:], out=out_tail)
        return out.round_().clamp_(-self.qmax, self.qmax)

    def _scale_(self, out: Tensor, scales: Tensor) -> Tensor:
        """Codes in ``out`` times their block's scale, in place: the decoded values."""
        head, tail = _split(out, self.block_numel)
        if head.numel():
            head.mul_(scales[: head.shape[0]].unsqueeze(1))
        if tail.numel():
            tail.mul_(scales[-1:])
        return out

    def _pack_into(self, codes: Tensor, dest: Tensor) -> None:
        """The float32 codes (integers in ``[-qmax, qmax]``) written as payload bytes into ``dest``."""
        raise NotImplementedError

    def _unpack_into(self, packed: Tensor, out: Tensor) -> None:
        """The codes of ``packed`` written into ``out`` as float32."""
        raise NotImplementedError

    def encode(self, tensor: Tensor) -> Tensor:
        flat = _flat_float32(tensor)
        if flat.numel() == 0:
            return torch.zeros(0, dtype=torch.uint8, device=flat.device)
        scales = self._scales(flat)
        codes = self._codes_into(flat, scales, torch.empty_like(flat))
        payload = torch.empty(self.payload_bytes(flat.numel()), dtype=torch.uint8, device=flat.device)
        payload[: 4 * scales.numel()].view(torch.float32).copy_(scales)  # offset 0: aligned
        self._pack_into(codes, payload[4 * scales.numel() :])
        return payload

    def decode(self, payload: Tensor, numel: int) -> Tensor:
        return self.decode_into(payload, torch.empty(numel, dtype=torch.float32, device=payload.device))

    def decode_into(self, payload: Tensor, out: Tensor) -> Tensor:
        numel = out.numel()
        _check_payload(payload, self.payload_bytes(numel), type(self).__name__)
        if numel == 0:
            return out
        blocks = self._blocks(numel)
        scales = from_bytes(payload[: 4 * blocks], torch.float32)  # a copy: float32 needs an aligned start
        self._unpack_into(payload[4 * blocks :], out)
        return self._scale_(out, scales)

    def compress_values_into(self, tensor: Tensor, out: Tensor) -> Tensor:
        # The same float32 codes times the same scales as decode: bit for bit decode(encode(tensor)), unpacked.
        flat = _flat_float32(tensor)
        if flat.numel() == 0:
            return out
        scales = self._scales(flat)
        return self._scale_(self._codes_into(flat, scales, out), scales)


class Int8Quantizer(BlockQuantizer):
    """:class:`BlockQuantizer` to int8: ``qmax = 127``, one signed byte (two's complement) per element after the
    scales. About 1/4 of float32: 1,049,600 bytes for 2**20 elements in blocks of 4096."""

    name = "int8"
    bits = 8
    qmax = 127

    def _pack_into(self, codes: Tensor, dest: Tensor) -> None:
        dest.view(torch.int8).copy_(codes)  # exact integers: the conversion only changes the type

    def _unpack_into(self, packed: Tensor, out: Tensor) -> None:
        out.copy_(packed.view(torch.int8))  # a one-byte view needs no alignment, and no copy


class Int4Quantizer(BlockQuantizer):
    """:class:`BlockQuantizer` to 4 bits: ``qmax = 7``, codes in ``[-7, 7]``.

    Codes after the scales, two per byte: element ``2i`` in the low nibble of byte ``i`` and element ``2i + 1`` in
    its high nibble, each stored as ``code + 8`` (0..15; 0 never occurs). An odd element count leaves the last
    byte's high nibble zero. About 1/8 of float32: 525,312 bytes for 2**20 elements in blocks of 4096.
    """

    name = "int4"
    bits = 4
    qmax = 7

    def _pack_into(self, codes: Tensor, dest: Tensor) -> None:
        dest.copy_(_pack_codes(codes.add_(8).to(torch.uint8), 4))

    def _unpack_into(self, packed: Tensor, out: Tensor) -> None:
        # Nibbles straight into the even and odd elements of out: temporaries of half the payload, not of the vector.
        out[0::2].copy_(packed & 0xF)
        out[1::2].copy_(packed[: out.numel() // 2] >> 4)
        out.sub_(8)


_LEVEL_TABLES: dict[tuple[int, torch.device], Tensor] = {}


def _levels(bits: int, device: torch.device) -> Tensor:
    """``(2j - L) / L`` for ``j = 0..L``, ``L = 2**bits - 1``, as float32: the levels in units of the chunk's
    largest magnitude (exactly -1 and 1 at the ends)."""
    table = _LEVEL_TABLES.get((bits, device))
    if table is None:
        top = 2**bits - 1
        levels = torch.tensor([(2 * j - top) / top for j in range(top + 1)], dtype=torch.float32)
        table = _LEVEL_TABLES[(bits, device)] = levels.to(device)  # built once per device: no copy per call
    return table


class SparseTopK(Compressor):
    """SparseLoCo's compression: per chunk of ``chunk_numel`` elements, the ``k`` largest magnitudes, their values
    quantised on ``value_bits`` bits; the decoded vector is zero elsewhere.

    Per chunk (the last one may be shorter and keeps ``min(k, its length)`` elements): the positions of the ``k``
    largest ``|v|`` (``torch.topk``: among equal magnitudes, the ones it picks, the same for the same input on CPU;
    a GPU may pick others), sent in increasing order; ``m`` = the largest of them; each value goes to the nearest
    of the ``2**b`` levels ``(2j - (2**b - 1)) / (2**b - 1) * m``, ``j = 0..2**b - 1`` (2 bits: ``-m, -m/3, m/3,
    m``). Zero is not a level: the selected values are the chunk's largest, and error feedback carries the
    rest. A value halfway between two levels goes to the level of even ``j`` (``torch.round``: halves to even);
    in particular a selected 0 (a chunk with fewer than ``k`` nonzeros) decodes as ``+m / (2**b - 1)``, and a
    chunk of zeros (``m = 0``) as zeros.

    Payload: the chunks' float32 ``m``, then every selected position within its chunk as int16 (chunk by chunk),
    then the codes ``j``, ``b`` bits each, packed little-endian within a byte (code ``i`` at bit ``(i * b) % 8`` of
    byte ``i * b // 8``; the last byte padded with zeros). With the defaults (4096, 64, 2 bits), 4 + 64 * 2 + 16 =
    148 bytes per 16,384 bytes of float32: about 110x smaller (37,888 bytes for 2**20 elements).

    Args:
        chunk_numel: elements per chunk, 1 to 32768 (positions are int16).
        k: elements kept per chunk, 1 to ``chunk_numel``.
        value_bits: bits per kept value: 2, 4 or 8.
    """

    name = "sparse_topk"

    def __init__(self, chunk_numel: int = 4096, k: int = 64, value_bits: int = 2) -> None:
        chunk = check_int("chunk_numel", chunk_numel, 1)
        if chunk > MAX_SPARSE_CHUNK:
            raise ValueError(
                f"`chunk_numel` must be at most {MAX_SPARSE_CHUNK} (positions in a chunk are int16), got {chunk}."
            )
        self.k = check_int("k", k, 1)
        if self.k > chunk:
            raise ValueError(f"`k` must be at most `chunk_numel` ({chunk}), got {k}.")
        if isinstance(value_bits, bool) or value_bits not in (2, 4, 8):
            raise ValueError(f"`value_bits` must be 2, 4 or 8, got {value_bits!r}.")
        self.value_bits = int(value_bits)
        self._chunk = chunk  # not `self.chunk_numel`: that name is the Compressor method

    def __repr__(self) -> str:
        return f"SparseTopK(chunk_numel={self._chunk}, k={self.k}, value_bits={self.value_bits})"

    def _layout(self, numel: int) -> tuple[int, int, int]:
        """``(chunks, whole chunks, elements kept)`` for a vector of ``numel`` elements."""
        whole, tail = divmod(numel, self._chunk)
        return whole + (tail > 0), whole, whole * self.k + min(self.k, tail)

    def payload_bytes(self, numel: int) -> int:
        chunks, _, kept = self._layout(numel)
        return 4 * chunks + 2 * kept + (kept * self.value_bits + 7) // 8

    def chunk_numel(self, target: int) -> int:
        return _whole_blocks(target, self._chunk)

    def _select(self, chunk: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """Positions (increasing, along the last dimension) and values of the ``k`` largest magnitudes."""
        positions = torch.topk(chunk.abs(), k, dim=-1, sorted=False).indices.sort(dim=-1).values
        return positions, chunk.gather(-1, positions)

    def encode(self, tensor: Tensor) -> Tensor:
        flat = _flat_float32(tensor)
        if flat.numel() == 0:
            return torch.zeros(0, dtype=torch.uint8, device=flat.device)
        head, tail = _split(flat, self._chunk)
        parts = []  # (positions, values, m) of the whole chunks, then of the last one
        if head.numel():
            positions, values = self._select(head, self.k)
            parts.append((positions.reshape(-1), values, values.abs().amax(dim=1)))
        if tail.numel():
            positions, values = self._select(tail, min(self.k, tail.numel()))
            parts.append((positions, values.unsqueeze(0), values.abs().amax().reshape(1)))
        top = 2**self.value_bits - 1
        codes = []
        for _, values, m in parts:
            safe = torch.where(m > 0, m, torch.ones_like(m)).unsqueeze(1)  # a zero chunk: all values 0, decoded 0
            # j = round((v / m + 1) * L / 2): the nearest level index (v / m in [-1, 1]).
            codes.append((values / safe).add_(1).mul_(top / 2).round_().clamp_(0, top).reshape(-1))
        scales = torch.cat([m for _, _, m in parts])
        positions = torch.cat([p for p, _, _ in parts]).to(torch.int16)
        packed = _pack_codes(torch.cat(codes).to(torch.uint8), self.value_bits)
        return torch.cat([as_bytes(scales), as_bytes(positions), packed])

    def decode(self, payload: Tensor, numel: int) -> Tensor:
        return self.decode_into(payload, torch.empty(numel, dtype=torch.float32, device=payload.device))

    def decode_into(self, payload: Tensor, out: Tensor) -> Tensor:
        numel = out.numel()
        _check_payload(payload, self.payload_bytes(numel), "SparseTopK")
        chunks, whole, kept = self._layout(numel)
        out.zero_()
        if numel == 0:
            return out
        scales = from_bytes(payload[: 4 * chunks], torch.float32)  # copies: aligned whatever the payload's offset
        positions = from_bytes(payload[4 * chunks : 4 * chunks + 2 * kept], torch.int16).long()
        codes = _unpack_codes(payload[4 * chunks + 2 * kept :], self.value_bits, kept)
        values = _levels(self.value_bits, payload.device).index_select(0, codes.long())
        head, tail = _split(out, self._chunk)
        held = whole * self.k  # elements kept in the whole chunks
        if whole:
            head_values = values[:held].view(whole, self.k).mul_(scales[:whole].unsqueeze(1))
            head.scatter_(1, positions[:held].view(whole, self.k), head_values)
        if tail.numel():
            tail.scatter_(0, positions[held:], values[held:].mul_(scales[-1:]))
        return out


__all__ = ["MAX_SPARSE_CHUNK", "BlockQuantizer", "Int4Quantizer", "Int8Quantizer", "SparseTopK"]
