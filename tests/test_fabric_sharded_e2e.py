"""Replica groups through Fabric: 4 ranks as 2 groups x 2 shards train what 2 unsharded ranks train, a checkpoint
mid-period resumes exactly, and its weights consolidate into one plain file (``tests/e2e/fabric_sharded_case.py``)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from dist_utils import run_ranks
from torch import nn

CASE = Path(__file__).parent / "e2e" / "fabric_sharded_case.py"


def run(out: Path, world: int, *args: str) -> dict:
    proc = run_ranks(CASE, out, *args, world=world, timeout=240)
    assert proc.returncode == 0, proc.stdout[-4000:]
    return torch.load(out / "result.pt", weights_only=False)


def test_fabric_replica_groups_train_like_unsharded_ranks_and_resume_exactly(tmp_path: Path) -> None:
    from lightning_localsgd import consolidate_checkpoint

    whole = run(tmp_path / "whole", 4, "--save-at", "4")  # VRL-SGD, period 3: rounds after steps 2, 5, 8
    plain = run(tmp_path / "plain", 2, "--shard-size", "1")
    for key in ("consensus", "final"):
        for name, value in whole[key].items():
            assert torch.allclose(value, plain[key][name], rtol=0, atol=1e-5), (key, name)
    assert all(torch.equal(whole["consensus"][n], whole["final"][n]) for n in whole["final"])

    resumed_dir = tmp_path / "resumed"
    resumed_dir.mkdir()
    for entry in (tmp_path / "whole").glob("checkpoint.ckpt*"):
        entry.rename(resumed_dir / entry.name)
    resumed = run(resumed_dir, 4, "--resume")
    for name, value in whole["final"].items():
        assert torch.equal(value, resumed["final"][name]), name

    consolidate_checkpoint(resumed_dir / "checkpoint.ckpt", tmp_path / "plain.ckpt")
    saved = torch.load(tmp_path / "plain.ckpt", weights_only=False)
    assert saved["step"] == 4 and "optimizer" not in saved
    import sys

    sys.path.insert(0, str(CASE.parent))
    from fabric_sharded_case import Net

    Net().load_state_dict(saved["model"])


def test_fabric_refuses_an_optimizer_set_up_with_the_module_it_shards() -> None:
    from lightning_localsgd.fabric import LocalSGDStrategy

    strategy = LocalSGDStrategy(shard_size=2)
    module = nn.Linear(2, 2)
    with pytest.raises(ValueError, match=r"Call `model = fabric.setup_module\(model\)`, then build the optimizer"):
        strategy.setup_module_and_optimizers(module, [torch.optim.SGD(module.parameters(), lr=0.1)])
