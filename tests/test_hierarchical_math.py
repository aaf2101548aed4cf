"""Hierarchical Local SGD against its update rule: 4 simulated workers posing as 2 nodes x 2."""

from __future__ import annotations

import pytest
import torch
from sim_utils import DTYPES, SMALL_BUCKET_MB, flat_params, loss_of, make_layered_model

from lightning_localsgd.algorithms import HierarchicalLocalSGD
from lightning_localsgd.comm.simulated import run_simulated_nodes

NODES, LOCAL = 2, 2
LR = 0.05


@pytest.mark.parametrize("dtype", DTYPES)
def test_nodes_average_every_intra_period_and_the_world_every_inter_period(dtype):
    intra, inter, steps = 2, 6, 12

    def worker(rank, comm, intra_comm, cross_comm):
        model = make_layered_model(dtype)
        opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
        algorithm = HierarchicalLocalSGD(intra, inter, bucket_cap_mb=SMALL_BUCKET_MB)
        algorithm.set_node_groups(intra_comm, cross_comm)
        algorithm.setup(model, comm, [opt])
        history = []
        for step in range(steps):
            opt.zero_grad()
            loss_of(model, rank, step).backward()
            algorithm.before_optimizer_step(opt)
            opt.step()
            before = flat_params(model).clone()
            algorithm.end_step()
            history.append((before, flat_params(model).clone(), algorithm.in_sync))
        return history, algorithm.metrics()

    results = run_simulated_nodes(NODES, LOCAL, worker)
    tolerance = 1e-6 if dtype == torch.float32 else 1e-12
    for step in range(steps):
        before = [r[0][step][0] for r in results]
        after = [r[0][step][1] for r in results]
        done = step + 1
        if done % inter == 0:  # every rank: the mean over all 4
            for a in after:
                torch.testing.assert_close(a, torch.stack(before).mean(0), atol=tolerance, rtol=0)
            assert all(r[0][step][2] for r in results)
        elif done % intra == 0:  # each node: its own mean; the nodes stay apart
            for rank, a in enumerate(after):
                node = rank // LOCAL
                mean = torch.stack(before[node * LOCAL : (node + 1) * LOCAL]).mean(0)
                torch.testing.assert_close(a, mean, atol=tolerance, rtol=0)
            assert (after[0] - after[LOCAL]).abs().max() > 1e-4 and not results[0][0][step][2]
        else:
            assert torch.equal(after[0], before[0])
    numel = sum(p.numel() for p in make_layered_model().parameters())
    inter_bytes = results[0][1]["comm/inter_node_mb_sent"] * 1e6
    # two global rounds; local rank 0 carries half the model across (a 2-node all-reduce sends it once)
    element = 4 if dtype == torch.float32 else 8
    assert inter_bytes == pytest.approx(2 * (-(-numel // LOCAL) * element + 0), rel=0, abs=element * 4)


def test_bad_periods_are_refused():
    with pytest.raises(ValueError, match="multiple of `intra_period`"):
        HierarchicalLocalSGD(4, 10)
    with pytest.raises(ValueError, match="`intra_period`"):
        HierarchicalLocalSGD(0, 8)


def test_node_major_numbering_is_accepted_and_any_other_refused_naming_the_misplaced_ranks():
    from lightning_localsgd.comm.layout import check_node_major

    check_node_major([0, 0, 0, 1, 1, 1], 3, "X")  # 2 nodes x 3, node by node
    with pytest.raises(ValueError, match=r"rank 1 on node 1, rank 2 on node 0; expected rank r on node r // 2"):
        check_node_major([0, 1, 0, 1], 2, "X")  # round-robin
    # nodes 0/1 and 2/3 swapped: all 8 misplaced, the first 4 named
    with pytest.raises(
        ValueError, match=r"rank 0 on node 1, rank 1 on node 1, rank 2 on node 0, rank 3 on node 0 and 4 more"
    ):
        check_node_major([1, 1, 0, 0, 3, 3, 2, 2], 2, "X")


@pytest.mark.parametrize(("nodes", "local"), [(1, 4), (4, 1)])
def test_one_node_or_one_rank_per_node_averages_once_per_round_with_no_extra_traffic(nodes, local):
    intra, inter, steps = 2, 4, 8

    def worker(rank, comm, intra_comm, cross_comm):
        model = make_layered_model()
        opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
        algorithm = HierarchicalLocalSGD(intra, inter)
        algorithm.set_node_groups(intra_comm, cross_comm)
        algorithm.setup(model, comm, [opt])
        history = []
        for step in range(steps):
            opt.zero_grad()
            loss_of(model, rank, step).backward()
            algorithm.before_optimizer_step(opt)
            opt.step()
            before = flat_params(model).clone()
            algorithm.end_step()
            history.append((before, flat_params(model).clone()))
        return history, algorithm.metrics()

    results = run_simulated_nodes(nodes, local, worker)
    world = nodes * local
    for step in range(steps):
        before = [r[0][step][0] for r in results]
        after = [r[0][step][1] for r in results]
        # One node: every node round is a global one. One rank per node: a node round changes nothing.
        averaged = (step + 1) % (intra if nodes == 1 else inter) == 0
        for rank in range(world):
            expected = torch.stack(before).mean(0) if averaged else before[rank]
            torch.testing.assert_close(after[rank], expected, atol=1e-6, rtol=0)
    # Bytes, from the ring all-reduce's cost: 2 (n - 1) / n payloads per rank for n ranks, per averaging round.
    payload = sum(p.numel() for p in make_layered_model().parameters()) * 4
    rounds = steps // (intra if nodes == 1 else inter)
    expected_mb = rounds * 2 * (world - 1) / world * payload / 1e6
    intra_mb = results[0][1]["comm/intra_node_mb_sent"]
    inter_mb = results[0][1]["comm/inter_node_mb_sent"]
    assert (intra_mb, inter_mb) == pytest.approx((expected_mb, 0.0) if nodes == 1 else (0.0, expected_mb))
