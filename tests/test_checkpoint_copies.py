"""What a checkpoint copies: the consensus computed without backing up the replica, and state written uncopied.

``consensus_state`` gives a checkpoint the average of the replicas as fresh tensors, leaving each rank's replica as
it was (no backup copy, nothing to restore), and nothing at all where every rank holds the consensus already.
``state_dict(copy=False)`` hands a checkpoint the live tensors it writes at once. Simulated workers; the expected
averages are computed here from every worker's own parameters.
"""

from __future__ import annotations

import pytest
import torch
from sim_utils import local_step, make_model

from lightning_localsgd.algorithms import VRLSGD, CoCoDSGD, DiLoCo, LocalSGD, OverlapLocalSGD
from lightning_localsgd.algorithms.dpsgd import DPSGD
from lightning_localsgd.comm import run_simulated

WORLD = 4  # a ring of 3 averages fully in one gossip step: 4 keeps the replicas of D-PSGD apart
ALGORITHMS = {
    "local_sgd": lambda: LocalSGD(period=4),
    "vrl_sgd": lambda: VRLSGD(period=4),
    "cocod_sgd": lambda: CoCoDSGD(period=4),
    "overlap_local_sgd": lambda: OverlapLocalSGD(period=4),
    "diloco_overlap": lambda: DiLoCo(period=4, overlap=True),
    "dpsgd": lambda: DPSGD(check_every=4),
}


def named_values(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: t.detach().clone() for n, t in [*model.named_parameters(), *model.named_buffers()]}


def run(name: str, steps: int) -> list[dict]:
    def worker(rank, comm):
        model = make_model(batchnorm=True)
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        algo = ALGORITHMS[name]()
        algo.setup(model, comm, [opt])
        for step in range(steps):
            model.train()
            local_step(algo, model, opt, rank, step)
        before = named_values(model)
        tensors = [*model.named_parameters(), *model.named_buffers()]
        values = algo.consensus_state()
        by_name = {n: values[id(t)].clone() for n, t in tensors if id(t) in values}
        shared = {
            n: values[id(t)].untyped_storage().data_ptr() == t.untyped_storage().data_ptr()
            for n, t in tensors
            if id(t) in values
        }
        return {
            "before": before,
            "consensus": by_name,
            "after": named_values(model),
            "shared": shared,
            "in_sync": algo.in_sync,
        }

    return run_simulated(WORLD, worker)


@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_mid_period_the_consensus_is_the_average_and_the_replicas_stay_as_they_were(name):
    ranks = run(name, steps=2)
    assert not ranks[0]["in_sync"]
    replicas = [r["before"] for r in ranks]
    assert (replicas[0]["0.weight"] - replicas[1]["0.weight"]).abs().max() > 1e-3  # they really differ
    expected_names = {n for n in replicas[0] if not n.endswith("num_batches_tracked")}
    for rank in ranks:
        assert set(rank["consensus"]) == expected_names
        for n, value in rank["consensus"].items():
            mean = sum(r[n].double() for r in replicas) / WORLD
            torch.testing.assert_close(value.double(), mean, rtol=0, atol=1e-6)
        for n, value in rank["before"].items():  # untouched, bit for bit: nothing was swapped in and back
            assert torch.equal(rank["after"][n], value), n
        assert not any(rank["shared"].values())  # fresh tensors, not the replica's


def test_in_sync_the_module_holds_the_consensus_and_nothing_is_copied():
    ranks = run("local_sgd", steps=5)  # rounds after steps 1 and 5 (the first period is one step)
    assert all(r["in_sync"] and r["consensus"] == {} for r in ranks)
    for n, value in ranks[0]["after"].items():
        assert torch.equal(ranks[1]["after"][n], value)


def test_state_for_a_checkpoint_is_the_live_state_and_a_kept_state_is_a_copy():
    def worker(rank, comm):
        model = make_model()
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        algo = VRLSGD(period=4)
        algo.setup(model, comm, [opt])
        for step in range(2):
            local_step(algo, model, opt, rank, step)
        live = algo.state_dict(copy=False)
        kept = algo.state_dict()
        ptr = lambda t: t.untyped_storage().data_ptr()  # noqa: E731
        return (
            [ptr(a) == ptr(b) for a, b in zip(live["param_buckets"], algo.flat.buckets)],
            [ptr(a) == ptr(b) for a, b in zip(live["delta"], algo.delta)],
            [ptr(a) == ptr(b) for a, b in zip(kept["param_buckets"], algo.flat.buckets)],
            [torch.equal(a, b) for a, b in zip(kept["delta"], live["delta"])],
        )

    for live_buckets, live_delta, kept_buckets, same_values in run_simulated(2, worker):
        assert all(live_buckets) and all(live_delta)
        assert not any(kept_buckets) and all(same_values)
