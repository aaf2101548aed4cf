"""node_communicators checks the rank numbering against the cluster's node ranks before building per-node groups
(torch.distributed faked: 4 ranks as 2 nodes x 2, the node ranks gathered from a made-up cluster)."""

from __future__ import annotations

from datetime import timedelta

import pytest

from lightning_localsgd.comm import layout as layout_module
from lightning_localsgd.comm.layout import WorldLayout, node_communicators


@pytest.fixture
def fake_world(monkeypatch):
    """A world of 4 whose ranks report the node ranks in ``cluster`` (global rank -> node); records the groups."""
    cluster: list[int] = []
    groups: list[list[int]] = []

    def all_gather_object(out, value):
        out[:] = cluster

    def new_group(ranks, timeout):
        groups.append(list(ranks))
        return tuple(ranks)

    monkeypatch.setattr(layout_module.dist, "get_world_size", lambda: 4)
    monkeypatch.setattr(layout_module.dist, "all_gather_object", all_gather_object)
    monkeypatch.setattr(layout_module.dist, "new_group", new_group)
    monkeypatch.setattr(layout_module, "ProcessGroupCommunicator", lambda group, timeout: group)
    return cluster, groups


def test_a_cyclic_layout_is_refused_before_any_group_is_built(fake_world):
    cluster, groups = fake_world
    cluster[:] = [0, 1, 0, 1]  # SLURM --distribution=cyclic: rank r on node r % 2
    with pytest.raises(ValueError) as error:
        node_communicators(WorldLayout(2, 2, group_rank=1, node_rank=1), timedelta(seconds=5), "Hier")
    message = str(error.value)
    assert "Hier: the ranks are not numbered node by node (rank 1 on node 1, rank 2 on node 0;" in message
    assert "expected rank r on node r // 2" in message and "--distribution=block" in message
    assert groups == []  # no group spanning machines was created


def test_a_node_major_layout_builds_one_group_per_node_and_one_per_local_rank(fake_world):
    cluster, groups = fake_world
    cluster[:] = [0, 0, 1, 1]
    node, cross = node_communicators(WorldLayout(2, 2, group_rank=2, node_rank=1), timedelta(seconds=5), "Hier")
    assert groups == [[0, 1], [2, 3], [0, 2], [1, 3]]
    assert (node, cross) == ((2, 3), (0, 2))  # rank 2: node 1, local rank 0


def test_without_a_node_rank_the_numbering_is_taken_as_given(fake_world):
    cluster, groups = fake_world
    cluster[:] = [0, 1, 0, 1]  # never gathered: no cluster environment to compare with
    node_communicators(WorldLayout(2, 2, group_rank=0), timedelta(seconds=5), "Hier")
    assert groups[:2] == [[0, 1], [2, 3]]
