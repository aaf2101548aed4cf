"""Every row of the lab's table can build its strategy (a bad option would only fail an hour into `make bench`)."""

from __future__ import annotations

import pytest
from lightning.pytorch.strategies import StrategyRegistry

from benchmarks.peers import runnable_peers


@pytest.mark.parametrize("peer", [p for p in runnable_peers() if p.ours], ids=lambda p: p.label)
def test_each_lab_row_of_ours_builds_its_strategy(peer):
    strategy = StrategyRegistry[peer.strategy]["strategy"](**peer.options)
    assert strategy.algorithm is not None
