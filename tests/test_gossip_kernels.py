"""Gossip's C kernels (``algorithms/gossip_kernels.c``) against torch's elementwise operations written out here.

The gossip's torch path rounds after every operation, and torch's ``add(a, b, alpha=w)`` on float32 CPU tensors is
one fused multiply-add (checked below against float64 arithmetic, which holds a product of two float32 exactly). The
kernels must give those bits: a round's mix ``x_i + sum_j w_j (x_j - x_i)`` and DeTAG's extrapolation
``m + eta (m - z(r-1))``, the tracker's ``(y + g) - g_old``, and the finiteness checks. Where a C compiler is
installed the kernels must be built (these tests fail rather than skip); the streamed gossip with and without them
is held to the whole-vector reference in ``test_gossip_streaming.py``.
"""

from __future__ import annotations

import ctypes
import subprocess
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from native_utils import assert_refused, fresh_load, required

from lightning_localsgd.algorithms import gossip_native
from lightning_localsgd.native import build

SIZES = [1, 5, 8, 9, 16, 23, 64, 1001, 4099]


def built() -> gossip_native.GossipKernels:
    return required(gossip_native.gossip_kernels(), "the gossip's C kernels")


def floats(numel: int, seed: int) -> torch.Tensor:
    """Full mantissas over 30 binades, zeros and -0.0: every rounding shows in the bits."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(numel, generator=g) * torch.pow(2.0, torch.randint(-15, 15, (numel,), generator=g).float())
    x[::7] = 0.0
    x[3::11] = -0.0
    return x


def fused(a: torch.Tensor, w: float, b: torch.Tensor) -> torch.Tensor:
    """``a + w * b`` rounded once to float32, from float64 (exact for the product of two float32)."""
    return (a.double() + float(torch.tensor(w, dtype=torch.float32)) * b.double()).float()


def expected_mix(own, received, weights, previous, eta):
    mixed = own.clone()
    for theirs, w in zip(received, weights):
        mixed = torch.add(mixed, theirs - own, alpha=w)
    if previous is None:
        return mixed
    return torch.add(mixed, mixed - previous, alpha=eta)


@pytest.fixture
def fresh_gossip_native(monkeypatch, tmp_path):
    """A process that has not loaded the gossip kernels yet, building into an empty cache."""
    yield from fresh_load(monkeypatch, tmp_path, gossip_native.reset)


def test_torch_adds_with_alpha_in_one_rounding_as_the_kernels_assume():
    for numel in SIZES:
        a, b = floats(numel, 1), floats(numel, 2)
        assert torch.equal(torch.add(a, b, alpha=2 / 3), fused(a, 2 / 3, b)), numel


@pytest.mark.parametrize("numel", SIZES)
@pytest.mark.parametrize("neighbours", [1, 2, 3])
def test_a_round_mixes_and_extrapolates_with_torch_bits(numel, neighbours):
    kernels = built()
    own, previous = floats(numel, numel), floats(numel, numel + 1)
    received = [floats(numel, numel + 2 + j) for j in range(neighbours)]
    weights = [1 / 3, 0.25, 0.125][:neighbours] if neighbours > 1 else [2 / 3]
    for before, eta in ((None, 0.0), (previous, 0.0294), (own, 0.6)):
        out, copy = torch.empty(numel), torch.empty(numel)
        kernels.mix(own, received, weights, before, eta, out, copy)
        expected = expected_mix(own, received, weights, before, eta)
        assert torch.equal(out, expected) and torch.equal(copy, expected)
    # In place, over z(r-1) (a second round of DeTAG) and over the replica (plain gossip).
    into_previous = previous.clone()
    kernels.mix(own, received, weights, into_previous, 0.3, into_previous)
    assert torch.equal(into_previous, expected_mix(own, received, weights, previous, 0.3))
    into_own = own.clone()
    kernels.mix(into_own, received, weights, None, 0.0, into_own)
    assert torch.equal(into_own, expected_mix(own, received, weights, None, 0.0))


@pytest.mark.parametrize("numel", SIZES)
def test_the_tracker_update_and_the_last_gradient_in_one_pass(numel):
    kernels = built()
    y, g, old = floats(numel, 3), floats(numel, 4), floats(numel, 5)
    expected = (y + g) - old
    out, last = torch.empty(numel), old.clone()
    assert kernels.track(y, g, last, out, last)
    assert torch.equal(out, expected) and torch.equal(last, g)
    in_place = y.clone()
    assert kernels.track(in_place, g, old, in_place, None)
    assert torch.equal(in_place, expected)


@pytest.mark.parametrize("numel", SIZES)
def test_inf_and_nan_are_found_wherever_they_are(numel):
    kernels = built()
    x = floats(numel, 6)
    copied = torch.empty(numel)
    assert kernels.all_finite(x) and kernels.copy_finite(x, copied) and torch.equal(copied, x)
    largest = torch.full((numel,), torch.finfo(torch.float32).max)
    assert kernels.all_finite(largest)
    for at in sorted({0, numel // 2, numel - 1}):
        for bad in (float("inf"), float("-inf"), float("nan")):
            spoiled = x.clone()
            spoiled[at] = bad
            assert not kernels.all_finite(spoiled)
            assert not kernels.copy_finite(spoiled, copied)
            assert torch.equal(copied.nan_to_num(), spoiled.nan_to_num())  # copied all the same
    # Finite operands whose update overflows: the tracker says so.
    y, old = torch.full((numel,), 3e38), torch.full((numel,), -3e38)
    assert not kernels.track(y, torch.zeros(numel), old, torch.empty(numel), None)


def test_the_plain_c_loop_gives_the_same_bits(tmp_path):
    built()
    library = tmp_path / "plain.so"
    options = [flag for flag in gossip_native.FLAGS if not flag.startswith("-l")]
    command = [*build.compiler(), *options, "-DLLSGD_PLAIN_ONLY", str(gossip_native.SOURCE), "-lm", "-o", str(library)]
    subprocess.run(command, check=True)
    plain = gossip_native.GossipKernels(ctypes.CDLL(str(library)))
    assert plain.version == "plain C"
    assert gossip_native._matches_reference(plain)
    for numel in SIZES:
        own, previous, theirs = floats(numel, 7), floats(numel, 8), floats(numel, 9)
        out = torch.empty(numel)
        plain.mix(own, [theirs], [2 / 3], previous, 0.0294, out)
        assert torch.equal(out, expected_mix(own, [theirs], [2 / 3], previous, 0.0294))


def test_a_build_that_rounds_twice_is_refused(fresh_gossip_native, monkeypatch, tmp_path, caplog):
    # The weighted additions as a product and a sum (two roundings) instead of torch's fused multiply-add.
    built()
    source = gossip_native.SOURCE.read_text()
    wrong = source.replace("fmaf(weights[j], received[j][i] - o, mixed)", "mixed + weights[j] * (received[j][i] - o)")
    wrong = wrong.replace(
        "mixed = _mm256_fmadd_ps(_mm256_set1_ps(weights[j]), _mm256_sub_ps(_mm256_loadu_ps(received[j] + i), o),",
        "mixed = _mm256_add_ps(_mm256_mul_ps(_mm256_set1_ps(weights[j]), _mm256_sub_ps(_mm256_loadu_ps(received[j] "
        "+ i), o)),",
    )
    assert wrong.count("_mm256_add_ps(_mm256_mul_ps") == 1 and "mixed + weights[j]" in wrong
    assert_refused(monkeypatch, tmp_path, caplog, gossip_native, wrong, gossip_native.gossip_kernels)


def test_the_environment_turns_the_kernels_off(fresh_gossip_native, monkeypatch):
    monkeypatch.setenv(build.DISABLE_VARIABLE, "0")
    assert gossip_native.gossip_kernels() is None
    assert not fresh_gossip_native.exists() or not any(fresh_gossip_native.iterdir())


def test_only_contiguous_cpu_float32_goes_to_the_kernels():
    built()
    x = torch.zeros(4, 4)
    assert gossip_native.kernels_for(x, x[0]) is not None
    assert gossip_native.kernels_for(x, x.t()) is None
    assert gossip_native.kernels_for(x.double()) is None
    assert gossip_native.kernels_for(x.bfloat16()) is None


def test_threads_that_build_at_once_all_get_the_library(fresh_gossip_native):
    # Simulated ranks are threads of one process: they reach their first gossip together, into an empty cache.
    built()  # a compiler is here (else this skips)
    gossip_native.reset()
    start = threading.Barrier(6)

    def first_use(_: int) -> object:
        start.wait()
        return gossip_native.gossip_kernels()

    def raw_build(_: int) -> object:
        start.wait()
        return build.build(gossip_native.SOURCE, gossip_native.FLAGS)

    with ThreadPoolExecutor(6) as pool:
        loaded = list(pool.map(first_use, range(6)))
    assert loaded[0] is not None and all(kernels is loaded[0] for kernels in loaded)
    for path in fresh_gossip_native.glob("gossip_kernels-*"):
        path.unlink()
    with ThreadPoolExecutor(6) as pool:  # the builds themselves, side by side
        paths = list(pool.map(raw_build, range(6)))
    assert len(set(paths)) == 1 and paths[0].exists()
    assert not list(fresh_gossip_native.glob(".*partial"))
