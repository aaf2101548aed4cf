"""Faults in 2 real processes (CPU, gloo) through ``Trainer.fit``: each ends in a clear error or a clean run.

Uneven data, NaN on one rank (raise or roll back), a stuck peer, a dead peer, fp16 steps the grad scaler skips.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import torch

SCRIPT = Path(__file__).parent / "e2e" / "fault_case.py"


def run_fault(out: Path, *args: str, expect_ok: bool = True) -> tuple[subprocess.CompletedProcess, list[dict]]:
    out.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--out", str(out), *args],
        cwd=out,
        env={**os.environ, "PYTHONWARNINGS": "default"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    log = proc.stdout[-4000:] + proc.stderr[-6000:]
    assert (proc.returncode == 0) == expect_ok, log
    ranks = [torch.load(p, weights_only=False) for p in sorted(out.glob("rank*.pt"))]
    return proc, ranks


def test_a_rank_with_fewer_batches_makes_every_rank_run_the_same_number_with_a_warning(tmp_path):
    proc, ranks = run_fault(tmp_path, "--uneven", "3", "--epochs", "2", "--period", "4")
    assert "different numbers of training batches per epoch ([20, 17], by rank)" in proc.stderr
    assert "rank 0: 3" in proc.stderr
    assert [len(r["steps"]) for r in ranks] == [34, 34]  # 17 per epoch on both ranks
    assert torch.equal(ranks[0]["final"], ranks[1]["final"])


def test_nan_on_one_rank_stops_every_rank_naming_rank_and_step_and_checkpoints_stay_clean(tmp_path):
    # Rank 1's loss turns NaN at step 6; the checkpoint at step 8 needs the consensus, which refuses.
    proc, ranks = run_fault(tmp_path, "--nan-at", "6", "--ckpt-every", "4", expect_ok=False)
    assert ranks == []
    assert "NonFiniteError" in proc.stderr and "rank 1 held inf/NaN parameters" in proc.stderr
    assert "(step 8)" in proc.stderr
    checkpoints = sorted((tmp_path / "ckpt").glob("*.ckpt"))
    assert [p.name for p in checkpoints] == ["step=4.ckpt"]
    state = torch.load(checkpoints[0], weights_only=False)
    assert all(torch.isfinite(t).all() for t in state["state_dict"].values())
    for rank_state in state["lightning_localsgd"]["ranks"]:
        assert all(torch.isfinite(t).all() for t in rank_state["algorithm"]["param_buckets"])


def test_skip_round_rolls_back_and_the_run_finishes_with_a_finite_consensus(tmp_path):
    proc, ranks = run_fault(tmp_path, "--nan-at", "6", "--on-nonfinite", "skip_round", "--strategy", "vrl_sgd")
    assert "every rank went back to its state at the last good round" in proc.stderr
    assert [r["rolled_back"] for r in ranks] == [1, 1]
    assert torch.isfinite(ranks[0]["final"]).all() and torch.equal(ranks[0]["final"], ranks[1]["final"])


def _seconds_waited(stderr: str) -> float:
    match = re.search(r"PeerFailureError: (\S+) \(\S+\): a collective at round \d+ failed after ([\d.]+) s", stderr)
    assert match, stderr[-3000:]
    return float(match.group(2))


def test_a_stuck_peer_becomes_an_error_within_the_collective_timeout(tmp_path):
    proc, _ = run_fault(tmp_path, "--stall-at", "6", "--collective-timeout", "15", expect_ok=False)
    waited = _seconds_waited(proc.stderr)
    assert 10.0 <= waited <= 15.0 + 10.0, waited  # gloo's timer, plus scheduling on a busy machine
    assert "collectives wait at most 15 s" in proc.stderr


def test_a_dead_peer_becomes_an_error_at_once(tmp_path):
    proc, _ = run_fault(tmp_path, "--kill-at", "6", "--collective-timeout", "120", expect_ok=False)
    assert _seconds_waited(proc.stderr) < 60.0  # the connection reset is seen, not the timeout
    assert "LocalSGDStrategy (LocalSGD): a collective at round" in proc.stderr


def test_fp16_steps_the_grad_scaler_skips_are_not_counted_as_warmup_steps(tmp_path):
    _, ranks = run_fault(tmp_path, "--fp16-init-scale", str(2.0**24), "--warmup", "6", "--period", "4")
    for steps in ranks:
        scales = [s["scale"] for s in steps["steps"]]
        skipped = [i for i in range(len(scales)) if scales[i] < (scales[i - 1] if i else 2.0**24)]
        assert skipped, "the scaler never skipped: the test would prove nothing"
        warmup_end = next(i for i, s in enumerate(steps["steps"]) if s["algorithm_step"] == 6)
        skipped_in_warmup = [i for i in skipped if i <= warmup_end]
        assert warmup_end + 1 - len(skipped_in_warmup) == 6
    assert torch.equal(ranks[0]["final"], ranks[1]["final"])
