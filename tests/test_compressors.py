"""Exact tests of the compressors, their packed payloads and error feedback."""

from __future__ import annotations

import math
import pickle

import pytest
import torch
from plain_references import documented_sum

from lightning_localsgd.compression import (
    QSGD,
    NoCompression,
    ScaledSign,
    TopK,
    make_compressor,
    pack_bits,
    packing,
    unpack_bits,
)
from lightning_localsgd.compression.error_feedback import compress_with_feedback, decode_mean
from lightning_localsgd.compression.packing import pack_negatives_into

SIZES = [0, 1, 7, 8, 9, 63, 1000]
TWO_ELEMENT_BLOCKS_MB = 8 / 2**20  # blocks of two float32 elements


def test_bits_are_packed_least_significant_first_and_the_last_byte_is_padded_with_zeros():
    bits = torch.tensor([1, 0, 0, 0, 0, 0, 0, 1, 0, 1], dtype=torch.bool)
    packed = pack_bits(bits)
    assert packed.dtype == torch.uint8
    assert packed.tolist() == [1 + 128, 2]
    assert unpack_bits(packed, 10).tolist() == bits.tolist()


@pytest.mark.parametrize("numel", SIZES)
def test_bits_round_trip_at_odd_sizes(numel):
    bits = torch.rand(numel, generator=torch.Generator().manual_seed(numel)) < 0.5
    packed = pack_bits(bits)
    assert packed.numel() == math.ceil(numel / 8)
    assert torch.equal(unpack_bits(packed, numel), bits)


@pytest.mark.parametrize("with_numpy", [True, False])
def test_negatives_packed_in_place_are_the_bits_of_v_below_zero_whatever_the_scratch_held(with_numpy, monkeypatch):
    # The scaled sign's allocation-free packing: the same bytes as packing `v < 0` bit by bit (least significant
    # first, the last byte padded with zeros), -0.0 and NaN not negative, through a scratch buffer left dirty by a
    # longer vector before; through NumPy's kernels on CPU, and through torch's where NumPy is missing.
    if not with_numpy:
        monkeypatch.setattr(packing, "_numpy", None)
    scratch = torch.ones(8 * 200, dtype=torch.bool)
    for numel in (*SIZES, 1001):
        v = torch.randn(numel, generator=torch.Generator().manual_seed(numel))
        v[::5] = -0.0
        v[::7] = float("nan")
        negative = [bool(x < 0) for x in v.tolist()]
        expected = [sum(1 << bit for bit, flag in enumerate(negative[i : i + 8]) if flag) for i in range(0, numel, 8)]
        out = torch.full((math.ceil(numel / 8),), 77, dtype=torch.uint8)
        assert pack_negatives_into(v, scratch, out).tolist() == expected


def test_unpacking_the_wrong_number_of_bytes_is_refused():
    with pytest.raises(ValueError, match="9 bits take 2 bytes"):
        unpack_bits(torch.zeros(1, dtype=torch.uint8), 9)


def test_scaled_sign_is_the_mean_magnitude_times_the_sign_per_block():
    v = torch.tensor([1.0, -2.0, 3.0, 0.0, -5.0])
    compressor = ScaledSign(TWO_ELEMENT_BLOCKS_MB)
    payload, decoded = compressor.compress(v)
    # Blocks [1, -2], [3, 0], [-5]: scales 1.5, 1.5, 5; a zero decodes as +scale (one bit cannot say 0).
    assert decoded.tolist() == [1.5, -1.5, 1.5, 1.5, -5.0]
    assert payload.numel() == 3 * 4 + 1 == compressor.payload_bytes(5)
    assert payload[:12].view(torch.float32).tolist() == [1.5, 1.5, 5.0]
    assert payload[12].item() == 0b00010010  # elements 1 and 4 are negative


def reference_scaled_sign(v: torch.Tensor, block: int) -> torch.Tensor:
    """(||b||_1 / numel(b)) * sign(b) per block b, the sum in the payload format's order (plain Python floats); a zero
    gets +scale (one bit cannot say 0)."""
    out = torch.empty(v.numel(), dtype=torch.float32)
    flat = v.reshape(-1).float()
    for start in range(0, flat.numel(), block):
        part = flat[start : start + block]
        scale = torch.tensor(documented_sum(part.tolist()) / part.numel(), dtype=torch.float64).float()
        out[start : start + block] = torch.where(part < 0, -scale, scale)
    return out


@pytest.mark.parametrize("block", [1, 2, 16, 100])
@pytest.mark.parametrize("numel", SIZES)
def test_scaled_sign_matches_a_plain_torch_reference_at_odd_sizes_and_blocks(numel, block):
    v = torch.randn(numel, generator=torch.Generator().manual_seed(numel + block)) * 10
    v[::5] = 0.0  # zeros too
    payload, decoded = ScaledSign(4 * block / 2**20).compress(v)
    assert torch.equal(decoded, reference_scaled_sign(v, block))
    assert payload.numel() == 4 * math.ceil(numel / block) + math.ceil(numel / 8)


@pytest.mark.parametrize("threads", [1, 4])
def test_scaled_sign_scales_keep_their_bits_on_blocks_of_millions_whatever_the_threads(threads):
    # The payload format (2): each block's scale is the float64 sum of |v| in the documented order (at this size the
    # order of a sum changes its last bits), divided by the block's length, rounded to float32.
    block = 2**20
    v = torch.randn(3 * block + 12_345, generator=torch.Generator().manual_seed(7)) * 1e3
    expected = torch.tensor([documented_sum(b.tolist()) / b.numel() for b in v.split(block)], dtype=torch.float64)
    expected = expected.float()
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        payload = ScaledSign(4 * block / 2**20).encode(v)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(payload[: 4 * expected.numel()].view(torch.float32), expected)


def test_scaled_sign_reuses_its_float64_buffer_for_the_next_vector_and_does_not_pickle_it():
    # The scale's float64 buffer is kept between calls: a second, different vector must not see the first's values
    # (a shorter last block reads only its own part), and a pickled compressor must not carry megabytes with it.
    compressor = ScaledSign(4 * 2**16 / 2**20)
    generator = torch.Generator().manual_seed(3)
    for numel in (3 * 2**16, 2**16 + 5, 17):
        v = torch.randn(numel, generator=generator) * numel
        expected = torch.tensor([documented_sum(b.tolist()) / b.numel() for b in v.split(2**16)]).float()
        assert torch.equal(compressor.encode(v)[: 4 * expected.numel()].view(torch.float32), expected)
    assert len(pickle.dumps(compressor)) < 4096
    assert torch.equal(pickle.loads(pickle.dumps(compressor)).encode(v), compressor.encode(v))


def test_one_scaled_sign_block_is_about_one_thirty_second_of_float32():
    numel = 1_000_000
    assert ScaledSign().payload_bytes(numel) / (4 * numel) == pytest.approx(1 / 32, rel=1e-3)


@pytest.mark.parametrize(
    "compressor", [ScaledSign(TWO_ELEMENT_BLOCKS_MB), TopK(0.3), QSGD(5, 16 / 2**20), NoCompression()]
)
@pytest.mark.parametrize("numel", SIZES)
def test_payload_size_depends_only_on_numel_and_decodes_to_numel_elements(compressor, numel):
    v = torch.randn(numel, generator=torch.Generator().manual_seed(numel))
    payload, decoded = compressor.compress(v)
    assert payload.dtype == torch.uint8 and payload.dim() == 1
    assert payload.numel() == compressor.payload_bytes(numel)
    assert decoded.dtype == torch.float32 and decoded.shape == (numel,)
    assert torch.equal(compressor.decode(payload.clone(), numel), decoded)
    if numel == 1 and not isinstance(compressor, QSGD):
        assert decoded.tolist() == v.tolist()  # one element: its own scale, its own sign


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("compressor", [ScaledSign(TWO_ELEMENT_BLOCKS_MB), TopK(0.25), NoCompression()])
def test_half_precision_inputs_are_compressed_as_their_float32_values(compressor, dtype):
    v = torch.randn(37, generator=torch.Generator().manual_seed(3)).to(dtype)
    assert torch.equal(compressor.encode(v), compressor.encode(v.float()))


def test_top_k_keeps_the_largest_magnitudes_exactly_and_zeroes_the_rest():
    v = torch.tensor([0.1, -4.0, 2.0, 0.0, 3.0, -0.5, 1.0])
    compressor = TopK(0.4)  # ceil(0.4 * 7) = 3 elements
    payload, decoded = compressor.compress(v)
    assert payload.numel() == 3 * 8
    assert decoded.tolist() == [0.0, -4.0, 2.0, 0.0, 3.0, 0.0, 0.0]
    assert sorted(decoded[decoded != 0].abs().tolist()) == [2.0, 3.0, 4.0]


def test_qsgd_levels_are_the_floor_or_ceiling_and_unbiased():
    v = torch.tensor([0.3, -1.2, 0.0, 2.5, -0.7])
    compressor = QSGD(levels=4, block_size_mb=1.0)
    norm = float(v.norm())
    draws = torch.stack([compressor.compress(v)[1] for _ in range(4000)])
    scaled = draws / norm * 4
    # Every decoded value is a whole level next to levels * |v| / norm, with v's sign.
    ratio = v.abs() / norm * 4
    near_floor = (scaled.abs() - ratio.floor()).abs() < 1e-4
    near_ceiling = (scaled.abs() - ratio.ceil()).abs() < 1e-4
    assert torch.all(near_floor | near_ceiling)
    assert torch.all(draws * v.sign() >= 0)
    # Unbiased: the mean of the draws approaches v (standard error at most norm / levels / 2 / sqrt(draws)).
    tolerance = 5 * norm / 4 / 2 / math.sqrt(len(draws))
    assert torch.allclose(draws.mean(dim=0), v, atol=tolerance)


def test_qsgd_random_stream_is_per_rank_and_restored_exactly():
    v = torch.randn(50, generator=torch.Generator().manual_seed(0))
    a, b = QSGD(levels=3), QSGD(levels=3)
    b.seed_for_rank(1)
    assert not torch.equal(a.encode(v), b.encode(v))
    state = a.state_dict()
    expected = [a.encode(v) for _ in range(3)]
    restored = QSGD(levels=3)
    restored.load_state_dict(state)
    assert all(torch.equal(restored.encode(v), e) for e in expected)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: make_compressor("powersgd"), "must be one of 'sign', 'topk', 'qsgd', 'none'"),
        (lambda: make_compressor("topk", k=3), "Bad options for compressor 'topk'"),
        (lambda: TopK(0.0), "ratio"),
        (lambda: QSGD(levels=300), "at most 127"),
        (lambda: ScaledSign(0.0), "block_size_mb"),
    ],
)
def test_bad_compressor_arguments_are_refused_up_front(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_a_payload_of_the_wrong_size_is_refused():
    with pytest.raises(ValueError, match="13 bytes"):
        ScaledSign(TWO_ELEMENT_BLOCKS_MB).decode(torch.zeros(12, dtype=torch.uint8), 5)


@pytest.mark.parametrize("compressor", [ScaledSign(TWO_ELEMENT_BLOCKS_MB), TopK(0.2), QSGD(3, 16 / 2**20)])
def test_error_feedback_keeps_exactly_what_the_compression_lost(compressor):
    g = torch.Generator().manual_seed(1)
    error = torch.zeros(40)
    sent_total = torch.zeros(40)
    input_total = torch.zeros(40)
    for _ in range(20):
        v = torch.randn(40, generator=g)
        before = error.clone()
        payload = compress_with_feedback(compressor, v, error)
        decoded = compressor.decode(payload, 40)
        assert torch.allclose(decoded + error, v + before, atol=1e-6)
        if isinstance(compressor, ScaledSign):  # and what was sent is C(v + e), from the test's own C
            assert torch.allclose(decoded, reference_scaled_sign(v + before, 2), atol=1e-6)
        sent_total += decoded
        input_total += v
    # Delayed, never dropped: what was sent plus what is still owed is everything that came in.
    assert torch.allclose(sent_total + error, input_total, atol=1e-4)


def test_decode_mean_sums_in_rank_order():
    compressor = NoCompression()
    payloads = [compressor.encode(torch.tensor([1.0, 2.0])), compressor.encode(torch.tensor([3.0, -2.0]))]
    assert decode_mean(compressor, payloads, 2).tolist() == [2.0, 0.0]
