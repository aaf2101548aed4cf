"""The shared core, with simulated workers: buffers, learning rates, precision, set-up, re-bucketing, schedule.

Each test names a behaviour that the core once got wrong.
"""

from __future__ import annotations

import pytest
import torch
from sim_utils import flat_params, local_step, loss_of, make_model
from torch import nn

from lightning_localsgd.algorithms import VRLSGD, CoCoDSGD, LocalSGD, OverlapLocalSGD
from lightning_localsgd.algorithms.buffers import averaged_buffers, check_buffer_selection
from lightning_localsgd.comm import run_simulated
from lightning_localsgd.errors import RanksDisagreeError

LR = 0.05


class WithMask(nn.Module):
    """A model with a causal-mask buffer (-inf), a per-rank queue and BatchNorm statistics."""

    def __init__(self) -> None:
        super().__init__()
        self.body = make_model(batchnorm=True)
        self.register_buffer("mask", torch.triu(torch.full((3, 3), float("-inf")), diagonal=1))
        self.register_buffer("queue", torch.zeros(4))

    def forward(self, x):
        return self.body(x)


def batchnorm_statistics(model: WithMask) -> torch.Tensor:
    bn = model.body[1]
    return torch.cat([bn.running_mean, bn.running_var]).clone()


def test_only_normalisation_statistics_are_averaged_by_default_and_a_mask_of_inf_does_not_stop_training():
    def worker(rank, comm):
        model = WithMask()
        opt = torch.optim.SGD(model.parameters(), lr=LR)
        algo = LocalSGD(period=2, first_period_one_step=False)
        algo.setup(model, comm, [opt])
        for step in range(4):  # rounds after steps 1 and 3
            model.queue.fill_(float(rank))  # per-rank data the rounds must leave alone
            opt.zero_grad()
            loss_of(model.body, rank, step).backward()
            algo.before_optimizer_step(opt)
            opt.step()
            algo.after_optimizer_step(opt)
            before_round = batchnorm_statistics(model)
            algo.end_step()
        return model.queue.clone(), batchnorm_statistics(model), model.mask.clone(), before_round

    results = run_simulated(2, worker)
    assert [r[0][0].item() for r in results] == [0.0, 1.0]
    own = [r[3] for r in results]
    assert (own[0] - own[1]).abs().max() > 1e-3  # each rank's batches moved its statistics its own way
    for _, statistics, _, _ in results:  # the round gives every rank the mean, not one rank's copy
        torch.testing.assert_close(statistics, (own[0] + own[1]) / 2, rtol=1e-6, atol=1e-7)
    assert torch.isinf(results[0][2]).sum() == 3


@pytest.mark.parametrize(
    ("selection", "expected"),
    [
        (None, ["body.1.running_mean", "body.1.running_var"]),
        ("all", ["mask", "queue", "body.1.running_mean", "body.1.running_var"]),
        ("none", []),
        (r"queue", ["queue"]),
        (lambda name, buffer: name.endswith("var"), ["body.1.running_var"]),
    ],
)
def test_buffer_selection(selection, expected):
    names = [name for name, _ in averaged_buffers(WithMask(), selection)]
    assert sorted(names) == sorted(expected)


def test_a_bad_buffer_selection_is_refused_at_construction():
    with pytest.raises(ValueError, match="regular expression"):
        check_buffer_selection("(unclosed")
    with pytest.raises(ValueError, match="buffers"):
        LocalSGD(buffers=3)


def test_vrl_keeps_sum_of_delta_zero_when_one_rank_skips_an_optimizer_step():
    """A step the fp16 grad scaler skips on one rank still counts its lr and applies the correction."""

    def worker(rank, comm):
        model = make_model()
        opt = torch.optim.SGD(model.parameters(), lr=LR)
        algo = VRLSGD(period=4)
        algo.setup(model, comm, [opt])
        for step in range(8):
            local_step(algo, model, opt, rank, step, skip=(rank == 1 and step == 5))
        return torch.cat(algo.delta)

    d0, d1 = run_simulated(2, worker)
    assert d0.abs().max() > 1e-3
    torch.testing.assert_close(d0 + d1, torch.zeros_like(d0), atol=1e-6, rtol=0)


def test_ranks_with_different_learning_rates_stop_with_a_clear_error_at_the_next_round():
    def worker(rank, comm):
        model = make_model()
        opt = torch.optim.SGD(model.parameters(), lr=LR)
        algo = VRLSGD(period=3)
        algo.setup(model, comm, [opt])
        for step in range(6):
            if rank == 1 and step == 4:
                opt.param_groups[0]["lr"] = LR / 10  # e.g. ReduceLROnPlateau fed an unsynchronised metric
            local_step(algo, model, opt, rank, step)

    with pytest.raises(RanksDisagreeError, match="learning rates"):
        run_simulated(2, worker)


def test_overlap_uses_the_learning_rate_of_the_round_step_not_the_one_a_scheduler_set_after_it():
    """Lightning steps per-step schedulers after the optimizer step and before the batch ends (the round)."""
    alpha, beta = 0.5, 0.5

    def worker(rank, comm):
        model = make_model()
        opt = torch.optim.SGD(model.parameters(), lr=LR)
        scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
        algo = OverlapLocalSGD(period=2, pullback=alpha, anchor_momentum=beta)
        algo.setup(model, comm, [opt])
        z0 = flat_params(model).clone()
        lrs = []
        for step in range(2):
            opt.zero_grad()
            loss_of(model, rank, step).backward()
            opt.step()
            lrs.append(opt.param_groups[0]["lr"])
            algo.after_optimizer_step(opt)
            scheduler.step()
            if step == 1:
                x_before_round = flat_params(model).clone()
            algo.end_step()
        velocity = torch.cat([v.clone() for v in algo._velocity])
        return z0, x_before_round, velocity, lrs[1]

    for z0, x, velocity, lr_at_round in run_simulated(2, worker):
        pulled = x + alpha * (z0 - x)
        torch.testing.assert_close(velocity, (z0 - pulled) / lr_at_round, atol=1e-5, rtol=1e-5)


def test_overlap_parameter_without_gradient_stays_exactly_at_its_value():
    def worker(rank, comm):
        model = make_model()
        extra = nn.Parameter(torch.randn(7, generator=torch.Generator().manual_seed(3)) / 3)
        model.register_parameter("unused", extra)
        start = extra.detach().clone()
        opt = torch.optim.SGD(model.parameters(), lr=LR)
        algo = OverlapLocalSGD(period=2)
        algo.setup(model, comm, [opt])
        for step in range(12):
            local_step(algo, model, opt, rank, step)
        algo.finalize()
        return torch.equal(extra.detach(), start), torch.cat(algo._velocity).isfinite().all().item()

    assert run_simulated(3, worker) == [(True, True)] * 3


def test_overlap_group_with_lr_zero_keeps_velocity_in_gradient_units():
    def worker(rank, comm):
        model = make_model()
        first, second = list(model.parameters())[:2], list(model.parameters())[2:]
        opt = torch.optim.SGD([{"params": first, "lr": LR}, {"params": second, "lr": 0.0}])
        algo = OverlapLocalSGD(period=2)
        algo.setup(model, comm, [opt])
        for step in range(6):
            local_step(algo, model, opt, rank, step)
        views = algo.state_views("anchor_velocity")
        return [v.abs().max().item() for v in views[2:]], torch.cat(algo._velocity).isfinite().all().item()

    for zero_lr_velocities, finite in run_simulated(2, worker):
        assert finite and zero_lr_velocities == [0.0, 0.0]


@pytest.mark.parametrize(
    "make", [lambda: VRLSGD(period=3), lambda: OverlapLocalSGD(period=3), lambda: CoCoDSGD(period=3)]
)
def test_algorithm_state_is_float32_for_bfloat16_parameters(make):
    def worker(rank, comm):
        model = make_model().to(torch.bfloat16)
        opt = torch.optim.SGD(model.parameters(), lr=LR)
        algo = make()
        algo.setup(model, comm, [opt])
        for step in range(6):
            opt.zero_grad()
            x, y = (t.to(torch.bfloat16) for t in _batch(rank, step))
            nn.functional.mse_loss(model(x), y).backward()
            opt.step()
            algo.after_optimizer_step(opt)
            algo.end_step()
        return {name: [b.dtype for b in buckets] for name, buckets in algo._state.items()}, algo

    results = run_simulated(2, worker)
    for dtypes, _ in results:
        assert dtypes and all(d == torch.float32 for ds in dtypes.values() for d in ds)
    if isinstance(results[0][1], VRLSGD):
        d0, d1 = (torch.cat(r[1].delta) for r in results)
        assert d0.abs().max() > 1e-3
        assert (d0 + d1).abs().max() < 1e-3 * d0.abs().max()


def _batch(rank, step):
    from sim_utils import worker_batch

    return worker_batch(rank, step)


def test_bfloat16_replicas_are_averaged_in_float32():
    values = [2.53125, 1.3984375, 1.609375]  # a bf16 sum-then-divide gives 1.8515625; the fp32 mean rounds to 1.84375

    def worker(rank, comm):
        model = make_model().to(torch.bfloat16)
        algo = LocalSGD(period=1, first_period_one_step=False)
        algo.setup(model, comm, [])
        with torch.no_grad():
            for p in model.parameters():
                p.fill_(values[rank])
        algo.end_step()
        return flat_params(model).float()

    expected = torch.tensor(values).mean().to(torch.bfloat16).float().item()
    assert expected == 1.84375
    for result in run_simulated(3, worker):
        assert torch.equal(result, torch.full_like(result, expected))


def test_set_up_copies_frozen_parameters_and_every_buffer_from_rank_0():
    def worker(rank, comm):
        model = WithMask()
        frozen = nn.Linear(3, 3)
        with torch.no_grad():
            frozen.weight.fill_(float(rank))
        frozen.requires_grad_(False)
        model.frozen = frozen
        model.queue.fill_(float(rank) + 5)
        algo = LocalSGD(period=2)
        algo.setup(model, comm, [torch.optim.SGD(model.parameters(), lr=LR)])
        return model.frozen.weight.clone(), model.queue.clone()

    (w0, q0), (w1, q1) = run_simulated(2, worker)
    assert torch.equal(w0, w1) and torch.equal(w0, torch.zeros(3, 3))
    assert torch.equal(q0, q1) and q0[0].item() == 5.0


def test_a_layer_unfrozen_mid_run_is_averaged_from_the_next_round_and_delta_of_the_others_is_kept():
    first = sum(p.numel() for p in list(make_model().parameters())[:2])  # the body: managed all along

    def worker(rank, comm):
        model = make_model()
        head = list(model.parameters())[-2:]
        for p in head:
            p.requires_grad_(False)
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR)
        algo = VRLSGD(period=3)
        algo.setup(model, comm, [opt])
        for step in range(3):
            local_step(algo, model, opt, rank, step)
        delta_before = torch.cat([v.reshape(-1) for v in algo.state_views("delta")[:2]]).clone()
        for p in head:
            p.requires_grad_(True)
        opt.add_param_group({"params": head, "lr": LR})
        for step in range(3, 5):
            local_step(algo, model, opt, rank, step)
        opt.zero_grad()  # step 5 by hand, to see the replica before its round (which re-buckets, then averages)
        loss_of(model, rank, 5).backward()
        algo.before_optimizer_step(opt)
        opt.step()
        algo.after_optimizer_step(opt)
        body_before_round = flat_params(model)[:first].clone()
        assert algo.end_step()
        synced = flat_params(model).clone()
        local_step(algo, model, opt, rank, 6)
        kept = algo.state_views("delta")
        return synced, len(algo.flat.params), delta_before, kept, body_before_round

    results = run_simulated(2, worker)
    assert torch.equal(results[0][0], results[1][0])
    assert results[0][1] == 4
    assert results[0][2].abs().max() > 1e-3
    # Delta of the parameters managed all along went on from its value (not reset): the spec's update
    # Delta_i += (x_hat - x_i) / (k lr), with x_i before averaging; and still sums to zero.
    x_hat = results[0][0][:first]
    for _, _, delta_before, kept, body_before_round in results:
        expected = delta_before + (x_hat - body_before_round) / (3 * LR)
        torch.testing.assert_close(torch.cat([v.reshape(-1) for v in kept[:2]]), expected, rtol=1e-4, atol=1e-5)
    total = sum(torch.cat([v.reshape(-1) for v in r[3]]) for r in results)
    assert total.abs().max() < 1e-5


def test_a_layer_frozen_mid_period_is_averaged_once_then_left_alone():
    def worker(rank, comm):
        model = make_model()
        opt = torch.optim.SGD(model.parameters(), lr=LR)
        algo = LocalSGD(period=4, first_period_one_step=False)
        algo.setup(model, comm, [opt])
        for step in range(2):
            local_step(algo, model, opt, rank, step)
        first = model[0]
        first.requires_grad_(False)
        at_freeze = first.weight.detach().clone()
        for step in range(2, 4):
            local_step(algo, model, opt, rank, step)
        return first.weight.detach().clone(), len(algo.flat.params), at_freeze

    (w0, n0, f0), (w1, _, f1) = run_simulated(2, worker)
    assert n0 == 2 and (f0 - f1).abs().max() > 1e-4  # the replicas had drifted apart when it was frozen
    assert torch.equal(w0, w1)
    torch.testing.assert_close(w0, (f0 + f1) / 2, rtol=1e-6, atol=1e-7)  # their mean, not one rank's copy


def test_ranks_unfreezing_different_layers_stop_with_a_clear_error():
    def worker(rank, comm):
        model = make_model()
        opt = torch.optim.SGD(model.parameters(), lr=LR)
        algo = LocalSGD(period=2, first_period_one_step=False)
        algo.setup(model, comm, [opt])
        local_step(algo, model, opt, rank, 0)
        if rank == 1:
            model[0].requires_grad_(False)
        local_step(algo, model, opt, rank, 1)

    with pytest.raises(RanksDisagreeError, match="trainable parameters"):
        run_simulated(2, worker)


def test_warmup_steps_are_not_rounds():
    def worker(rank, comm):
        model = make_model()
        opt = torch.optim.SGD(model.parameters(), lr=LR)
        algo = LocalSGD(period=2, warmup_steps=5, first_period_one_step=False)
        algo.setup(model, comm, [opt])
        for step in range(9):
            local_step(algo, model, opt, rank, step)
        return algo.rounds, comm.stats.rounds

    assert run_simulated(2, worker) == [(2, 7), (2, 7)]  # 2 rounds; 7 synchronisations with the warm-up steps


def test_setting_up_again_on_the_same_model_continues_the_run():
    """A second `fit` continues: schedule, Delta and the rounds counted stay."""

    def worker(rank, comm):
        model = make_model()
        opt = torch.optim.SGD(model.parameters(), lr=LR)
        algo = VRLSGD(period=3)
        algo.setup(model, comm, [opt])
        for step in range(4):
            local_step(algo, model, opt, rank, step)
        algo.finalize()
        delta = torch.cat(algo.delta).clone()
        opt2 = torch.optim.SGD(model.parameters(), lr=LR)
        algo.setup(model, comm, [opt2])
        return algo.step, algo.rounds, torch.equal(torch.cat(algo.delta), delta), delta.abs().max().item()

    for step, rounds, kept, size in run_simulated(2, worker):
        assert (step, rounds, kept) == (4, 1, True) and size > 1e-4
