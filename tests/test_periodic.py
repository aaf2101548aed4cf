"""The shared machinery: warm-up, consensus, per-rank state, set-up checks (simulated workers)."""

from __future__ import annotations

import copy

import pytest
import torch
from sim_utils import flat_params, local_step, make_model

from lightning_localsgd.algorithms import VRLSGD, LocalSGD
from lightning_localsgd.comm import run_simulated


def train(algo, model, opt, rank, steps, start=0):
    for step in range(start, start + steps):
        local_step(algo, model, opt, rank, step)


def test_warmup_steps_are_synchronous_then_local_steps_begin():
    def worker(rank, comm):
        model = make_model(batchnorm=True)
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        algo = LocalSGD(period=4, warmup_steps=3, first_period_one_step=False)
        algo.setup(model, comm, [opt])
        history = []
        for step in range(6):
            train(algo, model, opt, rank, 1, start=step)
            history.append((algo.in_sync, flat_params(model), model[1].running_mean.clone()))
        return history

    h0, h1 = run_simulated(2, worker)
    for step in range(3):
        assert h0[step][0] and torch.equal(h0[step][1], h1[step][1]) and torch.equal(h0[step][2], h1[step][2])
    for step in range(3, 6):
        assert not h0[step][0] and (h0[step][1] - h1[step][1]).abs().max() > 1e-4


def test_consensus_holds_the_average_then_gives_each_rank_its_replica_back():
    def worker(rank, comm):
        model = make_model(batchnorm=True)
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        algo = VRLSGD(period=10)
        algo.setup(model, comm, [opt])
        train(algo, model, opt, rank, 3)
        local = flat_params(model).clone()
        with algo.consensus():
            inside = flat_params(model).clone()
            with algo.consensus():  # re-entrant, no second average
                assert torch.equal(flat_params(model), inside)
            saved = algo.state_dict()
        return local, inside, flat_params(model).clone(), torch.cat(saved["param_buckets"])

    (l0, c0, a0, s0), (l1, c1, a1, s1) = run_simulated(2, worker)
    torch.testing.assert_close(c0, (l0 + l1) / 2)
    assert torch.equal(c0, c1)
    assert torch.equal(a0, l0) and torch.equal(a1, l1)
    assert torch.equal(s0, l0) and torch.equal(s1, l1)  # state holds the replica, not the consensus


@pytest.mark.parametrize("cls", [LocalSGD, VRLSGD])
def test_state_dict_resume_mid_period_reproduces_the_uninterrupted_run(cls):
    def worker(rank, comm):
        def fresh():
            model = make_model()
            opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
            algo = cls(period=4)
            algo.setup(model, comm, [opt])
            return model, opt, algo

        model, opt, algo = fresh()
        train(algo, model, opt, rank, 6)
        saved = copy.deepcopy((algo.state_dict(), opt.state_dict()))
        train(algo, model, opt, rank, 6, start=6)

        model2, opt2, algo2 = fresh()
        algo2.load_state_dict(saved[0])
        opt2.load_state_dict(saved[1])
        train(algo2, model2, opt2, rank, 6, start=6)
        return flat_params(model), flat_params(model2), algo.step, algo2.step

    for full, resumed, s1, s2 in run_simulated(2, worker):
        assert torch.equal(full, resumed) and s1 == s2 == 12


def test_state_from_another_algorithm_is_refused():
    def worker(rank, comm):
        a, b = LocalSGD(period=2), VRLSGD(period=2)
        a.setup(make_model(), comm)
        b.setup(make_model(), comm)
        with pytest.raises(ValueError, match="LocalSGD"):
            b.load_state_dict(a.state_dict())
        return True

    assert all(run_simulated(2, worker))


def test_different_models_on_different_ranks_are_refused_at_setup():
    def worker(rank, comm):
        model = make_model()
        if rank == 1:
            model[0].bias.requires_grad_(False)  # rank 1 froze something rank 0 did not
        with pytest.raises(ValueError, match="different trainable parameters"):
            LocalSGD(period=2).setup(model, comm)
        return True

    assert all(run_simulated(2, worker))


def test_setup_starts_every_rank_from_rank_zero_model():
    def worker(rank, comm):
        model = make_model(seed=rank)
        LocalSGD(period=2).setup(model, comm)
        return flat_params(model)

    p0, p1 = run_simulated(2, worker)
    assert torch.equal(p0, p1) and torch.equal(p0, flat_params(make_model(seed=0)))
