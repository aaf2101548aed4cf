"""Bits and bytes of a compressed payload: sign bits packed 8 to a byte, and tensors viewed as raw bytes.

Bit order: element ``i`` is bit ``i % 8`` (least significant first) of byte ``i // 8``; the last byte's unused
high bits are zero. A payload is one flat ``uint8`` tensor, so every compressor's output travels in a single
collective whatever it holds (scales, signs, values, indices).
"""

from __future__ import annotations

import sys

import torch
from torch import Tensor

try:  # NumPy's comparison and bit packing are SIMD kernels; torch's `lt` into bool is not (see pack_negatives_into)
    import numpy as _numpy
except ImportError:  # torch runs without NumPy: the torch path below is then the only one
    _numpy = None

# Packing eight 0/1 bytes read as one little-endian int64 word w = sum_k b_k 2^(8k): w * MAGIC has the byte
# sum_k b_k 2^k in its top 8 bits (MAGIC = sum_k 2^(56 - 7k) puts b_k at bit 56 + k; every other product lands
# on a distinct bit below 56 or overflows past 63, so nothing carries into the result). One multiply and one
# shift per 8 elements, instead of a multiply-and-sum over an (n/8, 8) view.
_MAGIC = 0x0102040810204080
# Unpacking: row ``b`` of the table holds byte b's 8 bits, least significant first; one gather per byte.
_BITS_OF_BYTE = ((torch.arange(256).reshape(-1, 1) >> torch.arange(8)) & 1).bool()
_tables: dict[torch.device, Tensor] = {}


def packed_bits_bytes(numel: int) -> int:
    """Bytes that ``numel`` packed bits take."""
    return (numel + 7) // 8


def pack_bits(bits: Tensor) -> Tensor:
    """A 1-D ``uint8`` tensor of ``ceil(n / 8)`` bytes holding the ``n`` booleans of ``bits`` (any shape)."""
    flat = bits.reshape(-1)
    flat = flat.view(torch.uint8) if flat.dtype == torch.bool else (flat != 0).view(torch.uint8)
    padding = (-flat.numel()) % 8
    if padding:
        flat = torch.cat([flat, flat.new_zeros(padding)])
    elif flat.storage_offset() % 8:  # int64 words must start on a word boundary of the storage
        flat = flat.clone()
    if sys.byteorder != "little":  # the word trick reads bytes little-endian; x86, Arm and CUDA all are
        weights = torch.tensor([1 << bit for bit in range(8)], dtype=torch.uint8, device=flat.device)
        return (flat.view(-1, 8) * weights).sum(dim=1, dtype=torch.uint8)
    return ((flat.view(torch.int64) * _MAGIC) >> 56).to(torch.uint8)  # int64 products wrap: only bits 56-63 count


def pack_negatives_into(values: Tensor, scratch: Tensor, out: Tensor) -> Tensor:
    """``out`` (``uint8``, ``ceil(n / 8)`` bytes) = :func:`pack_bits` of ``values < 0`` (1-D float), computed in
    ``scratch`` (a ``bool`` buffer of at least ``8 * ceil(n / 8)`` elements starting on a word boundary, overwritten)
    without a temporary of the input's length: on CPU, temporaries of megabytes are page-faulted in again at every
    call.

    On CPU with NumPy, the comparison and the packing are NumPy's: torch 2.13 compares into ``bool`` one element at a
    time (0.11 to 0.14 ms per MiB of float32 on one thread here, more than a memcpy of the same bytes), NumPy's SIMD
    ``less`` and ``packbits`` take 0.02 to 0.06 for the same bits (``benchmarks/codec_speed.py``)."""
    numel, nbytes = values.numel(), packed_bits_bytes(values.numel())
    if _numpy is not None and values.device.type == "cpu" and out.device.type == "cpu":
        bits = scratch[:numel].numpy()
        _numpy.less(values.detach().numpy(), 0, out=bits)
        out.numpy()[:] = _numpy.packbits(bits, bitorder="little")  # its output is n / 8 bytes: no page faults
        return out
    if sys.byteorder != "little" or scratch.storage_offset() % 8:
        return out.copy_(pack_bits(values < 0))
    bits = scratch[: 8 * nbytes]
    torch.lt(values, 0, out=bits[:numel])
    bits[numel:].zero_()
    words = bits.view(torch.uint8).view(torch.int64)
    words.mul_(_MAGIC).bitwise_right_shift_(56)  # as in pack_bits, in place: the bits are not needed again
    return out.copy_(words)  # int64 to uint8 keeps the low byte, as `.to(torch.uint8)` does


def unpack_bits(packed: Tensor, numel: int) -> Tensor:
    """The first ``numel`` booleans packed by :func:`pack_bits`."""
    if packed.numel() != packed_bits_bytes(numel):
        raise ValueError(f"{numel} bits take {packed_bits_bytes(numel)} bytes, got {packed.numel()}.")
    table = _tables.get(packed.device)
    if table is None:
        table = _tables[packed.device] = _BITS_OF_BYTE.to(packed.device)
    return table.index_select(0, packed.reshape(-1).long()).reshape(-1)[:numel]


def as_bytes(tensor: Tensor) -> Tensor:
    """``tensor``'s elements as raw bytes (a copy when it is not contiguous)."""
    return tensor.contiguous().reshape(-1).view(torch.uint8)


def from_bytes(data: Tensor, dtype: torch.dtype) -> Tensor:
    """Raw bytes back as elements of ``dtype`` (a copy, so that the result is aligned whatever the offset)."""
    return data.clone().view(dtype)
