"""DiLoCo against its update rule, with simulated workers (several buckets, two dtypes)."""

from __future__ import annotations

import pytest
import torch
from plain_references import local_sgd_trajectories
from sim_utils import DTYPES, SMALL_BUCKET_MB, flat_params, local_step, loss_of, make_layered_model, train_workers
from torch import nn

from lightning_localsgd.algorithms import DiLoCo
from lightning_localsgd.comm import run_simulated
from lightning_localsgd.strategies.checkpointing import without_replica_if_in_sync

LR = 0.05


def run(make_algorithm, world=3, steps=9, dtype=torch.float32, cut=None):
    """Every worker's parameters after each step, and its algorithm (see ``train_workers``)."""
    runs = train_workers(make_algorithm, world, steps, dtype=dtype, cut=cut)
    return [([entry["params"] for entry in history], algorithm) for history, algorithm in runs]


@pytest.mark.parametrize("dtype", DTYPES)
def test_with_outer_sgd_of_lr_1_and_no_momentum_diloco_is_local_sgd_step_for_step(dtype):
    period = 3
    diloco = run(
        lambda: DiLoCo(period, "SGD", {"lr": 1.0}, bucket_cap_mb=SMALL_BUCKET_MB),
        dtype=dtype,
    )
    local = local_sgd_trajectories(3, 9, period, dtype)  # plain torch: per-rank SGD, replicas averaged every H
    tolerance = 1e-6 if dtype == torch.float32 else 1e-12  # theta - (theta - mean) is the mean up to rounding
    for (ours, _), theirs in zip(diloco, local, strict=True):
        for a, b in zip(ours, theirs, strict=True):
            torch.testing.assert_close(a, b, atol=tolerance, rtol=0)
    assert (diloco[0][0][1] - diloco[1][0][1]).abs().max() > 1e-4  # mid-period the replicas differ


def test_a_round_is_an_outer_nesterov_step_on_the_pseudo_gradient():
    period, world = 3, 3
    runs = run(lambda: DiLoCo(period), world=world, steps=period * 2, dtype=torch.float64)
    # Replay the outer optimizer by hand from the replicas just before each round.
    before_round = {}

    def worker(rank, comm):  # the same run, stopped before each round's end_step to read the replicas
        model = make_layered_model(torch.float64)
        opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
        algorithm = DiLoCo(period)
        algorithm.setup(model, comm, [opt])
        for step in range(period * 2):
            opt.zero_grad()
            loss_of(model, rank, step).backward()
            algorithm.before_optimizer_step(opt)
            opt.step()
            algorithm.after_optimizer_step(opt)
            if algorithm.is_round_after(algorithm.step):
                before_round.setdefault(step, {})[rank] = flat_params(model).clone()
            algorithm.end_step()

    run_simulated(world, worker)
    theta = flat_params(make_layered_model(torch.float64)).clone()
    velocity = torch.zeros_like(theta)
    for step in sorted(before_round):
        mean = torch.stack([before_round[step][r] for r in range(world)]).mean(0)
        delta = theta - mean
        velocity = 0.9 * velocity + delta
        theta = theta - 0.7 * (delta + 0.9 * velocity)  # torch's Nesterov SGD
        for trajectory, _ in runs:
            torch.testing.assert_close(trajectory[step], theta, atol=1e-12, rtol=0)
    assert sorted(before_round) == [period - 1, 2 * period - 1]  # the rounds the spec asks for, every H steps


def test_global_parameters_live_on_the_cpu_and_every_rank_holds_the_same():
    runs = run(lambda: DiLoCo(3), steps=4)
    thetas = [torch.cat([t.reshape(-1) for t in algorithm.global_params]) for _, algorithm in runs]
    assert all(t.device.type == "cpu" and t.dtype == torch.float32 for t in thetas)
    for theta in thetas[1:]:
        assert torch.equal(theta, thetas[0])


def test_resuming_mid_period_with_the_outer_state_matches_the_uninterrupted_run():
    make = lambda: DiLoCo(3, bucket_cap_mb=SMALL_BUCKET_MB)  # noqa: E731
    straight = run(make, steps=10)
    resumed = run(make, steps=10, cut=5)  # after one outer step (momentum built), mid-period
    for (a, _), (b, _) in zip(straight, resumed):
        for x, y in zip(a, b):
            assert torch.equal(x, y)


def test_outer_optimizers_are_taken_by_name_and_bad_ones_refused():
    assert DiLoCo(outer_optimizer="AdamW", outer_optimizer_options={"lr": 0.1}).outer_optimizer_name == "AdamW"
    assert DiLoCo().outer_optimizer_options == {"lr": 0.7, "momentum": 0.9, "nesterov": True}
    with pytest.raises(ValueError, match=r"`outer_optimizer` must name a torch\.optim optimizer"):
        DiLoCo(outer_optimizer="Lion")
    with pytest.raises(ValueError, match="`outer_optimizer_options`"):
        DiLoCo(outer_optimizer_options={"betas": 3})
    with pytest.raises(ValueError, match="`global_device`"):
        DiLoCo(global_device="gpu")
    with pytest.raises(ValueError, match="`period`"):
        DiLoCo(period=0)


def test_a_layer_unfrozen_mid_fit_is_refused_with_a_message():
    def worker(rank, comm):
        model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 1))
        model[0].requires_grad_(False)
        opt = torch.optim.SGD(model.parameters(), lr=LR)
        algorithm = DiLoCo(2)
        algorithm.setup(model, comm, [opt])
        model[0].requires_grad_(True)
        for _ in range(2):
            opt.zero_grad()
            model(torch.ones(2, 3)).sum().backward()
            opt.step()
            algorithm.end_step()

    with pytest.raises(ValueError, match="trainable parameters changed during fit"):
        run_simulated(2, worker)


@pytest.mark.parametrize("dtype", DTYPES)
def test_the_overlapped_outer_step_with_outer_sgd_of_lr_1_is_cocod_sgd_step_for_step(dtype):
    period = 3
    make = lambda: DiLoCo(period, "SGD", {"lr": 1.0}, overlap=True, bucket_cap_mb=SMALL_BUCKET_MB)  # noqa: E731
    diloco = run(make, dtype=dtype)
    cocod = local_sgd_trajectories(3, 9, period, dtype, overlapped=True)  # plain torch, the spec's CoCoD-SGD
    tolerance = 1e-6 if dtype == torch.float32 else 1e-12
    for (ours, _), theirs in zip(diloco, cocod, strict=True):
        for a, b in zip(ours, theirs, strict=True):
            torch.testing.assert_close(a, b, atol=tolerance, rtol=0)
    assert (cocod[0][-1] - cocod[1][-1]).abs().max() > 1e-4  # replicas never coincide: not Local SGD's trajectory


def test_the_overlapped_outer_step_applies_the_previous_rounds_progress_one_round_late():
    period, world = 3, 3
    runs = run(lambda: DiLoCo(period, overlap=True), world=world, steps=3 * period, dtype=torch.float64)
    trajectories = [trajectory for trajectory, _ in runs]
    thetas = [torch.cat([t.reshape(-1) for t in algorithm.global_params]) for _, algorithm in runs]
    assert all(torch.equal(t, thetas[0]) for t in thetas)
    # Round r starts from the replicas left by round r - 1 (round 1 from the model itself); the outer step at
    # the end of round r uses the mean of round r's start: the progress of round r - 1, one round late.
    x0 = flat_params(make_layered_model(torch.float64))
    starts = [[x0] * world] + [[t[r * period - 1] for t in trajectories] for r in (1, 2)]
    theta, velocity = x0.clone(), torch.zeros_like(x0)
    for round_starts in starts:
        delta = theta - torch.stack(round_starts).mean(0)
        velocity = 0.9 * velocity + delta
        theta = theta - 0.7 * (delta + 0.9 * velocity)  # torch's Nesterov SGD
    torch.testing.assert_close(thetas[0], theta, atol=1e-12, rtol=0)
    assert not torch.equal(theta, x0)
    for trajectory in trajectories[1:]:  # replicas keep their own progress
        assert (trajectory[-1] - trajectories[0][-1]).abs().max() > 1e-6


def test_resuming_with_the_overlapped_transfer_in_flight_matches_the_uninterrupted_run():
    make = lambda: DiLoCo(3, overlap=True, bucket_cap_mb=SMALL_BUCKET_MB)  # noqa: E731
    straight = run(make, steps=10)
    resumed = run(make, steps=10, cut=5)  # mid-period: a transfer is in flight and the outer momentum is built
    for (a, _), (b, _) in zip(straight, resumed):
        for x, y in zip(a, b):
            assert torch.equal(x, y)


@pytest.mark.parametrize("overlap", [False, True])
def test_a_nan_replica_stops_every_rank_before_theta_or_the_outer_state_see_it(overlap):
    from lightning_localsgd.errors import NonFiniteError

    def worker(rank, comm):
        model = make_layered_model(torch.float64)
        opt = torch.optim.SGD(model.parameters(), lr=LR)
        algorithm = DiLoCo(3, overlap=overlap)
        algorithm.setup(model, comm, [opt])
        try:
            for step in range(9):
                opt.zero_grad()
                loss_of(model, rank, step).backward()
                opt.step()
                if (rank, step) == (1, 4):
                    with torch.no_grad():
                        next(model.parameters()).view(-1)[0] = float("nan")
                algorithm.end_step()
        except NonFiniteError as error:
            theta = torch.cat([t.reshape(-1) for t in algorithm.global_params])
            momenta = [s["momentum_buffer"] for s in algorithm.outer.state_dict()["state"].values()]
            return str(error), bool(torch.isfinite(theta).all()), all(torch.isfinite(m).all() for m in momenta)
        return "finished", False, False

    for message, theta_finite, momenta_finite in run_simulated(2, worker):
        assert "rank 1 held inf/NaN parameters" in message and "(step 5)" in message
        assert theta_finite and momenta_finite


def test_right_after_a_round_theta_is_stored_once_and_a_resume_matches_the_uninterrupted_run():
    make = lambda: DiLoCo(3, bucket_cap_mb=SMALL_BUCKET_MB)  # noqa: E731
    straight = run(make, steps=10)
    resumed = run(make, steps=10, cut=6)  # rounds after steps 3 and 6: saved in sync, outer momentum built
    for (a, _), (b, _) in zip(straight, resumed):
        for x, y in zip(a, b):
            assert torch.equal(x, y)

    def states(rank, comm):
        model = make_layered_model()
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        algorithm = make()
        algorithm.setup(model, comm, [opt])
        saved = []
        for step in range(6):
            local_step(algorithm, model, opt, rank, step)
            saved.append(algorithm.state_dict(copy=False))
        # A checkpoint in sync keeps no replica: a fresh run gets the weights from the main file, then the state.
        weights = {k: v.clone() for k, v in model.state_dict().items()}
        fresh = make_layered_model(seed=9)
        fresh.load_state_dict(weights)
        fresh_opt = torch.optim.SGD(fresh.parameters(), lr=0.05, momentum=0.9)
        again = make()
        again.setup(fresh, comm, [fresh_opt])
        again.load_state_dict(without_replica_if_in_sync(saved[-1]))
        thetas = [[t.clone() for t in a.global_params] for a in (algorithm, again)]
        return ["global_params" in s for s in saved], thetas

    for stored, (theta, restored) in run_simulated(3, states):
        assert stored == [True, True, False, True, True, False]  # mid-period: theta differs from the replica
        assert all(torch.equal(a, b) for a, b in zip(theta, restored))
