"""Averaged buffers of the late-applying algorithms travel with the round's transfer, with simulated workers.

The rule (``lightning_localsgd/algorithms/late_buffers.py``): at a round, once the previous transfer landed,
``b_i += mean_j s_j - s_i`` (``s``: the buffers when that transfer started), then ``s_i = b_i`` is sent with this
round's transfer. No blocking collective at a round, and every average of the replicas is unchanged.
"""

from __future__ import annotations

import pytest
import torch
from sim_utils import loss_of, make_model
from torch import nn

from lightning_localsgd.algorithms import CoCoDSGD, DiLoCo, OverlapLocalSGD
from lightning_localsgd.algorithms.late_buffers import LateBufferAverage
from lightning_localsgd.comm import run_simulated
from lightning_localsgd.errors import NonFiniteError

WORLD, LR = 3, 0.05
LATE = {
    "cocod": lambda: CoCoDSGD(period=2),
    "overlap": lambda: OverlapLocalSGD(period=3),
    "diloco_overlap": lambda: DiLoCo(period=2, overlap=True),
}
STARTS_AT_SETUP = {"cocod": True, "overlap": False, "diloco_overlap": True}  # a transfer starts at set-up


def statistics(model: nn.Module) -> torch.Tensor:
    bn = model[1]
    return torch.cat([bn.running_mean, bn.running_var]).clone()


def train(rank, comm, algo, steps, on_step=None, resume_from=None):
    """A fresh worker trained through steps ``0 .. steps - 1`` (from ``resume_from = (step, algorithm state,
    optimizer state)`` on, if given); ``on_step(step, rounded, statistics before end_step, after)``."""
    model = make_model(batchnorm=True)
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    algo.setup(model, comm, [opt])
    first = 0
    if resume_from is not None:
        first, algo_state, opt_state = resume_from
        algo.load_state_dict(algo_state)
        opt.load_state_dict(opt_state)
    for step in range(first, steps):
        opt.zero_grad()
        loss_of(model, rank, step).backward()  # the forward moves this rank's running statistics
        algo.before_optimizer_step(opt)
        opt.step()
        algo.after_optimizer_step(opt)
        before = statistics(model)
        rounded = algo.end_step()
        if on_step is not None:
            on_step(step, rounded, before, statistics(model))
    return model, opt, algo


@pytest.mark.parametrize("name", sorted(LATE))
def test_a_round_applies_the_previous_rounds_buffer_average_and_keeps_each_ranks_own_updates(name):
    def worker(rank, comm):
        records = []
        initial = statistics(make_model(batchnorm=True))
        train(rank, comm, LATE[name](), 12, lambda *r: records.append(r))
        return initial, records

    results = run_simulated(WORLD, worker)
    sent = [results[r][0] if STARTS_AT_SETUP[name] else None for r in range(WORLD)]
    rounds = 0
    for step in range(12):
        rows = [results[r][1][step] for r in range(WORLD)]
        if not rows[0][1]:
            for _, _, before, after in rows:
                assert torch.equal(after, before)  # between rounds the statistics are each rank's own
            continue
        rounds += 1
        befores, afters = [row[2] for row in rows], [row[3] for row in rows]
        for r in range(WORLD):
            expected = befores[r] if sent[0] is None else befores[r] + (sum(sent) / WORLD - sent[r])
            torch.testing.assert_close(afters[r], expected, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(sum(afters) / WORLD, sum(befores) / WORLD, rtol=1e-6, atol=1e-6)  # mean kept
        assert (afters[0] - afters[1]).abs().max() > 1e-3  # not averaged: each rank keeps its own updates
        sent = afters
    assert rounds >= 4


@pytest.mark.parametrize("name", sorted(LATE))
def test_evaluation_and_the_final_model_see_the_plain_average_of_the_statistics(name):
    def worker(rank, comm):
        model, _, algo = train(rank, comm, LATE[name](), 7)  # mid-period, a buffer average pending
        own = statistics(model)
        with algo.consensus():
            consensus = statistics(model)
        assert torch.equal(statistics(model), own)  # the rank's own statistics back after evaluation
        algo.finalize()
        return own, consensus, statistics(model), algo._late_buffers.pending

    results = run_simulated(WORLD, worker)
    mean = sum(r[0] for r in results) / WORLD
    for _, consensus, final, pending in results:
        torch.testing.assert_close(consensus, mean, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(final, mean, rtol=1e-6, atol=1e-6)
        assert not pending  # after the final average nothing is left to apply


@pytest.mark.parametrize("name", sorted(LATE))
def test_a_checkpoint_with_a_buffer_average_pending_resumes_exactly(name):
    def worker(rank, comm):
        model, _, _ = train(rank, comm, LATE[name](), 12)
        full = statistics(model)
        _, opt2, algo2 = train(rank, comm, LATE[name](), 7)
        assert algo2._late_buffers.pending
        model3, _, _ = train(rank, comm, LATE[name](), 12, resume_from=(7, algo2.state_dict(), opt2.state_dict()))
        return full, statistics(model3), torch.cat([p.detach().reshape(-1) for p in model3.parameters()]), model

    for full, resumed, params, model in run_simulated(2, worker):
        torch.testing.assert_close(resumed, full, rtol=0, atol=0)
        torch.testing.assert_close(params, torch.cat([p.detach().reshape(-1) for p in model.parameters()]))


def test_half_precision_buffers_are_corrected_in_float32_and_rounded_once():
    late = LateBufferAverage()
    half = torch.tensor([1.0, 2.0], dtype=torch.bfloat16)
    wide = torch.tensor([3.0], dtype=torch.float64)
    means = late.start([half, wide])
    assert [m.dtype for m in means] == [torch.float32, torch.float64]  # one packed tensor per state dtype
    # As if the other ranks' statistics had arrived. The first correction, 2**-8 + 2**-20, lifts 1.0 past the
    # midpoint to the next bfloat16 (1 + 2**-7) when added in float32 and rounded once; rounded to bfloat16 first
    # (2**-8), it would land exactly on the midpoint and round (to even) back to 1.0.
    means[0].copy_(torch.tensor([1 + 2**-8 + 2**-20, 2.5]))
    means[1].fill_(4.0)
    late.land_([half, wide])
    assert half.tolist() == [1 + 2**-7, 2.5] and wide.item() == 4.0
    assert not late.pending


def test_a_buffer_set_that_changed_between_rounds_is_refused_not_misapplied():
    late = LateBufferAverage()
    late.start([torch.zeros(3)])
    with pytest.raises(RuntimeError, match="buffers changed between two rounds"):
        late.land_([torch.zeros(4)])


@pytest.mark.parametrize("name", sorted(LATE))
def test_a_nonfinite_running_statistic_stops_every_rank_before_any_rank_applies_it(name):
    def worker(rank, comm):
        model = make_model(batchnorm=True)
        opt = torch.optim.SGD(model.parameters(), lr=LR)
        algo = LATE[name]()
        algo.setup(model, comm, [opt])
        try:
            for step in range(12):
                opt.zero_grad()
                loss_of(model, rank, step).backward()
                opt.step()
                if rank == 1 and step == 4:
                    model[1].running_mean[0] = float("nan")  # a poisoned statistic, parameters still finite
                algo.end_step()
        except NonFiniteError as error:
            return str(error), step, statistics(model)
        return None, step, statistics(model)

    results = run_simulated(2, worker)
    for rank, (error, step, stats) in enumerate(results):
        assert error is not None and "rank 1" in error, error
        assert step < 12
        if rank == 0:
            assert torch.isfinite(stats).all()  # nothing the bad round sent reached the finite rank
