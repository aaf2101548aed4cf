"""Bits and bytes of a compressed payload: sign bits packed 8 to a byte, and tensors viewed as raw bytes.

Bit order: element ``i`` is bit ``i % 8`` (least significant first) of byte ``i // 8``; the last byte's unused
high bits are zero. A payload is one flat ``uint8`` tensor, so every compressor's output travels in a single
collective whatever it holds (scales, signs, values, indices).
"""

from __future__ import annotations

import torch
from torch import Tensor

_BIT_WEIGHTS = [1 << bit for bit in range(8)]


def packed_bits_bytes(numel: int) -> int:
    """Bytes that ``numel`` packed bits take."""
    return (numel + 7) // 8


def pack_bits(bits: Tensor) -> Tensor:
    """A 1-D ``uint8`` tensor of ``ceil(n / 8)`` bytes holding the ``n`` booleans of ``bits`` (any shape)."""
    flat = bits.reshape(-1).to(torch.uint8)
    padding = (-flat.numel()) % 8
    if padding:
        flat = torch.cat([flat, flat.new_zeros(padding)])
    weights = torch.tensor(_BIT_WEIGHTS, dtype=torch.uint8, device=flat.device)
    # Each group of 8 bits sums to at most 255: the byte, with no overflow in uint8.
    return (flat.view(-1, 8) * weights).sum(dim=1, dtype=torch.uint8)


def unpack_bits(packed: Tensor, numel: int) -> Tensor:
    """The first ``numel`` booleans packed by :func:`pack_bits`."""
    if packed.numel() != packed_bits_bytes(numel):
        raise ValueError(f"{numel} bits take {packed_bits_bytes(numel)} bytes, got {packed.numel()}.")
    shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
    bits = (packed.reshape(-1, 1) >> shifts) & 1
    return bits.reshape(-1)[:numel].bool()


def as_bytes(tensor: Tensor) -> Tensor:
    """``tensor``'s elements as raw bytes (a copy when it is not contiguous)."""
    return tensor.contiguous().reshape(-1).view(torch.uint8)


def from_bytes(data: Tensor, dtype: torch.dtype) -> Tensor:
    """Raw bytes back as elements of ``dtype`` (a copy, so that the result is aligned whatever the offset)."""
    return data.clone().view(dtype)
