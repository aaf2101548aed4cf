"""A parameter no rank uses, and ``toggle_optimizer``, with two real processes (CPU, gloo) through ``Trainer.fit``."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from dist_utils import run_ranks

SCRIPT = Path(__file__).parent / "e2e" / "unused_case.py"


def run_case(out: Path, *args: str) -> list[dict]:
    proc = run_ranks(SCRIPT, out, *args, warnings="ignore", timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])  # SGD with momentum and weight decay; Adam with weight decay
@pytest.mark.parametrize("strategy", ["ef_sign", "liec_sgd", "dpsgd", "detag"])
def test_a_parameter_no_rank_uses_stays_untouched_and_the_others_train_as_without_it(tmp_path, strategy, optimizer):
    with_extra = run_case(tmp_path / "extra", "--strategy", strategy, "--optimizer", optimizer, "--extra")
    # Against the run without the parameter (the same steps, bit for bit) under SGD only, to keep the test short;
    # the simulated tests compare both optimizers.
    if optimizer == "sgd":
        reference = run_case(tmp_path / "reference", "--strategy", strategy, "--optimizer", optimizer)
        for mine, ref in zip(with_extra, reference):
            assert all(torch.equal(a, b) for a, b in zip(mine["used"], ref["used"]))
    for mine in with_extra:
        assert len(mine["used"]) == 8
        assert all(torch.equal(e, mine["extra"][0]) for e in mine["extra"])
        assert mine["grad_none"] == [True] * 8  # weight decay and momentum never saw it
        for key, value in mine["state"].items():
            assert torch.equal(value, torch.zeros_like(value)), key
    start = torch.randn(5, generator=torch.Generator().manual_seed(1)) + 2
    assert torch.equal(with_extra[0]["extra"][-1], start) and torch.equal(with_extra[1]["extra"][-1], start)
    assert (with_extra[0]["used"][-1] - with_extra[0]["used"][0]).abs().max() > 1e-3


@pytest.mark.parametrize("strategy", ["ef_sign", "liec_sgd"])
def test_toggle_optimizer_keeps_the_error_buffers_and_the_buckets(tmp_path, strategy):
    toggled = run_case(tmp_path / "toggled", "--strategy", strategy, "--gan")
    plain = run_case(tmp_path / "plain", "--strategy", strategy, "--gan", "--no-toggle")
    for mine, ref in zip(toggled, plain):
        assert len(mine["params"]) == 8
        assert mine["rebucketings"] == [0] * 8
        assert mine["managed"] == [4] * 8  # both parts managed at every step's end
        assert all(torch.equal(a, b) for a, b in zip(mine["params"], ref["params"]))
        assert all(torch.equal(a, b) for a, b in zip(mine["errors"], ref["errors"]))
        assert mine["errors"][-1][:42].abs().max() > 0  # the generator's error, kept through the discriminator's step
