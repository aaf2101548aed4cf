"""DropIT under a local-update strategy and an overlapping one: 2 real processes (CPU, gloo) through
``Trainer.fit`` (tests/e2e/dropit_case.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from dist_utils import run_ranks

SCRIPT = Path(__file__).parent / "e2e" / "dropit_case.py"
DENSE = ["Sequential", "Conv2d", "ReLU", "MaxPool2d", "Flatten", "Sequential", "Linear", "ReLU", "Linear"]
SPARSE = ["Sequential", "DropITConv2d", "ReLU", "MaxPool2d", "Flatten", "Sequential", "DropITLinear", "ReLU", "Linear"]


def run_case(out: Path, *args: str) -> list[dict]:
    proc = run_ranks(SCRIPT, out, *args, warnings="ignore", timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


@pytest.fixture(scope="module")
def dense_local_sgd(tmp_path_factory) -> list[dict]:
    return run_case(tmp_path_factory.mktemp("dense"), "--strategy", "local_sgd")


@pytest.mark.parametrize("strategy", ["local_sgd", "cocod_sgd"])
def test_dropit_trains_under_the_strategy_and_leaves_the_model_plain(strategy, tmp_path, dense_local_sgd):
    ranks = run_case(tmp_path, "--strategy", strategy, "--gamma", "0.9")
    dense = dense_local_sgd[0]
    for rank in ranks:
        assert rank["classes"] == [SPARSE] * 24  # every training step ran through the DropIT layers
        assert rank["classes_after"] == DENSE  # restored by the callback's teardown
        # What shrinks: the conv's input (16 x 64 floats) and the first linear layer's (16 x 128, the max-pool
        # keeps its input, not its output); the last layer is skipped, and its input is the ReLU's output anyway.
        shrunk = sum(n * 4 - round(0.1 * n) * 8 for n in (16 * 64, 16 * 128))
        assert set(rank["saved_bytes"]) == {dense["saved_bytes"][0] - shrunk}
        assert sum(rank["loss"][-6:]) < 0.5 * sum(rank["loss"][:6])  # it learns
        assert rank["rounds"] >= 5
    torch.testing.assert_close(ranks[0]["final"], ranks[1]["final"], rtol=0, atol=0)  # replicas agree after fit
    torch.testing.assert_close(ranks[0]["final"], (ranks[0]["params"][-1] + ranks[1]["params"][-1]) / 2)
    if strategy == "local_sgd":  # the same run without DropIT: same start, same data, other weights
        assert not torch.equal(ranks[0]["final"], dense["final"])
        assert dense["classes"] == [DENSE] * 24
