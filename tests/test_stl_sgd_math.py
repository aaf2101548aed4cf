"""STL-SGD's stages against the spec, with simulated workers."""

from __future__ import annotations

import math

import pytest
import torch
from plain_references import local_sgd_trajectories
from sim_utils import SMALL_BUCKET_MB, flat_params, local_step, loss_of, make_layered_model, train_workers

from lightning_localsgd.algorithms import STLSGD
from lightning_localsgd.algorithms.schedule import StagewiseSchedule
from lightning_localsgd.comm import run_simulated

LR = 0.05


def round_steps(schedule: StagewiseSchedule, steps: int) -> list[int]:
    """Steps (1-based counts) after which the schedule holds a round, driven as an algorithm drives it."""
    rounds = []
    for step in range(steps):
        schedule.step += 1
        if schedule.is_round_after(step):
            rounds.append(step + 1)
            schedule.round_held()
    return rounds


def test_non_integer_periods_round_to_nearest_from_the_first_period_with_ties_to_even():
    # k_s = round(k_1 * growth**s), from k_1 at every stage (never from the previous stage's rounded period):
    # k_1 = 3, x sqrt(2): 3, 4.24 -> 4, 6, 8.49 -> 8, 12, 16.97 -> 17, 24. Compounding the rounded periods would give
    # 3, 4, 6 (5.66), 8 (8.49), 11 (11.31) instead.
    assert [StagewiseSchedule(8, 3, math.sqrt(2)).period_of(s) for s in range(7)] == [3, 4, 6, 8, 12, 17, 24]
    # An exact half goes to the even neighbour (Python's round): 1 x 2.5 = 2.5 -> 2, 6.25 -> 6, 15.625 -> 16.
    assert [StagewiseSchedule(8, 1, 2.5).period_of(s) for s in range(4)] == [1, 2, 6, 16]
    # 2 x 1.25**s: 2, 2.5 -> 2, 3.125 -> 3, 3.906 -> 4
    assert [StagewiseSchedule(8, 2, 1.25).period_of(s) for s in range(4)] == [2, 2, 3, 4]


def test_stages_double_their_length_and_their_period_and_end_at_rounds():
    # T1 = 4, k1 = 2, x2: stage 1 rounds after 2, 4; stage 2 (8 steps, k 4) after 8, 12; stage 3 (16, k 8) 20, 28
    assert round_steps(StagewiseSchedule(4, 2, 2.0), 28) == [2, 4, 8, 12, 20, 28]
    # x sqrt(2): periods 2, 3 (2.83), 4, 6 (5.66); stage lengths 4, 8, 16, 32 rounded up to whole periods
    schedule = StagewiseSchedule(4, 2, math.sqrt(2))
    assert [schedule.period_of(s) for s in range(4)] == [2, 3, 4, 6]
    assert round_steps(schedule, 29) == [2, 4, 7, 10, 13, 17, 21, 25, 29]
    # after 3 warm-up steps, the same stages shifted
    assert round_steps(StagewiseSchedule(4, 2, 2.0, warmup_steps=3), 31) == [5, 7, 11, 15, 23, 31]


def run(make, world=2, steps=12, cut=None, two_groups=False):
    """Per rank, per step: parameters, whether a round ended it, and the optimizer's learning rates."""

    def optimizer_for(model):
        ps = list(model.parameters())
        groups = [{"params": ps[:2], "lr": LR}, {"params": ps[2:], "lr": 2 * LR}] if two_groups else ps
        return torch.optim.SGD(groups, lr=LR, momentum=0.9)

    record = lambda algorithm, opt: {"lrs": [g["lr"] for g in opt.param_groups]}  # noqa: E731
    runs = train_workers(make, world, steps, make_optimizer=optimizer_for, cut=cut, record=record)
    return [history for history, _ in runs]


def test_with_one_endless_stage_stl_sgd_is_local_sgd_step_for_step():
    stl = run(lambda: STLSGD(10**6, 3, 1.0, lr_decay=1.0, bucket_cap_mb=SMALL_BUCKET_MB))
    local = local_sgd_trajectories(2, 12, 3)  # plain torch: per-rank SGD, replicas averaged after steps 3, 6, ...
    for a, b in zip(stl, local, strict=True):
        for step, (x, y) in enumerate(zip(a, b, strict=True)):
            torch.testing.assert_close(x["params"], y, atol=1e-12, rtol=0)
            assert x["round"] == ((step + 1) % 3 == 0)
            assert x["lrs"] == [LR]


def test_each_stage_boundary_halves_every_learning_rate_of_the_users_optimizer_on_every_rank():
    ranks = run(lambda: STLSGD(4, 2, 2.0), steps=13, two_groups=True)
    for history in ranks:
        assert [h["round"] for h in history].count(True) == 4  # after steps 2, 4, 8, 12
        assert history[2]["lrs"] == [LR, 2 * LR]  # stage 1: steps 1-4
        assert history[3]["lrs"] == [LR / 2, LR]  # halved by the round that ends stage 1 (after step 4)
        assert history[11]["lrs"] == [LR / 4, LR / 2]  # stage 3 after the round at step 12
        assert history[12]["lrs"] == [LR / 4, LR / 2]
    assert torch.equal(ranks[0][11]["params"], ranks[1][11]["params"])  # a stage ends at a round


def test_optimizers_of_a_second_fit_continue_at_the_stage_learning_rate_and_a_kept_one_is_not_decayed_twice():
    # T1 = 4, k1 = 2, x2, lr_decay 0.5: stage 1 ends with the round after step 4, stage 2 after step 12. Documented
    # learning rate of each step 1..14 (the rate the step used): 0.05 for steps 1-4, 0.025 for 5-12, 0.0125 after.
    documented = [LR] * 4 + [LR / 2] * 8 + [LR / 4] * 2

    def worker(rank, comm):
        model = make_layered_model(torch.float64)
        kept = torch.optim.SGD(model.parameters(), lr=LR)
        algorithm = STLSGD(4, 2, 2.0)
        algorithm.setup(model, comm, [kept])
        used = []
        for step in range(7):  # the first fit stops inside stage 2
            used.append(kept.param_groups[0]["lr"])
            local_step(algorithm, model, kept, rank, step)
        # A second fit: the same module set up again (the Trainer registers no optimizer there), then its optimizers.
        algorithm.setup(model, comm)
        fresh = torch.optim.SGD(
            [{"params": list(model.parameters())[:2]}, {"params": list(model.parameters())[2:], "lr": 2 * LR}], lr=LR
        )
        algorithm.register_optimizers([kept])  # a module that keeps its optimizer returns the same object
        kept_lr = kept.param_groups[0]["lr"]
        algorithm.register_optimizers([fresh])  # configure_optimizers building it anew, at stage 0's rates
        fresh_lrs = [group["lr"] for group in fresh.param_groups]
        for step in range(7, 14):
            used.append(fresh.param_groups[0]["lr"])
            local_step(algorithm, model, fresh, rank, step)
        return used, kept_lr, fresh_lrs, [group["lr"] for group in fresh.param_groups]

    for used, kept_lr, fresh_lrs, final_lrs in run_simulated(2, worker):
        assert used == documented
        assert kept_lr == LR / 2  # already at stage 2's rate: not halved again
        assert fresh_lrs == [LR / 2, LR]  # every group brought to stage 2, each from its own rate
        assert final_lrs == [LR / 4, LR / 2]


def test_the_proximal_variant_adds_the_pull_towards_the_stage_start_to_the_gradient():
    gamma = 0.5

    def worker(rank, comm):
        model = make_layered_model(torch.float64)
        opt = torch.optim.SGD(model.parameters(), lr=LR)
        algorithm = STLSGD(100, 10, proximal=gamma)
        algorithm.setup(model, comm, [opt])
        start = flat_params(model).clone()
        for step in range(3):
            opt.zero_grad()
            loss_of(model, rank, step).backward()
            raw = torch.cat([p.grad.reshape(-1) for p in model.parameters()]).clone()
            before = flat_params(model).clone()
            algorithm.before_optimizer_step(opt)
            used = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
            torch.testing.assert_close(used, raw + (before - start) / gamma, atol=1e-12, rtol=0)
            opt.step()
            algorithm.end_step()
        return True

    assert run_simulated(2, worker) == [True, True]


def test_resuming_in_the_middle_of_a_stage_matches_the_uninterrupted_run():
    make = lambda: STLSGD(4, 2, 2.0, proximal=1.0, bucket_cap_mb=SMALL_BUCKET_MB)  # noqa: E731
    straight = run(make, steps=14)
    resumed = run(make, steps=14, cut=6)  # stage 2, mid-period, after one learning-rate change
    for a, b in zip(straight, resumed):
        for x, y in zip(a, b):
            assert torch.equal(x["params"], y["params"]) and x["lrs"] == y["lrs"]


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="`period_growth`"):
        STLSGD(period_growth="fast")
    with pytest.raises(ValueError, match="`period_growth`"):
        STLSGD(period_growth=0.5)
    with pytest.raises(ValueError, match="`lr_decay`"):
        STLSGD(lr_decay=1.5)
    with pytest.raises(ValueError, match="`first_stage_steps`"):
        STLSGD(first_stage_steps=0)
    with pytest.raises(ValueError, match="`proximal`"):
        STLSGD(proximal=-1.0)
