"""inf/NaN on one rank is caught before it is averaged: raise naming rank and step, or roll back (simulated workers)."""

from __future__ import annotations

import math

import pytest
import torch
from sim_utils import flat_params, loss_of, make_model

from lightning_localsgd.algorithms import VRLSGD, CoCoDSGD, LocalSGD, OverlapLocalSGD
from lightning_localsgd.comm import run_simulated
from lightning_localsgd.errors import NonFiniteError, OutOfStepError

PERIOD = 4
ALGORITHMS = {
    "local_sgd": lambda warmup=0: LocalSGD(period=PERIOD, warmup_steps=warmup, first_period_one_step=False),
    "vrl_sgd": lambda warmup=0: VRLSGD(period=PERIOD, warmup_steps=warmup),
    "overlap_local_sgd": lambda warmup=0: OverlapLocalSGD(period=PERIOD, warmup_steps=warmup),
    "cocod_sgd": lambda warmup=0: CoCoDSGD(period=PERIOD, warmup_steps=warmup),
}


def poison(model: torch.nn.Module) -> None:
    with torch.no_grad():
        next(model.parameters()).view(-1)[0] = math.nan


def local_sgd_worker(comm, period):
    """A model, plain SGD and Local SGD (rounds after steps period, 2 period, ...) set up on this rank."""
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    algo = LocalSGD(period=period, first_period_one_step=False)
    algo.setup(model, comm, [opt])
    return model, opt, algo


def sgd_step(model, opt, rank, step):
    opt.zero_grad()
    loss_of(model, rank, step).backward()
    opt.step()


def make_worker(name, policy, data_steps, poison_at=None, warmup=0, poison_grad=False):
    """Train on the batches of ``data_steps``; rank 1 gets a NaN after the step at position ``poison_at``."""

    def worker(rank, comm):
        model = make_model()
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        algo = ALGORITHMS[name](warmup)
        algo.set_nonfinite_policy(policy)
        algo.setup(model, comm, [opt])
        for position, data_step in enumerate(data_steps):
            opt.zero_grad()
            loss_of(model, rank, data_step).backward()
            if poison_grad and position == poison_at and rank == 1:
                next(model.parameters()).grad.view(-1)[0] = math.inf
            before_sync = flat_params(model).clone()
            try:
                algo.before_optimizer_step(opt)
                opt.step()
                algo.after_optimizer_step(opt)
                if not poison_grad and position == poison_at and rank == 1:
                    poison(model)
                before_sync = flat_params(model).clone()
                algo.end_step()
            except NonFiniteError as error:
                return {"error": error, "before": before_sync, "after": flat_params(model).clone()}
        algo.finalize()
        state = algo.state_dict()
        return {"params": flat_params(model).clone(), "state": state, "rolled_back": algo.rounds_rolled_back}

    return worker


@pytest.mark.parametrize("name", list(ALGORITHMS))
def test_raise_names_the_rank_and_step_and_leaves_the_other_replicas_untouched(name):
    # Rank 1 turns NaN after step 5; the next round (after step 7) must stop every rank before averaging.
    results = run_simulated(2, make_worker(name, "raise", range(12), poison_at=5))
    for rank, result in enumerate(results):
        error = result["error"]
        assert error.ranks == [1] and error.step == 7
        assert "rank 1" in str(error) and "step 7" in str(error) and "round" in str(error)
        if rank == 0:  # nothing was averaged into rank 0's model
            assert torch.isfinite(result["after"]).all()
            torch.testing.assert_close(result["after"], result["before"], rtol=0, atol=0)


@pytest.mark.parametrize("name", list(ALGORITHMS))
def test_skip_round_rolls_every_rank_back_to_the_last_good_round(name):
    # Skipping is the same as never having trained on the poisoned period's batches (data steps 8..11). The third
    # period, so that the state gone back to is not the initial one (VRL-SGD's Delta is non-zero by then).
    skipped = run_simulated(2, make_worker(name, "skip_round", range(16), poison_at=9))
    reference = run_simulated(2, make_worker(name, "raise", [0, 1, 2, 3, 4, 5, 6, 7, 12, 13, 14, 15]))
    for got, want in zip(skipped, reference):
        assert got["rolled_back"] == 1
        torch.testing.assert_close(got["params"], want["params"])
        for key, value in want["state"].items():
            if key in ("step", "comm_stats"):
                continue  # the schedule went on; only the model and algorithm state went back
            if isinstance(value, list) and value and isinstance(value[0], torch.Tensor):
                for a, b in zip(got["state"][key], value):
                    torch.testing.assert_close(a, b, msg=f"{name}: {key} differs from the reference")


def test_warmup_gradients_are_checked_before_they_are_averaged():
    results = run_simulated(2, make_worker("vrl_sgd", "raise", range(6), poison_at=1, warmup=3, poison_grad=True))
    for result in results:
        assert result["error"].ranks == [1] and result["error"].step == 1
        assert "gradients" in str(result["error"])


def test_skip_round_drops_a_warmup_step_with_nonfinite_gradients_on_every_rank():
    poisoned = make_worker("local_sgd", "skip_round", range(8), poison_at=1, warmup=3, poison_grad=True)
    skipped = run_simulated(2, poisoned)
    reference = run_simulated(2, make_worker("local_sgd", "raise", [0, 2, 3, 4, 5, 6, 7], warmup=3))
    for got, want in zip(skipped, reference):
        torch.testing.assert_close(got["params"], want["params"])
        assert got["state"]["step"] == want["state"]["step"] == 7  # the dropped step was not counted


def test_consensus_refuses_to_average_a_nonfinite_replica():
    def worker(rank, comm):
        model, opt, algo = local_sgd_worker(comm, period=10)
        sgd_step(model, opt, rank, 0)
        algo.end_step()
        if rank == 1:
            poison(model)
        with pytest.raises(NonFiniteError, match="rank 1"):
            algo.enter_consensus()
        return flat_params(model)

    rank0, _ = run_simulated(2, worker)
    assert torch.isfinite(rank0).all()


def test_a_request_raised_on_one_rank_is_agreed_by_all_at_the_next_round():
    def worker(rank, comm):
        model, opt, algo = local_sgd_worker(comm, period=PERIOD)
        seen = []
        for step in range(8):
            sgd_step(model, opt, rank, step)
            if rank == 0 and step == 4:
                algo.raise_request("requeue")
            algo.end_step()
            seen.append("requeue" in algo.agreed_requests)
        return seen

    for seen in run_simulated(2, worker):
        assert seen == [False] * 7 + [True]  # rounds after steps 3 and 7; raised at step 4


def test_ranks_at_different_synchronisation_points_stop_with_a_clear_error_instead_of_mixing_tensors():
    # Rank 1's data ran out one period early: it heads for the final average while rank 0 is at a round.
    def worker(rank, comm):
        model, opt, algo = local_sgd_worker(comm, period=2)
        for step in range(4 if rank == 0 else 3):
            sgd_step(model, opt, rank, step)
            try:
                algo.end_step()
            except OutOfStepError as error:
                return str(error)
        before = flat_params(model).clone()
        try:
            algo.finalize()
        except OutOfStepError as error:
            assert torch.equal(flat_params(model), before)  # nothing averaged
            return str(error)
        return None

    for message in run_simulated(2, worker):
        assert message is not None
        assert "rank 0: round at step 3" in message and "rank 1: final average at step 3" in message
