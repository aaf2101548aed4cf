"""The scaled sign's payload format 2 and its CPU implementations: the C kernel, and the fallback (NumPy or torch).

The expected sums come from the order ``sign_kernels.c`` documents, written in plain Python floats (float64) in
``plain_references.documented_sum``;
the expected sign bits from ``x < 0`` bit by bit. Both implementations must give those bits, and so each other's.
"""

from __future__ import annotations

import ctypes
import logging
import math
import subprocess
import warnings
from pathlib import Path

import pytest
import torch
from native_utils import assert_refused, fresh_load, required
from plain_references import documented_sum

from lightning_localsgd.compression import ScaledSign, native, sign_format
from lightning_localsgd.native import build

SIZES = [0, 1, 7, 8, 9, 1023, 1024, 1025, 2 * 1024 + 8 * 5 + 3, 5000]  # no lane, one pass, 2 and 3 visits


def documented_bits(values: list[float]) -> list[int]:
    return [sum(1 << k for k, v in enumerate(values[i : i + 8]) if v < 0) for i in range(0, len(values), 8)]


def awkward_vector(numel: int, seed: int) -> torch.Tensor:
    """Sums that round at almost every addition (magnitudes 2^42 apart), so that the order shows in their bits;
    -0.0 and zeros."""
    return sign_format.mixed_magnitudes(numel, seed)


def built_kernels() -> native.SignKernels:
    return required(sign_format.kernels(), "the scaled sign's C kernels")


def documented_decode(payload: torch.Tensor, x: torch.Tensor, block_elements: int) -> torch.Tensor:
    """What ``payload``, encoded from ``x``, decodes to by the format: each block's float32 scale from the payload's
    head, -scale where x < 0 and +scale elsewhere (independent of the decoders under test)."""
    out = torch.empty_like(x)
    for index, start in enumerate(range(0, x.numel(), block_elements)):
        scale = payload[4 * index : 4 * index + 4].view(torch.float32).item()
        block = x[start : start + block_elements]
        out[start : start + block_elements] = torch.where(block < 0, -scale, scale)
    return out


def signs_times(scale: float, x: torch.Tensor) -> list[float]:
    """``-scale`` where ``x < 0``, ``+scale`` elsewhere, as Python floats (what the bits decode to)."""
    return [-scale if v < 0 else scale for v in x.tolist()]


def rounded_once(values: list[float]) -> list[float]:
    """Python floats (exact sums of two float32 here) rounded once to float32."""
    return torch.tensor(values, dtype=torch.float64).float().tolist()


def encoded_bits(kernels: native.SignKernels, x: torch.Tensor) -> torch.Tensor:
    """``x``'s sign bits, as the kernel's encode writes them (tested against ``documented_bits`` above)."""
    bits = torch.zeros(math.ceil(x.numel() / 8), dtype=torch.uint8)
    kernels.abs_sum_signs(x, bits)
    return bits


@pytest.fixture
def fresh_native(monkeypatch, tmp_path):
    """A process that has not loaded the kernels yet, building into an empty cache."""
    yield from fresh_load(monkeypatch, tmp_path, native.reset)


@pytest.mark.parametrize("with_numpy", [True, False])
@pytest.mark.parametrize("numel", SIZES)
def test_the_fallback_sum_follows_the_documented_order(numel, with_numpy, monkeypatch):
    if not with_numpy:
        monkeypatch.setattr(sign_format, "_numpy", None)
    for seed in range(8):  # another order shows on some 10 % of such vectors
        x = awkward_vector(numel, 100 * numel + seed)
        assert sign_format.ordered_abs_sum_(x.double().abs()).item() == documented_sum(x.tolist())


def test_the_documented_order_is_not_torch_sum_order():
    # The point of fixing an order: on such vectors a float64 sum in another order has other bits (torch's own here).
    vectors = [awkward_vector(2 * 1024 + 43, seed) for seed in range(8)]
    assert any(x.double().abs().sum().item() != documented_sum(x.tolist()) for x in vectors)


@pytest.mark.parametrize("numel", SIZES)
def test_the_kernel_sums_and_packs_as_documented(numel):
    kernels = built_kernels()
    for seed in range(8):
        x = awkward_vector(numel, 100 * numel + seed)
        bits = torch.full((math.ceil(numel / 8),), 0xAA, dtype=torch.uint8)
        assert kernels.abs_sum_signs(x, bits) == documented_sum(x.tolist())
        assert bits.tolist() == documented_bits(x.tolist())
        assert kernels.abs_sum_signs(x, None) == documented_sum(x.tolist())  # the scale alone writes no bits


@pytest.mark.parametrize("numel", SIZES)
def test_the_kernel_decodes_plus_minus_scale_from_the_bits(numel):
    kernels = built_kernels()
    x = awkward_vector(numel, numel + 2)
    bits = encoded_bits(kernels, x)
    out = torch.full((numel,), float("nan"))
    kernels.decode(bits, 0.8125, out)
    assert out.tolist() == signs_times(0.8125, x)


@pytest.mark.parametrize("numel", SIZES)
def test_the_kernel_adds_what_it_decodes_with_one_rounding(numel):
    kernels = built_kernels()
    x = awkward_vector(numel, numel + 3)
    addend = torch.randn(numel, generator=torch.Generator().manual_seed(numel)) * 1e-3
    bits = encoded_bits(kernels, x)
    out = torch.full((numel,), float("nan"))
    kernels.decode_add(bits, 0.8125, addend, out)
    expected = [a + c for a, c in zip(addend.tolist(), signs_times(0.8125, x))]
    assert out.tolist() == rounded_once(expected)
    kernels.decode_add(bits, 0.8125, addend, addend)  # in place: the addend is the output
    assert torch.equal(addend, out)


@pytest.mark.parametrize("numel", SIZES)
def test_the_kernel_splits_a_vector_into_its_compression_and_residual_in_one_pass(numel):
    kernels = built_kernels()
    x = awkward_vector(numel, numel + 4)
    addend = torch.randn(numel, generator=torch.Generator().manual_seed(numel)) * 1e-3
    bits = encoded_bits(kernels, x)
    signed = signs_times(0.8125, x)
    residual, decoded = torch.full((numel,), float("nan")), torch.full((numel,), float("nan"))
    kernels.residual(bits, 0.8125, x, residual, addend, decoded)
    assert residual.tolist() == rounded_once([v - c for v, c in zip(x.tolist(), signed)])
    assert decoded.tolist() == rounded_once([c + a for c, a in zip(signed, addend.tolist())])
    kernels.residual(bits, 0.8125, x, x, None, decoded)  # in place, and no addend
    assert torch.equal(x, residual) and decoded.tolist() == signed


@pytest.mark.parametrize("block_elements", [16, 1000])
@pytest.mark.parametrize("encoded", [True, False])
def test_residual_into_is_decode_subtract_add_on_either_path(block_elements, encoded, monkeypatch):
    built_kernels()
    compressor = ScaledSign(4 * block_elements / 2**20)
    x = awkward_vector(5 * block_elements + 3, block_elements + 9)
    payload = compressor.encode(x)
    addend = torch.randn(x.numel(), generator=torch.Generator().manual_seed(2))
    compressed = documented_decode(payload, x, block_elements)
    expected_residual, expected_decoded = x - compressed, torch.add(compressed, addend)
    for kernels_on in (True, False):
        if not kernels_on:
            monkeypatch.setattr(sign_format, "kernels", lambda: None)
        tensor, decoded = x.clone(), torch.empty_like(x)
        given = payload if encoded else None
        result = compressor.residual_into(tensor, tensor, decoded, addend=addend, payload=given)  # residual in place
        assert result is decoded and torch.equal(decoded, expected_decoded) and torch.equal(tensor, expected_residual)


@pytest.mark.parametrize("block_elements", [16, 1000])
def test_decode_add_into_is_decode_then_add_on_either_path(block_elements, monkeypatch):
    built_kernels()
    compressor = ScaledSign(4 * block_elements / 2**20)
    x = awkward_vector(5 * block_elements + 3, block_elements + 7)
    payload = compressor.encode(x)
    addend = torch.randn(x.numel(), generator=torch.Generator().manual_seed(1))
    expected = torch.add(addend, documented_decode(payload, x, block_elements))
    scratch = torch.empty_like(addend)
    assert torch.equal(compressor.decode_add_into(payload, addend, torch.empty_like(addend), scratch), expected)
    monkeypatch.setattr(sign_format, "kernels", lambda: None)
    assert torch.equal(compressor.decode_add_into(payload, addend.clone(), torch.empty_like(addend), scratch), expected)
    assert torch.equal(compressor.decode_add_into(payload, addend, addend, scratch), expected)  # out is the addend


@pytest.mark.parametrize("block_elements", [16, 1024, 1000, 100])  # blocks on a byte boundary, and not
def test_kernel_and_torch_paths_give_the_same_payloads_and_decodes(block_elements, monkeypatch):
    built_kernels()
    compressor = ScaledSign(4 * block_elements / 2**20)
    x = awkward_vector(7 * block_elements + 5, block_elements)
    payload = compressor.encode(x)
    decoded = compressor.decode(payload, x.numel())
    monkeypatch.setattr(sign_format, "kernels", lambda: None)
    assert torch.equal(compressor.encode(x), payload)
    assert torch.equal(compressor.decode(payload, x.numel()), decoded)
    # And both are the format: scale = float32(documented sum / length) per block, -scale where x < 0.
    values = x.tolist()
    for index, start in enumerate(range(0, len(values), block_elements)):
        block = values[start : start + block_elements]
        scale = torch.tensor(documented_sum(block) / len(block), dtype=torch.float64).float().item()
        assert payload[4 * index : 4 * index + 4].view(torch.float32).item() == scale
        assert decoded[start : start + len(block)].tolist() == [-scale if v < 0 else scale for v in block]


def test_the_plain_c_loop_gives_the_same_bits_as_the_avx2_version(tmp_path):
    # Machines without AVX2 (and other architectures) run the plain loop: built here on its own and held to the
    # documented sums, bits and decodes, like the version this machine picks.
    built_kernels()
    library = tmp_path / "plain.so"
    subprocess.run(
        [*build.compiler(), *native.FLAGS, "-DLLSGD_PLAIN_ONLY", str(native.SOURCE), "-o", str(library)], check=True
    )
    plain = native.SignKernels(ctypes.CDLL(str(library)))
    assert plain.version == "plain C"
    assert sign_format._matches_reference(plain)
    for numel in SIZES:
        x = awkward_vector(numel, numel + 5)
        bits = torch.zeros(math.ceil(numel / 8), dtype=torch.uint8)
        assert plain.abs_sum_signs(x, bits) == documented_sum(x.tolist())
        assert bits.tolist() == documented_bits(x.tolist())
        out = torch.empty(numel)
        plain.decode_add(bits, 0.25, x, out)
        assert torch.equal(out, torch.add(x, torch.where(x < 0, -0.25, 0.25)))
        residual = torch.empty(numel)
        plain.residual(bits, 0.25, x, residual, None, out)
        assert torch.equal(residual, x - torch.where(x < 0, -0.25, 0.25))


def test_a_missing_compiler_leaves_the_torch_path(fresh_native, monkeypatch, caplog):
    monkeypatch.setenv("CC", str(fresh_native / "no-such-compiler"))
    with caplog.at_level(logging.INFO, logger=native.__name__):
        assert sign_format.kernels() is None
    assert "not available" in caplog.text
    x = awkward_vector(3000, 3)
    payload = ScaledSign(4 * 1024 / 2**20).encode(x)
    assert payload[:4].view(torch.float32).item() == pytest.approx(x[:1024].abs().double().mean().item(), rel=1e-6)


def test_the_environment_turns_the_kernels_off(fresh_native, monkeypatch):
    monkeypatch.setenv(native.DISABLE_VARIABLE, "0")
    assert sign_format.kernels() is None
    assert not fresh_native.exists() or not any(fresh_native.iterdir())  # nothing was built


def test_a_build_that_gives_other_bits_is_refused(fresh_native, monkeypatch, tmp_path, caplog):
    # A kernel that folds its lanes in another order (neighbours, not halves): the self-check must catch it.
    built_kernels()
    source = native.SOURCE.read_text()
    wrong = source.replace("lane[k] = lane[k] + lane[k + half];", "lane[k] = lane[2 * k] + lane[2 * k + 1];")
    assert wrong != source
    assert_refused(monkeypatch, tmp_path, caplog, native, wrong, sign_format.kernels)


def test_the_library_is_built_once_and_then_loaded_from_the_cache(fresh_native):
    assert sign_format.kernels() is not None or pytest.skip("no C compiler")
    built = list(Path(fresh_native).glob("sign_kernels-*"))
    assert len(built) == 1 and not list(Path(fresh_native).glob(".*partial"))
    stamp = built[0].stat().st_mtime_ns
    native.reset()
    assert sign_format.kernels() is not None
    assert built[0].stat().st_mtime_ns == stamp


def test_checkpoints_say_which_format_their_payloads_had():
    compressor = ScaledSign()
    assert compressor.state_dict() == {"format": sign_format.FORMAT_VERSION}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        compressor.load_state_dict(compressor.state_dict())  # the same format: nothing to say
    with pytest.warns(UserWarning, match="payload format 1"):
        compressor.load_state_dict({})  # a checkpoint of the version before: it saved no state
