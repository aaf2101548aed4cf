"""LIEC-SGD's server result is computed by every rank itself, so it must be bit-identical on every rank: random
compressors are refused, the scaled sign's scale does not depend on the thread count, and a full round compares a
checksum of the server error across ranks."""

from __future__ import annotations

import math

import pytest
import torch
from sim_utils import SMALL_BUCKET_MB, local_step, make_layered_model

from lightning_localsgd import LIECSGD, LIECSGDStrategy
from lightning_localsgd.algorithms.liec_sgd import bits_checksum
from lightning_localsgd.comm import run_simulated
from lightning_localsgd.compression import QSGD, NoCompression, ScaledSign, TopK
from lightning_localsgd.errors import RanksDisagreeError
from lightning_localsgd.strategies.base import LocalUpdateStrategy

BLOCK_MB = 64 / 2**20  # 16-element blocks


# ---------------------------------------------------------------------------------------------- random compressors
def test_liec_refuses_a_random_compressor_and_names_the_deterministic_ones():
    with pytest.raises(ValueError, match=r"`compressor` must be deterministic, got QSGD\(levels=127") as info:
        LIECSGD(compressor=QSGD())
    assert "ScaledSign, TopK, NoCompression" in str(info.value)
    # Built for a strategy, it is refused before any process starts.
    with pytest.raises(ValueError, match="must be deterministic"):
        LocalUpdateStrategy(LIECSGD(compressor=QSGD(levels=3)))


@pytest.mark.parametrize("compressor", [None, ScaledSign(BLOCK_MB), TopK(0.1), NoCompression()])
def test_liec_takes_the_deterministic_compressors(compressor):
    algorithm = LIECSGD(compressor=compressor)
    assert isinstance(algorithm.compressor, type(compressor) if compressor is not None else ScaledSign)
    assert LIECSGDStrategy(full_sync_period=4).algorithm.compressor.deterministic


def test_a_sharded_server_refuses_top_k_and_auto_keeps_it_replicated():
    with pytest.raises(ValueError, match=r"server='sharded' splits the server step at the compressor's blocks"):
        LIECSGD(compressor=TopK(0.1), server="sharded")

    def choices(rank, comm):
        auto_sign, auto_topk = LIECSGD(), LIECSGD(compressor=TopK(0.1))
        for algorithm in (auto_sign, auto_topk):
            algorithm.setup(make_layered_model(), comm)
        return auto_sign.shards_server, auto_topk.shards_server

    assert run_simulated(2, choices) == [(False, False)] * 2  # two ranks: the same bytes either way
    assert run_simulated(3, choices) == [(True, False)] * 3


# ---------------------------------------------------------------------------------------- the scaled sign's scale
def _wide_block(numel: int) -> torch.Tensor:
    """Magnitudes over 6 decades: a float32 sum of it depends on the summation order."""
    g = torch.Generator().manual_seed(0)
    return torch.randn(numel, generator=g) * torch.logspace(-3, 3, numel)


def _scale(payload: torch.Tensor) -> torch.Tensor:
    return payload[:4].clone()  # the first block's float32 scale, as bytes


def test_the_scaled_sign_scale_is_bit_identical_whatever_the_thread_count_and_accurate():
    numel = 3_000_001  # one block (16 MiB holds 4M floats), an odd length
    block = _wide_block(numel)
    compressor = ScaledSign(16.0)
    threads = torch.get_num_threads()
    try:
        scales = []
        for count in (1, 2, 4):
            torch.set_num_threads(count)
            scales.append(_scale(compressor.encode(block)))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(s, scales[0]) for s in scales)
    got = scales[0].view(torch.float32).item()
    exact = math.fsum(abs(x) for x in block.tolist()) / numel
    # Within float32 rounding of the exact mean magnitude (a float32 sum is off by about 2e-5 here).
    assert abs(got - exact) <= 2**-24 * exact


# ---------------------------------------------------------------------------------------------- the checksum
def test_bits_checksum_sees_one_bit_and_a_swap_and_is_thread_independent():
    v = _wide_block(1_000_003)
    base = bits_checksum([v])
    assert base == bits_checksum([v.clone()]) and base == int(base) and 0 <= base < 2**52
    flipped = v.clone()
    flipped[500_000] = torch.nextafter(flipped[500_000], torch.tensor(math.inf))  # one ulp
    assert bits_checksum([flipped]) != base
    swapped = v.clone()
    swapped[[10, 11]] = v[[11, 10]]
    assert bits_checksum([swapped]) != base
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = bits_checksum([v])
        torch.set_num_threads(4)
        four = bits_checksum([v])
    finally:
        torch.set_num_threads(threads)
    assert one == four == base
    assert bits_checksum([v.double()]) != bits_checksum([v])  # float64 state: read as 8 bytes per element


def _train(world: int, steps: int, period: int, desync_at: int | None = None) -> list[list[float]]:
    """Simulated LIEC-SGD workers with a replicated server (every rank computes the whole server step: the case the
    checksum guards; a sharded server has nothing duplicated to compare); with ``desync_at``, rank 1's server error
    is nudged by one ulp before that step. Returns each rank's server-error sums after every step."""

    def worker(rank: int, comm) -> list[float]:
        model = make_layered_model()
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        algorithm = LIECSGD(period, bucket_cap_mb=SMALL_BUCKET_MB, compressor=ScaledSign(BLOCK_MB), server="replicated")
        algorithm.setup(model, comm, [opt])
        sums = []
        for step in range(steps):
            if step == desync_at and rank == 1:
                error = algorithm.server_error[0].view(-1)
                error[0] = torch.nextafter(error[0], torch.tensor(math.inf))
            local_step(algorithm, model, opt, rank, step)
            sums.append(float(sum(e.double().sum() for e in algorithm.server_error)))
        return sums

    return run_simulated(world, worker)


def test_ranks_whose_server_errors_agree_train_through_full_rounds():
    runs = _train(3, 9, period=4)
    assert runs[0] == runs[1] == runs[2]
    assert any(s != 0 for s in runs[0])


def test_a_full_round_names_the_rank_whose_server_error_parted_ways():
    # Desynchronised after step 1; the full-precision step is step 3 (period 4): caught there, before e is used.
    with pytest.raises(RanksDisagreeError, match=r"disagree on their server error at the gradient exchange of step 3"):
        _train(3, 5, period=4, desync_at=2)
    with pytest.raises(RanksDisagreeError, match=r"ranks \[1\] differ from rank 0 \(ranks with equal values: "):
        _train(3, 5, period=4, desync_at=2)
