"""Faults in 2 real processes (CPU, gloo) through ``Trainer.fit``: each ends in a clear error or a clean run.

Uneven data, NaN on one rank (raise or roll back), a stuck peer, a dead peer, fp16 steps the grad scaler skips.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from dist_utils import run_ranks

SCRIPT = Path(__file__).parent / "e2e" / "fault_case.py"


def run_fault(out: Path, *args: str, expect_ok: bool = True) -> tuple[subprocess.CompletedProcess, list[dict]]:
    proc = run_ranks(SCRIPT, out, *args)
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


@pytest.mark.parametrize(
    ("strategy", "rank_0_at"),
    [
        ("local_sgd", "round at step 36"),
        ("cocod_sgd", "round at step 35"),
        # The compressed strategies' flags travel in frames with a step's first payload: rank 1's final average sends
        # a frame of the same size, padded, so gloo pairs them instead of aborting on a size mismatch.
        ("ef_sign", "gradient exchange at step 34"),
        ("liec_sgd", "gradient exchange at step 34"),
    ],
)
def test_unsized_data_that_runs_out_on_one_rank_ends_in_a_clear_error_not_a_hang(strategy, rank_0_at, tmp_path):
    # CoCoD-SGD's round flags travel in the background: rank 1's final average pairs with them all the same, and
    # both ranks name both positions (rank 0 when it next reads the round's flags).
    args = ("--uneven", "3", "--iterable", "--epochs", "2", "--strategy", strategy)
    proc, ranks = run_fault(tmp_path, *args, expect_ok=False)
    assert ranks == []
    expected = f"rank 0: {rank_0_at}; rank 1: final average at step 34"
    assert proc.stderr.count(expected) == 2, proc.stderr[-3000:]  # on both ranks


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
    for name in state["lightning_localsgd"]["shards"]:  # each rank's own state, in the shard it wrote
        rank_state = torch.load(checkpoints[0].parent / name, weights_only=False)
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


def _start_slurm_ranks(out: Path, restart_count: int | None, port: int, *args: str) -> list[subprocess.Popen]:
    """Start both ranks as ``srun`` would: SLURM's variables, one task per rank, a recording ``scontrol``."""
    bin_dir = out / "bin"
    bin_dir.mkdir(parents=True, exist_ok=True)
    scontrol = bin_dir / "scontrol"
    scontrol.write_text(f'#!/bin/sh\necho "$@" >> {out / "scontrol_calls.txt"}\n')
    scontrol.chmod(0o755)
    procs = []
    for rank in range(2):
        env = {
            **os.environ,
            "PATH": f"{bin_dir}:{os.environ['PATH']}",
            "SLURM_JOB_ID": "4242",
            "SLURM_JOB_NAME": "train",
            "SLURM_NTASKS": "2",
            "SLURM_NTASKS_PER_NODE": "2",
            "SLURM_NNODES": "1",
            "SLURM_NODEID": "0",
            "SLURM_PROCID": str(rank),
            "SLURM_LOCALID": str(rank),
            "SLURM_NODELIST": "127.0.0.1",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
        }
        if restart_count is not None:
            env["SLURM_RESTART_COUNT"] = str(restart_count)
        log = open(out / f"slurm_rank{rank}_{restart_count}.log", "w")  # noqa: SIM115 - closed with the process
        procs.append(
            subprocess.Popen(
                [sys.executable, str(SCRIPT), "--out", str(out), *args], cwd=out, env=env, stdout=log, stderr=log
            )
        )
    return procs


def test_slurm_requeue_signal_checkpoints_every_rank_at_the_same_step_and_the_requeued_job_resumes_exactly(tmp_path):
    from dist_utils import free_port

    # Rank 0 gets the signal at step 5, rank 1 at step 7 (srun delivers it to each task at its own moment).
    args = ("--strategy", "vrl_sgd", "--period", "4", "--usr1-at", "5,7", "--batches", "24")
    for restart in (None, 1):  # the first run, then the requeued one
        for stale in tmp_path.glob("rank*.pt"):
            stale.unlink()
        procs = _start_slurm_ranks(tmp_path, restart, free_port(), *args)
        codes = [proc.wait(timeout=300) for proc in procs]
        logs = "".join(p.read_text()[-3000:] for p in sorted(tmp_path.glob("slurm_rank*.log")))
        assert codes == [0, 0], logs  # an abort at interpreter exit fails it too (comm/exit_drain.py)
        if restart is None:
            first_final = torch.load(tmp_path / "rank0.pt", weights_only=False)["final"]
            hpc = torch.load(tmp_path / "hpc_ckpt_1.ckpt", weights_only=False)
            shards = [torch.load(tmp_path / n, weights_only=False) for n in hpc["lightning_localsgd"]["shards"]]
            rank_steps = [r["algorithm"]["step"] for r in shards]
            assert rank_steps == [hpc["global_step"]] * 2 == [8, 8]  # the round after both signals, on both ranks
            assert (tmp_path / "scontrol_calls.txt").read_text().split() == ["requeue", "4242"]  # rank 0 only
    resumed = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    assert resumed[0]["steps"][0]["global_step"] == 9  # resumed after step 8, not from scratch
    torch.testing.assert_close(resumed[0]["final"], first_final)
    torch.testing.assert_close(resumed[1]["final"], first_final)


def _torchrun(out: Path, *args: str) -> str:
    out.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "--max-restarts=1"]
    proc = subprocess.run(
        [*command, str(SCRIPT), "--out", str(out), *args], cwd=out, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc.stderr


# One strategy by default (the restart mechanics are the strategy's base class; exact resumes with a transfer in
# flight are tested without torchrun in test_lightning_e2e.py); `-m slow` runs the other three.
@pytest.mark.parametrize(
    "strategy",
    [
        pytest.param("local_sgd", marks=pytest.mark.slow),
        "vrl_sgd",
        pytest.param("overlap_local_sgd", marks=pytest.mark.slow),
        pytest.param("cocod_sgd", marks=pytest.mark.slow),
    ],
)
def test_torchrun_restarts_after_a_rank_is_killed_and_ends_where_the_uninterrupted_run_ends(strategy, tmp_path):
    # Shuffled data whose order matters, 2 epochs, a checkpoint every 2 rounds; rank 1 is SIGKILLed at step 30
    # (mid-epoch, mid-period). torchrun restarts both ranks, which resume from the newest complete checkpoint.
    args = ("--strategy", strategy, "--distinct", "--epochs", "2", "--batches", "24", "--round-ckpt", "2")
    _torchrun(tmp_path / "uninterrupted", *args)
    _torchrun(tmp_path / "killed", *args, "--kill-at", "30")
    want = torch.load(tmp_path / "uninterrupted" / "rank0.pt", weights_only=False)
    for rank in range(2):
        got = torch.load(tmp_path / "killed" / f"rank{rank}.pt", weights_only=False)
        assert got["torchrun_attempt"] == "1"  # written by the restarted attempt
        assert got["steps"][0]["global_step"] > 1  # which resumed; it did not start over
        torch.testing.assert_close(got["final"], want["final"], rtol=0, atol=1e-6)


@pytest.mark.parametrize(("strategy", "stop_after"), [("local_sgd", 9), ("cocod_sgd", 12)])
def test_sigterm_on_one_rank_stops_every_rank_after_the_same_batch_without_a_per_step_collective(
    strategy, stop_after, tmp_path
):
    # Rank 1 alone gets SIGTERM at step 5; the flag reaches rank 0 in the next round's collective (after step
    # 8 with Local SGD's phase), and Lightning stops both ranks gracefully after that batch. CoCoD-SGD's rounds
    # (after steps 4, 8, 12) carry their flags in the background: sent with round 8, acted on at round 12, one
    # round later.
    _, ranks = run_fault(tmp_path, "--term-at", "5", "--period", "4", "--strategy", strategy)
    assert [r.get("stopped") for r in ranks] == [True, True]
    assert [r["steps"][-1]["global_step"] for r in ranks] == [stop_after, stop_after]
    assert torch.equal(ranks[0]["final"], ranks[1]["final"])
