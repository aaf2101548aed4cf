"""LIEC-SGD and EF-SGD against their update rules, with simulated workers (several buckets, two dtypes)."""

from __future__ import annotations

import math

import pytest
import torch
from sim_utils import DTYPES, SMALL_BUCKET_MB, flat_params, loss_of, make_layered_model, mean_gradient_step

from lightning_localsgd.algorithms import LIECSGD, ErrorFeedbackSGD
from lightning_localsgd.comm import run_simulated
from lightning_localsgd.compression import NoCompression, ScaledSign, TopK
from lightning_localsgd.errors import NonFiniteError

BLOCK_MB = 64 / 2**20  # 16-element blocks: the small model spans several
BLOCK = 16
LR = 0.05


def scaled_sign(v: torch.Tensor, block: int = BLOCK) -> torch.Tensor:
    """The spec's C(v) = (||v||_1 / numel) * sign(v) per block, in plain torch (a zero counts as +: one bit)."""
    out = torch.empty_like(v)
    for start in range(0, v.numel(), block):
        part = v[start : start + block]
        scale = (part.double().abs().sum() / part.numel()).float()
        out[start : start + block] = torch.where(part < 0, -scale, scale)
    return out


def flat_of(tensors) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1).to(torch.float32) for t in tensors])


def run_recorded(make_algorithm, world, steps, dtype=torch.float32, optimizer="sgd", poison=None):
    """Each worker's record per step: local gradient, direction stepped on, error before/after, parameters."""

    def worker(rank, comm):
        model = make_layered_model(dtype)
        algorithm = make_algorithm()
        opt = {
            "sgd": lambda: torch.optim.SGD(model.parameters(), lr=LR),
            "momentum": lambda: torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9, weight_decay=1e-3),
        }[optimizer]()
        algorithm.setup(model, comm, [opt])
        records = []
        for step in range(steps):
            opt.zero_grad()
            loss_of(model, rank, step).backward()
            if poison is not None and poison == (rank, step):
                next(model.parameters()).grad.view(-1)[0] = float("nan")
            error_name = "server_error" if isinstance(algorithm, LIECSGD) else "error"
            reduces = getattr(algorithm, "variance_reduction", False)
            record = {
                "grad": flat_of(p.grad for p in model.parameters()),
                "error_before": flat_of(algorithm.state_buckets(error_name)),
                "params_before": flat_params(model).float().clone(),
            }
            if reduces:
                record["delta_before"] = flat_of(algorithm.delta)
            algorithm.before_optimizer_step(opt)
            record["direction"] = flat_of(
                p.grad if p.grad is not None else torch.zeros_like(p) for p in model.parameters()
            )
            record["error_after"] = flat_of(algorithm.state_buckets(error_name))
            if reduces:
                record["delta_after"] = flat_of(algorithm.delta)
            opt.step()
            algorithm.after_optimizer_step(opt)
            algorithm.end_step()
            record["params"] = flat_params(model).float().clone()
            records.append(record)
        return records, algorithm.comm.stats

    return run_simulated(world, worker)


def liec(period=4, compressor=None, variance_reduction=False, server="auto"):
    return lambda: LIECSGD(
        period,
        bucket_cap_mb=SMALL_BUCKET_MB,
        compressor=compressor or ScaledSign(BLOCK_MB),
        variance_reduction=variance_reduction,
        server=server,
    )


def whole_server_error(records, key, sharded):
    """The server error ``e`` of the spec: every rank's copy (replicated), or the sum of every rank's part (sharded:
    each element on at most one rank, zero on the others)."""
    parts = [r[key] for r in records]
    if not sharded:
        assert all(torch.equal(p, parts[0]) for p in parts)  # one server error, the same everywhere
        return parts[0]
    assert int(torch.stack([p != 0 for p in parts]).sum(0).max()) <= 1  # disjoint parts
    return sum(parts)


def test_the_model_spans_several_buckets_and_blocks():
    algorithm = LIECSGD(4, bucket_cap_mb=SMALL_BUCKET_MB)
    run_simulated(1, lambda rank, comm: algorithm.setup(make_layered_model(), comm))
    assert len(algorithm.flat.buckets) >= 3
    assert algorithm.flat.numel > 3 * 16


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("world", [2, 3, 4])
@pytest.mark.parametrize("server", ["replicated", "sharded"])
def test_each_rank_steps_on_the_server_result_plus_its_own_immediate_error(world, dtype, server):
    """dir_i = C(mean_j C(g_j) + e) + (g_i - C(g_i)), e <- u - C(u) (ALGORITHMS.md, LIEC-SGD): recomputed here in
    plain torch from the recorded gradients, with the test's own scaled sign, not the package's. Sharded, every rank
    holds its part of ``e`` and the parts add up to the spec's ``e``."""
    period = 4
    sharded = server == "sharded"
    runs = run_recorded(liec(period, server=server), world, 7, dtype)
    errors_seen = 0
    for step in range(7):
        records = [r[step] for r, _ in runs]
        grads = [r["grad"] for r in records]
        error = whole_server_error(records, "error_before", sharded)
        if (step + 1) % period == 0:
            continue  # full-precision step: tested below
        compressed = [scaled_sign(g) for g in grads]
        u = sum(compressed) / world + error
        c_hat = scaled_sign(u)
        errors_seen += int(error.abs().max() > 0)
        for r, g, c in zip(records, grads, compressed):
            torch.testing.assert_close(r["direction"], c_hat + (g - c), rtol=0, atol=1e-6)
        torch.testing.assert_close(whole_server_error(records, "error_after", sharded), u - c_hat, rtol=0, atol=1e-6)
    assert errors_seen >= 3  # the server error took part (it is 0 only at the first step after a full round)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("server", ["replicated", "sharded"])
def test_the_mean_model_follows_error_feedback_sgd_with_the_server_error_only(dtype, server):
    """mean_i dir_i = mean_i g_i + e_old - e_new: the mean of the replicas moves as error-feedback SGD does."""
    world = 3
    sharded = server == "sharded"
    runs = run_recorded(liec(5, server=server), world, 9, dtype)
    for step in range(9):
        records = [r[step] for r, _ in runs]
        mean_direction = sum(r["direction"] for r in records) / world
        mean_grad = sum(r["grad"] for r in records) / world
        drift = whole_server_error(records, "error_before", sharded) - whole_server_error(
            records, "error_after", sharded
        )
        torch.testing.assert_close(mean_direction, mean_grad + drift, rtol=0, atol=2e-6)


def test_a_full_precision_round_averages_parameters_and_gradients_adds_the_error_and_resets_it():
    world, period = 2, 3
    runs = run_recorded(liec(period), world, 6, optimizer="momentum")
    for step in (2, 5):
        records = [r[step] for r, _ in runs]
        error = records[0]["error_before"]
        assert error.abs().sum() > 0  # the compressed steps before it left a server error
        mean_grad = sum(r["grad"] for r in records) / world
        for r in records:
            assert torch.count_nonzero(r["error_after"]) == 0
            torch.testing.assert_close(r["direction"], mean_grad + error, rtol=0, atol=1e-6)
        # The step started from the average of the replicas (which differed before it).
        assert not torch.equal(records[0]["params_before"], records[1]["params_before"])
    # Momentum differs by rank (it saw each rank's immediate errors), so replicas move apart again after the round;
    # with plain SGD they would agree right after it.
    plain = run_recorded(liec(period), world, 3)
    torch.testing.assert_close(plain[0][0][2]["params"], plain[1][0][2]["params"], rtol=0, atol=0)


@pytest.mark.parametrize("variance_reduction", [False, True])
@pytest.mark.parametrize("optimizer", ["sgd", "momentum"])
def test_without_compression_liec_sgd_is_synchronous_sgd(optimizer, variance_reduction):
    world, steps = 3, 8
    runs = run_recorded(liec(3, NoCompression(), variance_reduction), world, steps, optimizer=optimizer)
    reference = make_layered_model()
    opt = {
        "sgd": lambda: torch.optim.SGD(reference.parameters(), lr=LR),
        "momentum": lambda: torch.optim.SGD(reference.parameters(), lr=LR, momentum=0.9, weight_decay=1e-3),
    }[optimizer]()
    for step in range(steps):
        mean_gradient_step(reference, opt, world, step)
        for records, _ in runs:
            torch.testing.assert_close(records[step]["params"], flat_params(reference), rtol=0, atol=1e-6)
            assert torch.count_nonzero(records[step]["error_after"]) == 0


@pytest.mark.parametrize("dtype", DTYPES)
def test_variance_reduction_learns_each_ranks_drift_at_full_rounds_and_corrects_every_step(dtype):
    """VRL-SGD's control variate on LIEC-SGD (plain SGD, so the step is x - lr * direction):
    every step x_i <- x_i - lr * dir_i + lr * Delta_i; at a full round (before its step) x_i <- x_hat and
    Delta_i += (x_hat - x_i) / (lr * steps taken since the last average: p - 1 before the first round, whose own
    step comes after it, p after); sum_i Delta_i = 0 throughout."""
    world, period, steps = 3, 4, 10
    runs = run_recorded(liec(period, variance_reduction=True), world, steps, dtype)
    atol = 1e-6  # the records are float32 for either dtype
    for step in range(steps):
        records = [r[step] for r, _ in runs]
        full = (step + 1) % period == 0
        x_hat = sum(r["params_before"] for r in records) / world
        for r in records:
            if full:
                moved = period - 1 if step == period - 1 else period
                expected_delta = r["delta_before"] + (x_hat - r["params_before"]) / (LR * moved)
                torch.testing.assert_close(r["delta_after"], expected_delta, rtol=0, atol=atol * 1e2)
                start = x_hat
            else:
                torch.testing.assert_close(r["delta_after"], r["delta_before"], rtol=0, atol=0)
                start = r["params_before"]
            expected = start - LR * r["direction"] + LR * r["delta_after"]
            torch.testing.assert_close(r["params"], expected, rtol=0, atol=atol)
        total = sum(r["delta_after"] for r in records)
        torch.testing.assert_close(total, torch.zeros_like(total), rtol=0, atol=atol * 10)  # Delta ~ 1: rounding
    assert runs[0][0][-1]["delta_after"].abs().max() > 1e-3  # the ranks' data differ: Delta learnt something
    # The mean model does not feel the correction: it still follows error-feedback SGD.
    for step in range(steps):
        records = [r[step] for r, _ in runs]
        if (step + 1) % period:
            mean_before = sum(r["params_before"] for r in records) / world
            mean_after = sum(r["params"] for r in records) / world
            mean_direction = sum(r["direction"] for r in records) / world
            torch.testing.assert_close(mean_after, mean_before - LR * mean_direction, rtol=0, atol=atol)


def test_a_compressed_step_sends_about_one_thirty_second_of_an_all_reduce_and_counts_it_apart():
    world, period, steps = 2, 4, 8
    runs = run_recorded(lambda: LIECSGD(period, bucket_cap_mb=SMALL_BUCKET_MB), world, steps)
    stats = runs[0][1]
    numel = runs[0][0][0]["grad"].numel()
    payload = 4 + math.ceil(numel / 8)  # one float32 scale (one 5 MiB block), then 1 bit per element
    assert stats.exchanges == steps - steps // period
    assert stats.exchange_bytes_sent == stats.exchanges * (world - 1) * payload
    full_round_bytes = stats.bytes_sent - stats.exchange_bytes_sent
    ring = 2 * (world - 1) * 4 * numel // world  # a ring all-reduce of float32: reduce-scatter, then all-gather
    assert full_round_bytes >= (steps // period) * 2 * ring  # params + grads


def test_a_nan_gradient_on_one_rank_stops_every_rank_before_it_reaches_the_server_error():
    with pytest.raises(NonFiniteError, match="rank 1 held inf/NaN gradients at the gradient exchange of step 2"):
        run_recorded(liec(4), 2, 4, poison=(1, 2))


def test_skip_round_drops_a_poisoned_step_on_every_rank_and_keeps_the_error_finite(recwarn):
    def make():
        algorithm = LIECSGD(4, bucket_cap_mb=SMALL_BUCKET_MB, compressor=ScaledSign(BLOCK_MB))
        algorithm.set_nonfinite_policy("skip_round")
        return algorithm

    runs = run_recorded(make, 2, 5, poison=(1, 2))
    for records, _ in runs:
        assert torch.equal(records[2]["error_after"], records[2]["error_before"])
        assert torch.equal(records[2]["params"], records[2]["params_before"])  # no step anywhere
        assert all(torch.isfinite(r["error_after"]).all() and torch.isfinite(r["params"]).all() for r in records)
    assert any("dropped on every rank" in str(w.message) for w in recwarn)


@pytest.mark.parametrize("variance_reduction", [False, True])
def test_resuming_from_a_mid_period_state_matches_the_uninterrupted_run(variance_reduction):
    world, period, steps, cut = 2, 4, 9, 6

    def worker(rank, comm, resume_state=None, start=0, stop=steps):
        model = make_layered_model()
        algorithm = liec(period, variance_reduction=variance_reduction)()
        opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
        algorithm.setup(model, comm, [opt])
        if resume_state is not None:
            algorithm.load_state_dict(resume_state[rank][0])
            opt.load_state_dict(resume_state[rank][1])
        for step in range(start, stop):
            opt.zero_grad()
            loss_of(model, rank, step).backward()
            algorithm.before_optimizer_step(opt)
            opt.step()
            algorithm.after_optimizer_step(opt)
            algorithm.end_step()
        return (algorithm.state_dict(), opt.state_dict()), flat_params(model).clone()

    uninterrupted = run_simulated(world, worker)
    first = run_simulated(world, lambda rank, comm: worker(rank, comm, stop=cut))
    saved = [state for state, _ in first]
    assert torch.count_nonzero(saved[0][0]["server_error"][0]) > 0
    if variance_reduction:  # Delta and the learning rates summed since the round after step 4
        assert torch.count_nonzero(saved[0][0]["delta"][0]) > 0 and saved[0][0]["lr_sums"]
    resumed = run_simulated(world, lambda rank, comm: worker(rank, comm, saved, start=cut))
    for (_, expected), (_, got) in zip(uninterrupted, resumed):
        assert torch.equal(expected, got)


# ---------------------------------------------------------------------------------------------------- EF-SGD
def ef(compressor=None, period=100):
    return lambda: ErrorFeedbackSGD(compressor or ScaledSign(BLOCK_MB), period, bucket_cap_mb=SMALL_BUCKET_MB)


@pytest.mark.parametrize("dtype", DTYPES)
def test_ef_sgd_keeps_identical_replicas_and_delays_but_never_drops_gradient(dtype):
    world, steps = 3, 8
    runs = run_recorded(ef(TopK(0.1)), world, steps, dtype)
    for step in range(steps):
        params = [r[step]["params"] for r, _ in runs]
        assert all(torch.equal(p, params[0]) for p in params)
    # Sum over steps of the common direction = sum of mean gradients - mean of the final errors.
    directions = sum(runs[0][0][t]["direction"] for t in range(steps))
    grads = sum(sum(r[t]["grad"] for r, _ in runs) / world for t in range(steps))
    final_errors = sum(r[-1]["error_after"] for r, _ in runs) / world
    torch.testing.assert_close(directions, grads - final_errors, rtol=0, atol=1e-5)


def test_ef_sgd_without_compression_is_synchronous_sgd():
    world, steps = 2, 6
    runs = run_recorded(ef(NoCompression(), period=3), world, steps, optimizer="momentum")
    reference = make_layered_model()
    opt = torch.optim.SGD(reference.parameters(), lr=LR, momentum=0.9, weight_decay=1e-3)
    for step in range(steps):
        mean_gradient_step(reference, opt, world, step)
        torch.testing.assert_close(runs[0][0][step]["params"], flat_params(reference), rtol=0, atol=1e-6)
