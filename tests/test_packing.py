"""Sign bits on the wire: pack_bits / unpack_bits against the documented format, written out bit by bit here."""

from __future__ import annotations

import pytest
import torch

from lightning_localsgd.compression.packing import pack_bits, unpack_bits


def reference_pack(bits: list[bool]) -> list[int]:
    """Element i is bit i % 8 (least significant first) of byte i // 8; the last byte's unused bits are zero."""
    packed = [0] * ((len(bits) + 7) // 8)
    for i, bit in enumerate(bits):
        if bit:
            packed[i // 8] |= 1 << (i % 8)
    return packed


@pytest.mark.parametrize("numel", [1, 7, 8, 9, 63, 64, 65, 1000, 4099])
def test_packed_bytes_follow_the_documented_bit_order_and_unpack_to_the_same_bits(numel):
    generator = torch.Generator().manual_seed(numel)
    bits = torch.rand(numel, generator=generator) < 0.5
    packed = pack_bits(bits)
    assert packed.dtype == torch.uint8
    assert packed.tolist() == reference_pack(bits.tolist())
    assert torch.equal(unpack_bits(packed, numel), bits)


def test_every_byte_value_round_trips_and_all_ones_fill_every_bit():
    every_byte = torch.arange(256, dtype=torch.uint8)
    bits = unpack_bits(every_byte, 256 * 8)
    assert bits.view(256, 8).tolist() == [[(b >> k) & 1 == 1 for k in range(8)] for b in range(256)]
    assert torch.equal(pack_bits(bits), every_byte)
    assert pack_bits(torch.ones(16, dtype=torch.bool)).tolist() == [255, 255]


def test_views_at_any_offset_and_non_boolean_masks_pack_like_fresh_tensors():
    bits = torch.rand(203, generator=torch.Generator().manual_seed(0)) < 0.5
    for offset in range(1, 9):  # slices whose storage does not start on an 8-byte boundary
        view = bits[offset : offset + 128]
        assert pack_bits(view).tolist() == reference_pack(view.tolist())
    strided = bits[::3]
    assert pack_bits(strided).tolist() == reference_pack(strided.tolist())
    as_float = bits.float() * 3.0  # nonzero means set
    assert pack_bits(as_float).tolist() == reference_pack(bits.tolist())
    assert pack_bits(bits.view(7, 29)).tolist() == reference_pack(bits.tolist())  # any shape, row-major


def test_a_payload_of_the_wrong_length_is_refused():
    with pytest.raises(ValueError, match="9 bits take 2 bytes, got 1"):
        unpack_bits(torch.zeros(1, dtype=torch.uint8), 9)
