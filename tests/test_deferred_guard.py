"""Rounds applied one round late (Overlap Local-SGD, CoCoD-SGD, DiLoCo's delayed outer step) carry their guard in
the background: its flags are summed alongside the round's transfer and judged at the next round, before anything
the transfer brought is read. What moves by one round, and what does not (simulated workers)."""

from __future__ import annotations

import math

import pytest
import torch
from sim_utils import flat_params, loss_of, make_model

from lightning_localsgd.algorithms import CoCoDSGD, DiLoCo, OverlapLocalSGD
from lightning_localsgd.comm import run_simulated
from lightning_localsgd.errors import NonFiniteError, OutOfStepError, RanksDisagreeError

PERIOD = 4  # rounds after steps 3, 7, 11
ALGORITHMS = {
    "overlap_local_sgd": (lambda: OverlapLocalSGD(period=PERIOD), "anchor"),
    "cocod_sgd": (lambda: CoCoDSGD(period=PERIOD), "round_start_mean"),
    "diloco_overlap": (lambda: DiLoCo(period=PERIOD, overlap=True), "round_start_mean"),
}


def train(rank, comm, name, steps, policy="raise", at_step=None):
    """Train ``steps`` steps; ``at_step(rank, step, model, opt, algo)`` runs after each optimizer step."""
    make, _ = ALGORITHMS[name]
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    algo = make()
    algo.set_nonfinite_policy(policy)
    algo.setup(model, comm, [opt])
    history = []
    for step in range(steps):
        opt.zero_grad()
        loss_of(model, rank, step).backward()
        algo.before_optimizer_step(opt)
        opt.step()
        algo.after_optimizer_step(opt)
        if at_step is not None:
            at_step(rank, step, model, opt, algo)
        algo.end_step()
        history.append(flat_params(model).clone())
    return model, algo, history


@pytest.mark.parametrize("name", list(ALGORITHMS))
def test_deferring_the_check_changes_nothing_in_the_math(name):
    # "raise" defers the check; "skip_round" keeps the blocking one: with finite values both train identically.
    deferred = run_simulated(2, lambda rank, comm: train(rank, comm, name, 12)[2])
    blocking = run_simulated(2, lambda rank, comm: train(rank, comm, name, 12, policy="skip_round")[2])
    for a, b in zip(deferred, blocking):
        for x, y in zip(a, b):
            assert torch.equal(x, y)


@pytest.mark.parametrize("name", list(ALGORITHMS))
def test_a_nonfinite_replica_stops_every_rank_at_the_next_round_before_anything_it_sent_is_read(name):
    # Rank 1 turns NaN after step 5. Its round (after step 7) sends zeros instead of its payload and flags itself;
    # the next round (after step 11) judges the flags first and stops every rank, naming round 2 and step 7.
    _, _buffer_name = ALGORITHMS[name]

    def poison(rank, step, model, opt, algo):
        if rank == 1 and step == 5:
            with torch.no_grad():
                next(model.parameters()).view(-1)[0] = math.nan

    def worker(rank, comm):
        seen = {}

        def record(rank_, step, model, opt, algo):
            poison(rank_, step, model, opt, algo)
            seen["before"] = flat_params(model).clone()
            seen["step"] = step

        try:
            train(rank, comm, name, 16, at_step=record)
        except NonFiniteError as error:
            return error, seen, None
        return None, seen, None

    results = run_simulated(2, worker)
    for rank, (error, seen, _) in enumerate(results):
        assert error is not None, f"rank {rank} did not stop"
        assert seen["step"] == 11  # found at the round after the bad one
        assert error.ranks == [1] and error.step == 7 and "round 2" in str(error)


@pytest.mark.parametrize("name", list(ALGORITHMS))
def test_no_nonfinite_value_crosses_the_wire_and_the_other_ranks_models_stay_untouched(name):
    _, buffer_name = ALGORITHMS[name]

    def worker(rank, comm):
        state = {}

        def step_hook(rank_, step, model, opt, algo):
            if rank_ == 1 and step == 5:
                with torch.no_grad():
                    next(model.parameters()).view(-1)[0] = math.nan
            state.update(algo=algo, model=model, before=flat_params(model).clone())

        try:
            train(rank, comm, name, 16, at_step=step_hook)
        except NonFiniteError:
            algo = state["algo"]
            for pending in algo._in_flight:  # what arrived from round 2's transfer
                pending.wait()
            received = algo.state_buckets(buffer_name)
            return flat_params(state["model"]), state["before"], [b.clone() for b in received]
        raise AssertionError("no error")

    rank0_after, rank0_before, rank0_received = run_simulated(2, worker)[0]
    assert torch.equal(rank0_after, rank0_before) and torch.isfinite(rank0_after).all()
    assert all(torch.isfinite(b).all() for b in rank0_received)


def test_a_checkpoint_between_rounds_judges_the_pending_round_first():
    def worker(rank, comm):
        def poison(rank_, step, model, opt, algo):
            if rank_ == 1 and step == 5:
                with torch.no_grad():
                    next(model.parameters()).view(-1)[0] = math.nan

        _, algo, _ = train(rank, comm, "cocod_sgd", 9, at_step=poison)  # round 2 (after step 7) in flight
        with pytest.raises(NonFiniteError, match="rank 1"):
            algo.state_dict()
        return True

    assert run_simulated(2, worker) == [True, True]


def test_a_request_raised_on_one_rank_is_agreed_one_round_later_than_with_a_blocking_check():
    def worker(rank, comm):
        seen = []

        def request(rank_, step, model, opt, algo):
            if rank_ == 0 and step == 4:
                algo.raise_request("requeue")

        def train_and_watch():
            make, _ = ALGORITHMS["cocod_sgd"]
            model = make_model()
            opt = torch.optim.SGD(model.parameters(), lr=0.05)
            algo = make()
            algo.setup(model, comm, [opt])
            for step in range(12):
                opt.zero_grad()
                loss_of(model, rank, step).backward()
                opt.step()
                request(rank, step, model, opt, algo)
                algo.end_step()
                seen.append(algo.take_agreed_request("requeue"))

        train_and_watch()
        return seen

    for seen in run_simulated(2, worker):
        # Raised at step 4; sent with round 2 (after step 7); agreed by every rank at round 3 (after step 11).
        assert seen == [False] * 11 + [True]


def test_a_learning_rate_changed_on_one_rank_is_named_at_the_next_round():
    def worker(rank, comm):
        def change(rank_, step, model, opt, algo):
            if rank_ == 1 and step == 5:
                opt.param_groups[0]["lr"] = 0.5

        with pytest.raises(RanksDisagreeError, match="learning rates at round 2"):
            train(rank, comm, "overlap_local_sgd", 16, at_step=change)
        return True

    assert run_simulated(2, worker) == [True, True]


def test_a_rank_at_another_synchronisation_point_pairs_with_the_deferred_flags_and_both_are_named():
    # Rank 1's data ran out one period early: it is at the final average while rank 0 sends round 2's flags.
    def worker(rank, comm):
        make, _ = ALGORITHMS["cocod_sgd"]
        model = make_model()
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        algo = make()
        algo.setup(model, comm, [opt])
        try:
            for step in range(8 if rank == 0 else 7):
                opt.zero_grad()
                loss_of(model, rank, step).backward()
                opt.step()
                algo.end_step()
            algo.finalize()
        except OutOfStepError as error:
            return str(error)
        return None

    for message in run_simulated(2, worker):
        assert message is not None
        assert "rank 0: round at step 7" in message and "rank 1: final average at step 7" in message
