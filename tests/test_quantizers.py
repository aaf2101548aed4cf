"""Exact tests of the int8 / int4 block quantisers and SparseLoCo's chunked top-k (quantizers.py).

Expected values come from closed forms written here (hand-made vectors and plain reference loops), never from the
module itself.
"""

from __future__ import annotations

import math
import pickle

import pytest
import torch

from lightning_localsgd.compression import Int4Quantizer, Int8Quantizer, SparseTopK
from lightning_localsgd.compression.compressors import COMPRESSORS, make_compressor

QMAX = {Int8Quantizer: 127, Int4Quantizer: 7}
NUMELS = [0, 1, 2, 3, 7, 8, 9, 63, 64, 65, 127, 1000, 4096, 4097, 8193]


def f32_bytes(*values: float) -> list[int]:
    return torch.tensor(values, dtype=torch.float32).view(torch.uint8).tolist()


def i16_bytes(*values: int) -> list[int]:
    return torch.tensor(values, dtype=torch.int16).view(torch.uint8).tolist()


def randn(numel: int, seed: int) -> torch.Tensor:
    return torch.randn(numel, generator=torch.Generator().manual_seed(seed))


def distinct_magnitudes(numel: int, seed: int) -> torch.Tensor:
    """Random signs times a permutation of 0..numel-1 plus a random fraction: magnitudes all different (top-k is
    unique) and, being random, never on a midpoint between two levels (the nearest level is unique)."""
    g = torch.Generator().manual_seed(seed)
    signs = torch.where(torch.rand(numel, generator=g) < 0.5, -1.0, 1.0)
    fractions = 0.05 + 0.9 * torch.rand(numel, generator=g)
    v = signs * (torch.randperm(numel, generator=g) + fractions) / numel
    assert v.abs().unique().numel() == numel
    return v


CONFIGS = [
    ("int8", {"block_numel": 5}),
    ("int4", {"block_numel": 5}),
    ("int8", {}),
    ("int4", {}),
    ("sparse_topk", {"chunk_numel": 16, "k": 3, "value_bits": 2}),
    ("sparse_topk", {"chunk_numel": 7, "k": 7, "value_bits": 4}),
    ("sparse_topk", {"chunk_numel": 32, "k": 5, "value_bits": 8}),
    ("sparse_topk", {}),
]
DEFAULTS = {"block_numel": 4096, "chunk_numel": 4096, "k": 64, "value_bits": 2}


def config_id(config: tuple[str, dict]) -> str:
    return config[0] + "".join(f"-{key}{value}" for key, value in config[1].items())


@pytest.fixture(params=CONFIGS, ids=config_id)
def config(request) -> tuple[str, dict]:
    """A compressor's name and its options, with the defaults filled in (the closed forms below read them)."""
    name, options = request.param
    keys = ("block_numel",) if name in ("int8", "int4") else ("chunk_numel", "k", "value_bits")
    return name, {key: options.get(key, DEFAULTS[key]) for key in keys}


# --- hand-made payloads ------------------------------------------------------------------------------------------


def test_int8_codes_are_round_of_v_over_max_over_127():
    v = torch.tensor([1.0, -0.5, 0.25, 0.0])
    compressor = Int8Quantizer(block_numel=4)
    payload = compressor.encode(v)
    scale = torch.tensor(1.0) / 127
    # v / scale = [127, -63.5, 31.75, 0] (-0.5 / fl(1/127) rounds to exactly -63.5 in float32): -63.5 goes to even.
    codes = [127, -64, 32, 0]
    assert payload.tolist() == f32_bytes(scale.item()) + [c % 256 for c in codes]
    assert torch.equal(compressor.decode(payload, 4), torch.tensor(codes, dtype=torch.float32) * scale)


def test_int8_codes_are_clamped_and_halves_round_to_even():
    # max 127 gives scale exactly 1: codes are round(v), halves to even.
    v = torch.tensor([127.0, 2.5, -2.5, 3.5, -126.5, 0.49])
    payload = Int8Quantizer(block_numel=6).encode(v)
    assert payload[4:].view(torch.int8).tolist() == [127, 2, -2, 4, -126, 0]


def test_int4_nibbles_low_is_even_index_high_is_odd_index_stored_as_code_plus_8():
    v = torch.tensor([7.0, -7.0, 2.0, -3.0, 0.4])  # max 7: scale 1, codes round(v)
    payload = Int4Quantizer(block_numel=8).encode(v)
    # codes [7, -7, 2, -3, 0] + 8 = [15, 1, 10, 5, 8]; the odd count pads the last high nibble with 0
    assert payload.tolist() == [*f32_bytes(1.0), 15 | 1 << 4, 10 | 5 << 4, 8]
    assert Int4Quantizer(block_numel=8).decode(payload, 5).tolist() == [7.0, -7.0, 2.0, -3.0, 0.0]


def test_int4_scales_are_per_block_in_order_and_a_zero_block_has_scale_zero():
    v = torch.tensor([1.5, -2.0, 0.0, 0.0, 14.0])
    compressor = Int4Quantizer(block_numel=2)
    payload = compressor.encode(v)
    s0 = torch.tensor(2.0) / 7  # blocks [1.5, -2], [0, 0], [14]
    assert payload[:12].tolist() == f32_bytes(s0.item(), 0.0, 2.0)
    # codes: round(1.5 * 7 / 2) = round(5.25) = 5, round(-2 / s0) = -7, 0, 0, round(14 / 2) = 7
    assert payload[12:].tolist() == [(5 + 8) | (-7 + 8) << 4, 8 | 8 << 4, 7 + 8]
    decoded = compressor.decode(payload, 5)
    assert torch.equal(
        decoded, torch.stack([5 * s0, -7 * s0, torch.tensor(0.0), torch.tensor(0.0), torch.tensor(14.0)])
    )


def test_sparse_topk_keeps_the_k_largest_per_chunk_with_2_bit_levels():
    # Chunk 1 (8 elements, k = 3): |v| largest at positions 1 (3.0), 6 (2.5), 3 (1.2); m = 3, levels -3, -1, 1, 3.
    # Chunk 2 (the 2-element tail keeps min(3, 2) = 2): m = 0.5, levels -0.5, -1/6, 1/6, 0.5.
    v = torch.tensor([0.1, -3.0, 0.2, 1.2, 0.0, -0.9, 2.5, 0.05, 0.5, -0.25])
    compressor = SparseTopK(chunk_numel=8, k=3, value_bits=2)
    payload = compressor.encode(v)
    # codes j (levels (2j - 3) / 3 * m): -3 -> 0, 1.2 -> 2 (1), 2.5 -> 3 (3); 0.5 -> 3, -0.25 -> 1 (-1/6)
    codes = [0, 2, 3, 3, 1]
    packed = [codes[0] | codes[1] << 2 | codes[2] << 4 | codes[3] << 6, codes[4]]
    assert payload.tolist() == f32_bytes(3.0, 0.5) + i16_bytes(1, 3, 6, 0, 1) + packed
    assert payload.numel() == compressor.payload_bytes(10) == 4 * 2 + 2 * 5 + 2
    decoded = compressor.decode(payload, 10)
    expected = torch.tensor([0.0, -3.0, 0.0, 1.0, 0.0, 0.0, 3.0, 0.0, 0.5, -0.5 / 3])
    torch.testing.assert_close(decoded, expected, rtol=1e-6, atol=0)
    assert decoded[:8].tolist() == [0.0, -3.0, 0.0, 1.0, 0.0, 0.0, 3.0, 0.0]  # m = 3: levels exact


def reference_sparse_topk(v: torch.Tensor, chunk: int, k: int, bits: int) -> torch.Tensor:
    """Plain loops: per chunk the k largest |v| (distinct), each at the nearest of (2j - L) / L * m, L = 2**b - 1."""
    top = 2**bits - 1
    out = [0.0] * v.numel()
    values = v.tolist()
    for start in range(0, len(values), chunk):
        piece = values[start : start + chunk]
        kept = sorted(range(len(piece)), key=lambda i: -abs(piece[i]))[: min(k, len(piece))]
        m = max(abs(piece[i]) for i in kept)
        levels = [(2 * j - top) / top * m for j in range(top + 1)]
        for i in kept:
            out[start + i] = min(levels, key=lambda level, x=piece[i]: abs(level - x))
    return torch.tensor(out, dtype=torch.float32)


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize(
    ("numel", "chunk", "k"), [(100, 16, 3), (64, 16, 16), (37, 10, 4), (5, 8, 6), (40000, 4096, 8)]
)
def test_sparse_topk_matches_a_plain_reference(bits, numel, chunk, k):
    v = distinct_magnitudes(numel, seed=numel + bits)
    decoded = SparseTopK(chunk_numel=chunk, k=k, value_bits=bits).compress(v)[1]
    torch.testing.assert_close(decoded, reference_sparse_topk(v, chunk, k, bits), rtol=1e-6, atol=0)
    kept = sum(min(k, numel - start) for start in range(0, numel, chunk))
    assert int((decoded != 0).sum()) == kept  # 2**b levels, none zero: every kept value is sent


def test_default_sparse_topk_is_148_bytes_per_4096_floats_about_110x():
    compressor = make_compressor("sparse_topk")
    assert compressor.payload_bytes(4096) == 4 + 64 * 2 + 64 * 2 // 8 == 148
    assert 110 < 4 * 4096 / compressor.payload_bytes(4096) < 111


# --- error bounds ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", [Int8Quantizer, Int4Quantizer])
@pytest.mark.parametrize(("numel", "block"), [(1001, 1), (1001, 3), (1001, 64), (999, 1000), (1001, 4096), (64, 64)])
def test_block_quantisation_error_is_at_most_half_a_step(cls, numel, block):
    v = randn(numel, seed=block) * torch.linspace(0.01, 10, numel)  # blocks of very different magnitudes
    payload, decoded = cls(block_numel=block).compress(v)
    blocks = math.ceil(numel / block)
    scales = torch.stack([v[b * block : (b + 1) * block].abs().max() / QMAX[cls] for b in range(blocks)])
    assert payload[: 4 * blocks].view(torch.float32).tolist() == scales.tolist()
    per_element = scales.repeat_interleave(block)[:numel]
    assert bool(((decoded - v).abs() <= per_element / 2 * (1 + 1e-5)).all())


@pytest.mark.parametrize("cls", [Int8Quantizer, Int4Quantizer])
def test_zeros_decode_to_zeros_without_nan_next_to_a_nonzero_block(cls):
    compressor = cls(block_numel=4)
    zeros = torch.zeros(10)
    assert torch.equal(compressor.compress(zeros)[1], zeros)
    v = torch.tensor([0.0, 0.0, 0.0, 0.0, 3.0, -1.0, 0.5, 0.0, 0.0, 0.0])
    payload, decoded = compressor.compress(v)
    assert payload[:12].view(torch.float32)[[0, 2]].tolist() == [0.0, 0.0]
    assert not decoded.isnan().any()
    assert decoded[:4].tolist() == [0.0] * 4 and decoded[8:].tolist() == [0.0, 0.0]
    assert decoded[4].item() == 3.0  # the block's largest magnitude: qmax * (3 / qmax)


def test_sparse_topk_zero_chunks_decode_to_zeros():
    compressor = SparseTopK(chunk_numel=4, k=2)
    assert torch.equal(compressor.compress(torch.zeros(9))[1], torch.zeros(9))
    v = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 6.0, -2.0, 1.0, 0.0])
    decoded = compressor.compress(v)[1]
    assert decoded.tolist() == [0.0, 0.0, 0.0, 0.0, 0.0, 6.0, -2.0, 0.0, 0.0]  # 2-bit levels +-2, +-6


def test_a_selected_zero_decodes_as_the_smallest_positive_level():
    # Fewer nonzeros than k: one zero is selected; 0 is the midpoint of -m/3 and m/3, and the tie goes to even j = 2.
    decoded = SparseTopK(chunk_numel=4, k=2, value_bits=2).compress(torch.tensor([0.0, 0.0, 6.0, 0.0]))[1]
    assert sorted(decoded.tolist()) == [0.0, 0.0, 2.0, 6.0]


# --- sizes, chunks, determinism, decode_into -------------------------------------------------------------------


def expected_bytes(name: str, options: dict, numel: int) -> int:
    if name == "int8":
        return 4 * math.ceil(numel / options["block_numel"]) + numel
    if name == "int4":
        return 4 * math.ceil(numel / options["block_numel"]) + math.ceil(numel / 2)
    chunk, k = options["chunk_numel"], options["k"]
    kept = sum(min(k, numel - start) for start in range(0, numel, chunk))
    return 4 * math.ceil(numel / chunk) + 2 * kept + math.ceil(kept * options["value_bits"] / 8)


def test_payload_bytes_is_exact_at_every_size(config):
    name, options = config
    compressor = make_compressor(name, **options)
    for numel in NUMELS:
        payload, decoded = compressor.compress(randn(numel, seed=numel))
        assert payload.dtype == torch.uint8 and payload.dim() == 1
        assert payload.numel() == compressor.payload_bytes(numel) == expected_bytes(name, options, numel), numel
        assert decoded.shape == (numel,) and decoded.dtype == torch.float32
        assert not decoded.isnan().any()


@pytest.mark.parametrize("target", [1, 10, 100, 5000])
def test_chunk_by_chunk_equals_whole(config, target):
    name, options = config
    compressor = make_compressor(name, **options)
    unit = options.get("block_numel", options.get("chunk_numel"))
    v = randn(9001, seed=target)  # two default blocks and a short one
    chunk = compressor.chunk_numel(target)
    assert chunk % unit == 0 and chunk == max(1, target // unit) * unit
    pieces = [compressor.compress(piece)[1] for piece in v.split(chunk)]
    assert torch.equal(torch.cat(pieces), compressor.compress(v)[1])


def test_encoding_is_deterministic_and_other_float_dtypes_are_read_as_float32(config):
    name, options = config
    compressor = make_compressor(name, **options)
    v = randn(2000, seed=1)
    assert torch.equal(compressor.encode(v), compressor.encode(v.clone()))
    strided = torch.stack([v, -v], dim=1)[:, 0]  # the same values, not contiguous
    assert torch.equal(compressor.encode(strided), compressor.encode(v))
    for dtype in (torch.float64, torch.bfloat16, torch.float16):
        other = randn(2000, seed=2).to(dtype)
        assert torch.equal(compressor.encode(other), compressor.encode(other.float())), dtype
    ties = torch.ones(2000)  # equal magnitudes: whatever top-k picks, it picks it every time
    assert torch.equal(compressor.encode(ties), compressor.encode(ties.clone()))


def test_decode_into_and_compress_values_into_write_what_decode_gives(config):
    name, options = config
    compressor = make_compressor(name, **options)
    for numel in (0, 1, 9, 1000, 4097):
        v = randn(numel, seed=numel)
        payload = compressor.encode(v)
        decoded = compressor.decode(payload, numel)
        out = torch.full((numel,), float("nan"))
        assert compressor.decode_into(payload, out) is out
        assert torch.equal(out, decoded)
        shifted = torch.cat([torch.zeros(3, dtype=torch.uint8), payload])[3:]  # an odd offset, as in a packed batch
        assert torch.equal(compressor.decode_into(shifted, torch.full((numel,), 7.0)), decoded)
        values = torch.full((numel,), float("nan"))
        assert torch.equal(compressor.compress_values_into(v, values), decoded)


# --- registry and arguments ---------------------------------------------------------------------------------------


def test_registry_names_and_determinism():
    assert COMPRESSORS["int8"] is Int8Quantizer
    assert COMPRESSORS["int4"] is Int4Quantizer
    assert COMPRESSORS["sparse_topk"] is SparseTopK
    assert all(COMPRESSORS[name].deterministic for name in ("int8", "int4", "sparse_topk"))
    made = make_compressor("sparse_topk", chunk_numel=256, k=8, value_bits=4)
    assert (made.chunk_numel(1), made.k, made.value_bits) == (256, 8, 4)
    assert repr(made) == "SparseTopK(chunk_numel=256, k=8, value_bits=4)"
    assert make_compressor("int4", block_numel=32).block_numel == 32
    v = randn(300, seed=3)
    for compressor in (made, make_compressor("int8", block_numel=7)):  # plain values: they travel by pickle
        assert torch.equal(pickle.loads(pickle.dumps(compressor)).encode(v), compressor.encode(v))


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: Int8Quantizer(block_numel=0), "`block_numel` must be an integer >= 1"),
        (lambda: make_compressor("int4", block_numel=2.5), "`block_numel` must be an integer >= 1"),
        (lambda: make_compressor("int8", bits=4), "Bad options for compressor 'int8'"),
        (lambda: SparseTopK(chunk_numel=0), "`chunk_numel` must be an integer >= 1"),
        (lambda: SparseTopK(chunk_numel=2**15 + 1), "at most 32768"),
        (lambda: SparseTopK(chunk_numel=16, k=0), "`k` must be an integer >= 1"),
        (lambda: SparseTopK(chunk_numel=16, k=17), r"`k` must be at most `chunk_numel` \(16\)"),
        (lambda: SparseTopK(value_bits=3), "`value_bits` must be 2, 4 or 8"),
        (lambda: SparseTopK(value_bits=True), "`value_bits` must be 2, 4 or 8"),
    ],
)
def test_bad_arguments_are_refused_up_front(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_a_payload_of_the_wrong_size_is_refused(config):
    name, options = config
    compressor = make_compressor(name, **options)
    payload = compressor.encode(randn(100, seed=0))
    with pytest.raises(ValueError, match="payload"):
        compressor.decode(payload[:-1], 100)
