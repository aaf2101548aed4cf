"""Every algorithm's key invariants with several buckets (some holding one parameter, some several) in two dtypes.

One bucket hides bugs that pair the wrong slices or let transfers of different buckets race; these runs use
:data:`SMALL_BUCKET_MB`, so the model spans 4 (float32) or 5 (float64) buckets, and 3 simulated workers.
"""

from __future__ import annotations

import copy
from typing import Any, Callable

import pytest
import torch
from sim_utils import DTYPES, SMALL_BUCKET_MB, flat_params, local_step, loss_of, make_layered_model, mean_gradient_step
from torch import nn

from lightning_localsgd.algorithms import VRLSGD, CoCoDSGD, LocalSGD, OverlapLocalSGD
from lightning_localsgd.comm import run_simulated

WORLD, LR = 3, 0.05
TOL = {torch.float32: {"atol": 1e-6, "rtol": 1e-5}, torch.float64: {"atol": 1e-12, "rtol": 1e-10}}


def sgd(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=LR)


def adam(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.Adam(model.parameters(), lr=0.01)


def grad_of(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()])


def run(
    make_algo: Callable[[], Any],
    steps: int,
    dtype: torch.dtype,
    observe: Callable[..., Any],
    make_opt: Callable[[nn.Module], torch.optim.Optimizer] = sgd,
) -> list[list[Any]]:
    """Train WORLD workers; ``observe(algo, model, before, after_step, grad, rounded)`` after each ``end_step``."""

    def worker(rank, comm):
        model = make_layered_model(dtype)
        opt = make_opt(model)
        algo = make_algo()
        algo.setup(model, comm, [opt])
        assert len(algo.flat.buckets) >= 3
        records = []
        for step in range(steps):
            before = flat_params(model).clone()
            opt.zero_grad()
            loss_of(model, rank, step).backward()
            grad = grad_of(model)
            algo.before_optimizer_step(opt)
            opt.step()
            algo.after_optimizer_step(opt)
            after_step = flat_params(model).clone()
            rounded = algo.end_step()
            records.append(observe(algo, model, before, after_step, grad, rounded))
        return records

    return run_simulated(WORLD, worker, timeout=30)


def mean(tensors: list[torch.Tensor]) -> torch.Tensor:
    return sum(tensors) / len(tensors)


def cat(buckets: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([b.detach().clone().reshape(-1) for b in buckets])


@pytest.mark.parametrize("dtype", DTYPES)
def test_local_sgd_replicas_equal_each_other_and_the_mean_after_each_round(dtype):
    def observe(algo, model, before, after_step, grad, rounded):
        return after_step, flat_params(model).clone(), rounded

    records = run(lambda: LocalSGD(period=3, bucket_cap_mb=SMALL_BUCKET_MB), 8, dtype, observe)
    rounds = [s for s in range(8) if records[0][s][2]]
    assert rounds == [0, 3, 6]
    for step in range(8):
        after = [r[step][1] for r in records]
        if step in rounds:
            assert all(torch.equal(x, after[0]) for x in after)
            torch.testing.assert_close(after[0], mean([r[step][0] for r in records]), **TOL[dtype])
        else:
            assert (after[0] - after[1]).abs().max() > 1e-4  # the replicas drift between rounds


@pytest.mark.parametrize("dtype", DTYPES)
def test_vrl_sum_of_deltas_over_ranks_is_zero_after_every_round(dtype):
    def observe(algo, model, before, after_step, grad, rounded):
        return rounded, cat(algo.delta)

    records = run(lambda: VRLSGD(period=3, bucket_cap_mb=SMALL_BUCKET_MB), 9, dtype, observe)
    rounds = [s for s in range(9) if records[0][s][0]]
    assert rounds == [2, 5, 8]
    for step in rounds:
        total = sum(r[step][1] for r in records)
        assert total.abs().max() < (1e-5 if dtype == torch.float32 else 1e-12)
        assert records[0][step][1].abs().max() > 1e-3  # Delta is not trivially zero


@pytest.mark.parametrize("dtype", DTYPES)
def test_vrl_with_period_one_is_synchronous_sgd(dtype):
    def momentum_sgd(model):
        return torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)

    def observe(algo, model, before, after_step, grad, rounded):
        return flat_params(model).clone()

    records = run(lambda: VRLSGD(period=1, bucket_cap_mb=SMALL_BUCKET_MB), 6, dtype, observe, momentum_sgd)
    model = make_layered_model(dtype)  # one model, stepped on the mean of the workers' gradients
    opt = momentum_sgd(model)
    for step in range(6):
        mean_gradient_step(model, opt, WORLD, step)
        for r in records:
            torch.testing.assert_close(r[step], flat_params(model), **TOL[dtype])


@pytest.mark.parametrize("make_opt", [sgd, adam], ids=["sgd", "adam"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_cocod_round_keeps_the_mean_and_adds_each_displacement_to_the_mean_round_start(dtype, make_opt):
    period = 3

    def observe(algo, model, before, after_step, grad, rounded):
        return before, after_step, flat_params(model).clone(), rounded

    records = run(lambda: CoCoDSGD(period=period, bucket_cap_mb=SMALL_BUCKET_MB), 6, dtype, observe, make_opt)
    for start, end in [(0, 2), (3, 5)]:
        assert all(r[end][3] for r in records)
        torch.testing.assert_close(mean([r[end][2] for r in records]), mean([r[end][1] for r in records]), **TOL[dtype])
        starts = mean([r[start][0] for r in records])
        for r in records:  # x_i <- mean_j x_j^s + (x_i^e - x_i^s)
            torch.testing.assert_close(r[end][2], starts + (r[end][1] - r[start][0]), **TOL[dtype])
        assert (records[0][end][2] - records[1][end][2]).abs().max() > 1e-4  # the replicas never coincide


@pytest.mark.parametrize("dtype", DTYPES)
def test_overlap_with_beta_zero_anchor_is_the_mean_of_the_pulled_back_models(dtype):
    alpha = 0.6

    def observe(algo, model, before, after_step, grad, rounded):
        if not rounded:
            return None
        algo._settle_in_flight()
        return after_step, flat_params(model).clone(), cat(algo.anchor)

    make = lambda: OverlapLocalSGD(period=2, pullback=alpha, anchor_momentum=0.0, bucket_cap_mb=SMALL_BUCKET_MB)  # noqa: E731
    records = run(make, 6, dtype, observe)
    anchor = flat_params(make_layered_model(dtype))  # z = x0
    for step in (1, 3, 5):
        for r in records:
            torch.testing.assert_close(r[step][1], (1 - alpha) * r[step][0] + alpha * anchor, **TOL[dtype])
        anchor = mean([r[step][1] for r in records])
        for r in records:
            torch.testing.assert_close(r[step][2], anchor, **TOL[dtype])
        assert all(torch.equal(r[step][2], records[0][step][2]) for r in records)


@pytest.mark.parametrize("dtype", DTYPES)
def test_overlap_with_adam_follows_the_spec(dtype):
    alpha, beta, lr = 0.6, 0.7, 0.01

    def observe(algo, model, before, after_step, grad, rounded):
        if not rounded:
            return None
        velocity = cat(algo._velocity)
        algo._settle_in_flight()
        return after_step, flat_params(model).clone(), velocity, cat(algo.anchor)

    make = lambda: OverlapLocalSGD(period=2, pullback=alpha, anchor_momentum=beta, bucket_cap_mb=SMALL_BUCKET_MB)  # noqa: E731
    records = run(make, 6, dtype, observe, adam)
    z = flat_params(make_layered_model(dtype))
    velocities = [torch.zeros_like(z) for _ in range(WORLD)]
    tol = {"atol": 1e-4, "rtol": 1e-4} if dtype == torch.float32 else {"atol": 1e-9, "rtol": 1e-9}
    for step in (1, 3, 5):
        payloads = []
        for rank, r in enumerate(records):
            x = (1 - alpha) * r[step][0] + alpha * z
            velocities[rank] = beta * velocities[rank] + (z - x) / lr
            torch.testing.assert_close(r[step][1], x, **TOL[dtype])
            torch.testing.assert_close(r[step][2], velocities[rank], **tol)
            payloads.append(z - lr * velocities[rank])
        z = mean(payloads)
        for r in records:
            torch.testing.assert_close(r[step][3], z, **TOL[dtype])
    assert velocities[0].abs().max() > 1e-2  # the momentum is really exercised


@pytest.mark.parametrize("dtype", DTYPES)
def test_vrl_with_parameter_groups_of_different_learning_rates(dtype):
    """Per group g: x <- x - lr_g (grad - Delta) each step; Delta += (x_hat - x) / (period lr_g) at a round."""
    period, lrs = 3, (0.05, 0.02)

    def two_groups(model):
        params = list(model.parameters())
        return torch.optim.SGD([{"params": params[:2], "lr": lrs[0]}, {"params": params[2:], "lr": lrs[1]}], lr=1.0)

    def observe(algo, model, before, after_step, grad, rounded):
        return before, after_step, flat_params(model).clone(), grad, rounded, cat(algo.delta)

    records = run(lambda: VRLSGD(period=period, bucket_cap_mb=SMALL_BUCKET_MB), 9, dtype, observe, two_groups)
    params = list(make_layered_model(dtype).parameters())
    first = params[0].numel() + params[1].numel()
    total = sum(p.numel() for p in params)
    lr = torch.cat([torch.full((first,), lrs[0], dtype=dtype), torch.full((total - first,), lrs[1], dtype=dtype)])
    deltas = [torch.zeros_like(lr) for _ in range(WORLD)]
    for step in range(9):
        for rank, r in enumerate(records):
            before, after_step, _, grad, _, _ = r[step]
            torch.testing.assert_close(after_step, before - lr * (grad - deltas[rank]), **TOL[dtype])
        if not records[0][step][4]:
            continue
        x_hat = records[0][step][2]
        for rank, r in enumerate(records):
            deltas[rank] = deltas[rank] + (x_hat - r[step][1]) / (period * lr)
            torch.testing.assert_close(r[step][5], deltas[rank], **TOL[dtype])
        assert sum(r[step][5] for r in records).abs().max() < (1e-5 if dtype == torch.float32 else 1e-12)
    assert deltas[0][:first].abs().max() > 1e-3 and deltas[0][first:].abs().max() > 1e-3


ALGORITHMS = {
    "local_sgd": lambda: LocalSGD(period=3, bucket_cap_mb=SMALL_BUCKET_MB),
    "vrl_sgd": lambda: VRLSGD(period=3, bucket_cap_mb=SMALL_BUCKET_MB),
    "overlap": lambda: OverlapLocalSGD(period=3, bucket_cap_mb=SMALL_BUCKET_MB),
    "cocod": lambda: CoCoDSGD(period=3, bucket_cap_mb=SMALL_BUCKET_MB),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", list(ALGORITHMS))
def test_resume_mid_period_with_several_buckets_is_exact(name, dtype):
    make = ALGORITHMS[name]

    def worker(rank, comm):
        def fresh():
            model = make_layered_model(dtype)
            opt = adam(model)
            algo = make()
            algo.setup(model, comm, [opt])
            return model, opt, algo

        def train(model, opt, algo, steps):
            for step in steps:
                local_step(algo, model, opt, rank, step)

        model, opt, algo = fresh()
        train(model, opt, algo, range(4))  # step 4 is mid-period for every schedule here
        saved = copy.deepcopy((algo.state_dict(), opt.state_dict()))
        train(model, opt, algo, range(4, 11))
        model2, opt2, algo2 = fresh()
        algo2.load_state_dict(saved[0])
        opt2.load_state_dict(saved[1])
        train(model2, opt2, algo2, range(4, 11))
        return flat_params(model), flat_params(model2), len(algo.flat.buckets)

    results = run_simulated(WORLD, worker, timeout=30)
    for full, resumed, buckets in results:
        assert buckets >= 3
        assert torch.equal(resumed, full)
    assert (results[0][0] - results[1][0]).abs().max() > 1e-4  # not trivially one shared model
