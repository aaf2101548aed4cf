"""The Fabric and plain-PyTorch examples run as documented (2 processes) and resume exactly from their checkpoints."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import torch
from dist_utils import run_ranks

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _torchrun(*args: str, cwd: Path) -> str:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    proc = subprocess.run([*command, *args], cwd=cwd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc.stdout


def _same_weights(a: Path, b: Path) -> None:
    first, second = torch.load(a, weights_only=True), torch.load(b, weights_only=True)
    assert first.keys() == second.keys()
    for key in first:
        assert torch.equal(first[key], second[key]), key


def test_the_plain_pytorch_example_under_torchrun_resumes_from_an_epoch_exactly(tmp_path):
    # Under DDP (its all-reduce replaced by the local-gradients hook); 22 batches per epoch and period 8, so the
    # epoch-0 checkpoint is mid-period.
    script = str(EXAMPLES / "plain_pytorch.py")
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    out = _torchrun(script, "--ddp", "--epochs", "2", "--out", str(whole), cwd=tmp_path)
    assert "epoch 1: test loss" in out and '"comm/rounds": 5.0' in out
    resumed.mkdir()
    for rank in range(2):
        shutil.copy(whole / f"epoch0.rank{rank}.pt", resumed)
    _torchrun(script, "--ddp", "--epochs", "2", "--out", str(resumed), "--resume-epoch", "0", cwd=tmp_path)
    _same_weights(whole / "final.pt", resumed / "final.pt")


def test_the_fabric_example_resumes_from_its_checkpoint_exactly(tmp_path):
    script = EXAMPLES / "fabric_train.py"
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    proc = run_ranks(script, whole, "--epochs", "2", "--strategy", "cocod_sgd")
    assert proc.returncode == 0, proc.stdout[-4000:]
    assert "epoch 1: test loss" in proc.stdout
    resumed.mkdir()
    shutil.copy(whole / "epoch0.ckpt", resumed)
    shutil.copytree(whole / "epoch0.ckpt.shards", resumed / "epoch0.ckpt.shards")
    proc = run_ranks(script, resumed, "--epochs", "2", "--strategy", "cocod_sgd", "--resume-epoch", "0")
    assert proc.returncode == 0, proc.stdout[-4000:]
    _same_weights(whole / "final.pt", resumed / "final.pt")
