"""The core's contract with the rest of a Lightning set-up, in 2 real processes (CPU, gloo) through ``Trainer.fit``:
weight-averaging callbacks, layers unfrozen mid-fit, frozen layers and masks, fp16 steps skipped on one rank,
and a second ``fit``."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch.callbacks
import pytest
import torch
from dist_utils import run_ranks

SCRIPT = Path(__file__).parent / "e2e" / "core_case.py"


def run_core(out: Path, *args: str, world: int = 2) -> tuple[str, list[dict]]:
    proc = run_ranks(SCRIPT, out, *args, world=world)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc.stderr, [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(world)]


@pytest.mark.skipif(
    not hasattr(lightning.pytorch.callbacks, "EMAWeightAveraging"), reason="EMAWeightAveraging: Lightning 2.6 and later"
)
def test_ema_callback_sees_the_consensus_and_frozen_layers_and_masks_agree_on_every_rank(tmp_path):
    _, ranks = run_core(tmp_path, "--strategy", "local_sgd", "--period", "3", "--ema", "--frozen-per-rank")
    torch.testing.assert_close(ranks[0]["final"], ranks[1]["final"], rtol=0, atol=0)
    for v0, v1 in zip(ranks[0]["val"], ranks[1]["val"]):  # validation evaluates the same (EMA) model on both
        torch.testing.assert_close(v0, v1, rtol=0, atol=0)
    assert ranks[0]["val"]


def test_swa_under_vrl_sgd_ends_fit_with_one_model(tmp_path):
    _, ranks = run_core(tmp_path, "--strategy", "vrl_sgd", "--period", "4", "--swa", "--epochs", "2")
    torch.testing.assert_close(ranks[0]["final"], ranks[1]["final"], rtol=0, atol=0)


def test_a_backbone_unfrozen_mid_fit_is_averaged(tmp_path):
    _, ranks = run_core(tmp_path, "--strategy", "cocod_sgd", "--period", "3", "--finetune", "--epochs", "2")
    torch.testing.assert_close(ranks[0]["final"], ranks[1]["final"], rtol=0, atol=0)
    for v0, v1 in zip(ranks[0]["val"], ranks[1]["val"]):
        torch.testing.assert_close(v0, v1, rtol=0, atol=0)
    assert (ranks[0]["val"][0][:96] - ranks[0]["final"][:96]).abs().max() > 1e-4  # the backbone did train


def test_vrl_delta_sums_to_zero_after_an_fp16_step_skipped_on_one_rank_and_a_second_fit_continues(tmp_path):
    _, ranks = run_core(tmp_path, "--strategy", "vrl_sgd", "--period", "4", "--overflow-at", "5", "--fit-twice")
    assert ranks[1]["scale"] < ranks[0]["scale"]  # rank 1's scaler skipped a step, rank 0's did not
    for key in ("delta_after_first_fit", "delta"):  # the skip was in the first fit; the second continues from it
        d0, d1 = ranks[0][key], ranks[1][key]
        assert d0.abs().max() > 1e-3
        torch.testing.assert_close(d0 + d1, torch.zeros_like(d0), atol=1e-5, rtol=0)
    assert ranks[0]["after_first_fit"] == {"step": 10, "rounds": 2}
    assert (ranks[0]["step"], ranks[0]["rounds"]) == (20, 5)  # the second fit went on from step 10, round 2


def test_three_ranks_two_lr_groups_and_a_per_step_scheduler_keep_vrl_delta_summing_to_zero(tmp_path):
    # 3 ranks: (a + b + c) / 3 is not exact in floating point, unlike the 2-rank mean
    args = ["--strategy", "vrl_sgd", "--period", "4", "--two-groups", "--devices", "3", "--batches", "12"]
    _, ranks = run_core(tmp_path, *args, world=3)
    deltas = [r["delta"] for r in ranks]
    assert deltas[0].abs().max() > 1e-3
    torch.testing.assert_close(sum(deltas), torch.zeros_like(deltas[0]), atol=1e-5, rtol=0)
    for other in ranks[1:]:
        torch.testing.assert_close(other["final"], ranks[0]["final"], rtol=0, atol=0)
    assert ranks[0]["rounds"] == 3


def test_overlap_with_two_lr_groups_and_a_per_step_scheduler_evaluates_one_model(tmp_path):
    args = ["--strategy", "overlap_local_sgd", "--period", "2", "--two-groups", "--epochs", "2", "--batches", "6"]
    _, ranks = run_core(tmp_path, *args)
    assert len(ranks[0]["val"]) == 2
    for v0, v1 in zip(ranks[0]["val"], ranks[1]["val"]):
        torch.testing.assert_close(v0, v1, rtol=0, atol=0)
    torch.testing.assert_close(ranks[0]["final"], ranks[1]["final"], rtol=0, atol=0)
    assert torch.isfinite(ranks[0]["final"]).all()
