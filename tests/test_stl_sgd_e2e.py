"""STL-SGD in 2 real processes (CPU, gloo) through ``Trainer.fit``."""

from __future__ import annotations

from pathlib import Path

import torch
from dist_utils import run_ranks
from test_lightning_e2e import round_steps, run_case

# T1 = 4 steps, k1 = 2, periods x2: rounds after steps 2, 4 (stage 1), 8, 12 (stage 2), 20, ... (stage 3)
ARGS = ("--strategy", "stl_sgd", "--stage-steps", "4", "--period", "2", "--max-steps", "14", "--val-every", "5")


def test_stages_change_period_and_learning_rate_on_every_rank_and_resume_mid_stage_exactly(tmp_path):
    full = run_case(tmp_path / "full", *ARGS, "--ckpt-every", "6")
    steps = full[0]["steps"]
    assert [steps[i]["global_step"] for i in round_steps(steps)] == [2, 4, 8, 12]
    for i in round_steps(steps):  # replicas agree right after every round
        assert torch.equal(full[0]["steps"][i]["params"], full[1]["steps"][i]["params"])
    lrs = [s["lrs"][0] for s in steps]
    assert lrs[2] == 0.05 and lrs[3] == 0.025 and lrs[11] == 0.0125  # halved by the rounds ending stages 1 and 2
    assert [s["lrs"] for s in full[1]["steps"]] == [s["lrs"] for s in steps]
    ckpt = tmp_path / "full" / "ckpt" / "step=6.ckpt"  # stage 2, mid-period
    resumed = run_case(tmp_path / "resumed", *ARGS, "--resume", str(ckpt))
    for rank in range(2):
        for got, want in zip(resumed[rank]["steps"], full[rank]["steps"][6:], strict=True):
            torch.testing.assert_close(got["params"], want["params"], rtol=0, atol=0)
            assert got["lrs"] == want["lrs"]
    torch.testing.assert_close(full[0]["final"], full[1]["final"], rtol=0, atol=0)


def test_an_lr_scheduler_that_would_overwrite_the_stage_learning_rate_is_refused(tmp_path):
    script = Path(__file__).parent / "e2e" / "core_case.py"
    proc = run_ranks(script, tmp_path, "--strategy", "stl_sgd", "--two-groups")
    assert proc.returncode != 0
    assert "LR scheduler(s) ['StepLR']" in proc.stderr and "lr_decay=1.0" in proc.stderr


def test_a_second_fit_continues_at_the_current_stage_learning_rate(tmp_path):
    # T1 = 4, k1 = 2, periods x2, SGD's lr 0.05 halved by the round ending each stage: stage 1 ends after step 4,
    # stage 2 (8 steps, period 4) after step 12. The first fit stops after step 7, inside stage 2; the second
    # fit's fresh optimizers must go on at stage 2's 0.025, not configure_optimizers' 0.05.
    ranks = run_case(tmp_path, *ARGS[:-4], "--max-steps", "7", "--fit-again", "14")
    documented = [0.05] * 3 + [0.025] * 8 + [0.0125] * 3  # lr after each of the steps 1..14 (recorded at batch end)
    for rank in ranks:
        assert [s["global_step"] for s in rank["steps"]] == list(range(1, 15))
        assert [s["lrs"][0] for s in rank["steps"]] == documented
    torch.testing.assert_close(ranks[0]["final"], ranks[1]["final"], rtol=0, atol=0)
