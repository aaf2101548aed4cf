"""DiLoCo with its overlapped outer step, in 2 real processes (CPU, gloo) through ``Trainer.fit`` (the blocking
DiLoCo runs in every test of test_lightning_e2e.py's fixture)."""

from __future__ import annotations

import torch
from test_lightning_e2e import run_case

ARGS = ("--strategy", "diloco", "--overlap", "--period", "4", "--max-steps", "10", "--val-every", "5")


def test_overlapped_diloco_evaluates_the_average_resumes_exactly_with_a_transfer_in_flight_and_ends_on_one_model(
    tmp_path,
):
    full = run_case(tmp_path / "full", *ARGS, "--ckpt-every", "6")
    for v0, v1 in zip(full[0]["val"], full[1]["val"]):
        torch.testing.assert_close(v0["evaluated"], (v0["local"] + v1["local"]) / 2)
    spreads = [(a["params"] - b["params"]).abs().max().item() for a, b in zip(full[0]["steps"], full[1]["steps"])]
    assert min(spreads) > 0  # each replica keeps its own progress, rounds included
    ckpt = tmp_path / "full" / "ckpt" / "step=6.ckpt"  # mid-period: round 2's transfer is in flight
    resumed = run_case(tmp_path / "resumed", *ARGS, "--resume", str(ckpt))
    for rank in range(2):
        for got, want in zip(resumed[rank]["steps"], full[rank]["steps"][6:], strict=True):
            torch.testing.assert_close(got["params"], want["params"], rtol=0, atol=0)
    torch.testing.assert_close(full[0]["final"], full[1]["final"], rtol=0, atol=0)
    torch.testing.assert_close(resumed[0]["final"], full[0]["final"], rtol=0, atol=0)
