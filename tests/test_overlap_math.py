"""Overlap Local-SGD and CoCoD-SGD update rules, exactly, with simulated workers.

The transfers really run in background threads here, so these tests also catch a round that reads a buffer
before its transfer landed.
"""

from __future__ import annotations

import copy

import pytest
import torch
from sim_utils import flat_params, loss_of, make_model

from lightning_localsgd.algorithms import CoCoDSGD, DiLoCo, OverlapLocalSGD
from lightning_localsgd.comm import run_simulated

WORLD, LR = 3, 0.05


def run(make_algo, steps: int, observe):
    """Train WORLD workers with plain SGD; ``observe(rank, step, algo, model, before, grad)`` after each step."""

    def worker(rank, comm):
        model = make_model()
        opt = torch.optim.SGD(model.parameters(), lr=LR)
        algo = make_algo()
        algo.setup(model, comm, [opt])
        records = []
        for step in range(steps):
            before = flat_params(model).clone()
            opt.zero_grad()
            loss_of(model, rank, step).backward()
            grad = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
            algo.before_optimizer_step(opt)
            opt.step()
            algo.after_optimizer_step(opt)
            after_step = flat_params(model).clone()
            rounded = algo.end_step()
            records.append(observe(rank, step, algo, model, before, after_step, grad, rounded))
        return records

    return run_simulated(WORLD, worker)


def mean(tensors):
    return sum(tensors) / len(tensors)


def test_cocod_rounds_keep_the_mean_and_the_mean_moves_by_minus_lr_times_the_mean_gradient():
    def observe(rank, step, algo, model, before, after_step, grad, rounded):
        return before, after_step, flat_params(model).clone(), grad, rounded

    records = run(lambda: CoCoDSGD(period=3), 9, observe)
    for step in range(9):
        before = mean([r[step][0] for r in records])
        after_step = mean([r[step][1] for r in records])
        after_round = mean([r[step][2] for r in records])
        grads = mean([r[step][3] for r in records])
        torch.testing.assert_close(after_round - before, -LR * grads, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(after_round, after_step, atol=1e-6, rtol=1e-5)
    assert [records[0][s][4] for s in range(9)] == [False, False, True] * 3


def test_cocod_replica_ends_a_round_at_the_mean_of_round_starts_plus_its_own_displacement():
    def observe(rank, step, algo, model, before, after_step, grad, rounded):
        return before, after_step, flat_params(model).clone()

    records = run(lambda: CoCoDSGD(period=3), 6, observe)
    for start, end in [(0, 2), (3, 5)]:
        starts = [r[start][0] for r in records]
        for r in records:
            displacement = r[end][1] - r[start][0]
            torch.testing.assert_close(r[end][2], mean(starts) + displacement, atol=1e-6, rtol=1e-5)
        assert (records[0][end][2] - records[1][end][2]).abs().max() > 1e-4  # replicas never coincide


def test_overlap_with_beta_zero_anchor_is_the_mean_of_the_pulled_back_models_one_round_late():
    alpha = 0.6

    def observe(rank, step, algo, model, before, after_step, grad, rounded):
        if rounded:
            payload = torch.cat([z.clone() for z in algo.anchor])  # in flight: written by the transfer
            algo._settle_in_flight()
            return after_step, flat_params(model).clone(), torch.cat([z.clone() for z in algo.anchor]), payload
        return None

    records = run(lambda: OverlapLocalSGD(period=2, pullback=alpha, anchor_momentum=0.0), 6, observe)
    round_steps = [s for s in range(6) if records[0][s] is not None]
    assert round_steps == [1, 3, 5]
    z0 = flat_params(make_model())
    previous_anchor = z0
    for step in round_steps:
        pulled = [r[step][1] for r in records]
        for r in records:  # x <- (1 - alpha) x + alpha z, z being the previous round's result
            torch.testing.assert_close(r[step][1], (1 - alpha) * r[step][0] + alpha * previous_anchor)
        anchor = records[0][step][2]
        torch.testing.assert_close(anchor, mean(pulled), atol=1e-6, rtol=1e-5)
        assert all(torch.equal(r[step][2], anchor) for r in records)
        previous_anchor = anchor


def test_overlap_anchor_momentum_follows_the_spec():
    alpha, beta = 0.6, 0.7

    def observe(rank, step, algo, model, before, after_step, grad, rounded):
        if not rounded:
            return None
        v = torch.cat([t.clone() for t in algo._velocity])
        algo._settle_in_flight()
        return after_step, flat_params(model).clone(), v, torch.cat([z.clone() for z in algo.anchor])

    records = run(lambda: OverlapLocalSGD(period=2, pullback=alpha, anchor_momentum=beta), 6, observe)
    z = flat_params(make_model())
    velocities = [torch.zeros_like(z) for _ in range(WORLD)]
    for step in (1, 3, 5):
        payloads = []
        for rank, r in enumerate(records):
            x = (1 - alpha) * r[step][0] + alpha * z
            velocities[rank] = beta * velocities[rank] + (z - x) / LR
            torch.testing.assert_close(r[step][1], x, atol=1e-6, rtol=1e-5)
            torch.testing.assert_close(r[step][2], velocities[rank], atol=1e-4, rtol=1e-4)
            payloads.append(z - LR * velocities[rank])
        z = mean(payloads)
        torch.testing.assert_close(records[0][step][3], z, atol=1e-6, rtol=1e-5)


def test_overlap_mean_follows_local_steps_then_the_pull_toward_the_anchor():
    """The mean of the replicas, step by step, from the spec alone: -lr * mean gradient on a local step; on a
    round the pull-back x <- (1 - alpha) x + alpha z, and the next anchor z <- mean_i(z - lr v_i)."""
    alpha, beta, period, steps = 0.6, 0.7, 3, 9

    def observe(rank, step, algo, model, before, after_step, grad, rounded):
        anchor = None
        if rounded:
            algo._settle_in_flight()
            anchor = torch.cat([z.clone() for z in algo.anchor])
        return before, after_step, flat_params(model).clone(), grad, rounded, anchor

    records = run(lambda: OverlapLocalSGD(period=period, pullback=alpha, anchor_momentum=beta), steps, observe)
    z = flat_params(make_model())  # z = x0
    mean_v = torch.zeros_like(z)  # mean_i v_i: v_i's update is linear, so its mean follows the same rule
    for step in range(steps):
        before, after_step, after = (mean([r[step][k] for r in records]) for k in range(3))
        after_local = before - LR * mean([r[step][3] for r in records])
        torch.testing.assert_close(after_step, after_local, atol=1e-6, rtol=1e-5)
        rounded = (step + 1) % period == 0
        assert all(r[step][4] == rounded for r in records)
        if not rounded:
            assert all(torch.equal(r[step][2], r[step][1]) for r in records)  # no round: the replicas are left alone
            continue
        pulled = (1 - alpha) * after_local + alpha * z
        torch.testing.assert_close(after, pulled, atol=1e-6, rtol=1e-5)
        mean_v = beta * mean_v + (z - pulled) / LR
        z = z - LR * mean_v  # the mean of the payloads z - lr v_i
        for r in records:
            torch.testing.assert_close(r[step][5], z, atol=1e-5, rtol=1e-5)
    assert (z - flat_params(make_model())).abs().max() > 1e-3  # the anchor really moved


@pytest.mark.parametrize("make", [lambda: OverlapLocalSGD(period=2), lambda: CoCoDSGD(period=3)])
def test_state_dict_mid_round_with_a_transfer_in_flight_resumes_exactly(make):
    def worker(rank, comm):
        def fresh():
            model = make_model()
            opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
            algo = make()
            algo.setup(model, comm, [opt])
            return model, opt, algo

        def train(model, opt, algo, steps):
            for step in steps:
                opt.zero_grad()
                loss_of(model, rank, step).backward()
                opt.step()
                algo.end_step()

        model, opt, algo = fresh()
        train(model, opt, algo, range(4))
        saved = copy.deepcopy((algo.state_dict(), opt.state_dict()))  # settles the transfer in flight
        train(model, opt, algo, range(4, 10))
        model2, opt2, algo2 = fresh()  # CoCoD starts a transfer at set-up: loading must settle it
        algo2.load_state_dict(saved[0])
        opt2.load_state_dict(saved[1])
        train(model2, opt2, algo2, range(4, 10))
        return flat_params(model), flat_params(model2), algo.comm.stats

    results = run_simulated(2, worker)
    for full, resumed, _ in results:
        torch.testing.assert_close(resumed, full, rtol=0, atol=0)
    assert (results[0][0] - results[1][0]).abs().max() > 1e-4


def test_background_time_and_wait_time_are_measured():
    def worker(rank, comm):
        model = make_model()
        opt = torch.optim.SGD(model.parameters(), lr=LR)
        algo = CoCoDSGD(period=2)
        algo.setup(model, comm, [opt])
        for step in range(6):
            opt.zero_grad()
            loss_of(model, rank, step).backward()
            opt.step()
            algo.end_step()
        algo.finalize()
        return comm.stats

    for stats in run_simulated(2, worker):
        assert stats.background_seconds > 0
        assert 0 <= stats.wait_seconds <= stats.seconds


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"pullback": 1.5}, "pullback"),
        ({"pullback": -0.1}, "pullback"),
        ({"anchor_momentum": 1.0}, "anchor_momentum"),
        ({"period": 0}, "period"),
    ],
)
def test_overlap_bad_arguments(kwargs, named):
    with pytest.raises(ValueError, match=f"`{named}`"):
        OverlapLocalSGD(**kwargs)


@pytest.mark.parametrize(
    "make", [lambda: CoCoDSGD(period=2), lambda: OverlapLocalSGD(period=2), lambda: DiLoCo(period=2, overlap=True)]
)
@pytest.mark.parametrize("policy", ["raise", "skip_round"])
def test_a_round_meets_no_rank_on_the_critical_path(make, policy):
    """With ``on_nonfinite="raise"`` a round's guard travels with its transfer: no blocking collective at all
    (BatchNorm statistics travel with the transfer too), one background flag sum per round. With ``"skip_round"``
    the round keeps its blocking flag collective, and it starts only after the previous round's transfer landed (on
    a real link it would otherwise queue behind it, waiting unaccounted)."""

    def worker(rank, comm):
        model = make_model(batchnorm=True)
        opt = torch.optim.SGD(model.parameters(), lr=LR)
        algo = make()
        algo.set_nonfinite_policy(policy)
        algo.setup(model, comm, [opt])
        blocking, in_order = comm._all_reduce_sum_, comm._start_all_reduce_sum_in_order_
        transfers_done_at_blocking_calls, background_flag_sums = [], []

        def spy(tensor):
            transfers_done_at_blocking_calls.append(all(p.done for p in algo._in_flight))
            blocking(tensor)

        def spy_in_order(tensor):
            background_flag_sums.append(len(algo._in_flight))  # the round's transfer is not started yet
            return in_order(tensor)

        comm._all_reduce_sum_, comm._start_all_reduce_sum_in_order_ = spy, spy_in_order
        for step in range(8):
            opt.zero_grad()
            loss_of(model, rank, step).backward()
            opt.step()
            algo.end_step()
        return transfers_done_at_blocking_calls, background_flag_sums, algo.comm.stats.rounds

    for calls, flag_sums, rounds in run_simulated(2, worker):
        assert rounds == 4
        if policy == "raise":
            assert calls == [] and flag_sums == [0] * rounds  # issued after the settle, before the transfer
        else:
            assert len(calls) >= rounds and all(calls) and flag_sums == []
