"""Fabric and plain PyTorch (bare model or DistributedDataParallel) drive the same algorithm code as the Trainer.

Two real processes (gloo) train the simulated-worker tests' model on their data through each entry point; the
parameters after every step must match ``train_workers`` (simulated ranks driving the algorithm's moments directly),
a checkpoint saved mid-period must resume to the same run, and evaluation/the end of training see the average.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from dist_utils import run_ranks
from sim_utils import train_workers

from lightning_localsgd import apply_dropit

sys.path.insert(0, str(Path(__file__).parent / "e2e"))
from entry_case import STRATEGY_OPTIONS, make_algorithm

SCRIPT = Path(__file__).parent / "e2e" / "entry_case.py"
STEPS = 10


def run(out: Path, *args: str) -> list[dict]:
    proc = run_ranks(SCRIPT, out, *args)
    assert proc.returncode == 0, proc.stdout[-4000:]
    resumed = "--resume" in args
    return [torch.load(out / f"rank{r}{'-resumed' if resumed else ''}.pt", weights_only=False) for r in range(2)]


def reference(strategy: str, period: int, warmup: int = 0, dropit: float = 0.0) -> list:
    prepare = (lambda model: apply_dropit(model, dropit)) if dropit else None
    return train_workers(
        lambda: make_algorithm(strategy, period, warmup), 2, STEPS, dtype=torch.float64, prepare=prepare
    )


def check_against_reference(ranks: list[dict], ref: list, rounds: bool = True) -> None:
    for rank, got in enumerate(ranks):
        history, algorithm = ref[rank]
        assert len(got["history"]) == STEPS
        for step, params in enumerate(got["history"]):
            torch.testing.assert_close(params, history[step]["params"], rtol=0, atol=1e-12, msg=f"rank {rank}, {step}")
        if rounds:
            assert got["metrics"]["comm/rounds"] == algorithm.comm.stats.rounds
    mean = (ref[0][0][-1]["params"] + ref[1][0][-1]["params"]) / 2
    for got in ranks:
        torch.testing.assert_close(got["consensus"], mean, rtol=0, atol=1e-12)
        assert torch.equal(got["local_after_consensus"], got["history"][-1])  # each rank's own replica came back
        torch.testing.assert_close(got["final"], mean, rtol=0, atol=1e-12)
    assert torch.equal(ranks[0]["final"], ranks[1]["final"])


@pytest.mark.parametrize(
    ("entry", "strategy", "warmup", "closure"),
    [
        ("plain", "local_sgd", 0, False),
        ("plain", "vrl_sgd", 2, True),  # warm-up gradients averaged while the closure's backward runs
        ("ddp", "vrl_sgd", 2, False),  # warm-up steps: DDP's all-reduce is off, the algorithm averages the gradients
        ("ddp", "cocod_sgd", 0, False),
        ("plain", "liec_sgd", 0, False),
        ("plain", "detag", 0, False),
    ],
)
def test_the_optimizer_wrapper_runs_the_algorithm_exactly(entry, strategy, warmup, closure, tmp_path):
    args = ("--entry", entry, "--strategy", strategy, "--warmup", str(warmup), "--steps", str(STEPS))
    ranks = run(tmp_path, *args, *(["--closure"] if closure else []))
    check_against_reference(ranks, reference(strategy, 3, warmup))
    assert ranks[0]["metrics"]["comm/rounds"] > 0


# Every strategy through Fabric, against the simulated reference (hierarchical: its node groups need the real
# launcher's layout, so it is checked for agreement only).
@pytest.mark.parametrize("strategy", sorted(STRATEGY_OPTIONS))
def test_every_strategy_runs_through_fabric_as_the_algorithm_does(strategy, tmp_path):
    ranks = run(tmp_path, "--entry", "fabric", "--strategy", strategy, "--steps", str(STEPS))
    if strategy == "hierarchical_local_sgd":
        assert torch.equal(ranks[0]["final"], ranks[1]["final"])
        assert ranks[0]["metrics"]["comm/rounds"] == STEPS // 3
        return
    check_against_reference(ranks, reference(strategy, 3))


def test_fabric_takes_a_strategy_by_name_with_its_defaults(tmp_path):
    from lightning_localsgd import LocalSGDStrategy

    ranks = run(tmp_path, "--entry", "fabric", "--strategy", "local_sgd", "--by-name", "--steps", "4")
    default = LocalSGDStrategy().algorithm  # period 8, its first period one step long
    assert ranks[0]["metrics"]["comm/rounds"] == sum(default.is_round_after(step) for step in range(4)) == 1
    assert not torch.equal(ranks[0]["history"][-1], ranks[1]["history"][-1])  # local steps: the replicas differ
    assert torch.equal(ranks[0]["final"], ranks[1]["final"])


@pytest.mark.parametrize(("entry", "strategy"), [("fabric", "overlap_local_sgd"), ("plain", "local_sgd")])
def test_dropit_layers_train_through_fabric_and_plain_pytorch_as_in_the_simulation(entry, strategy, tmp_path):
    # gamma 0.5 on the 8-wide layers: the weight gradients differ from the dense run's, and must still match the
    # simulated workers with the same DropIT layers step by step.
    ranks = run(tmp_path, "--entry", entry, "--strategy", strategy, "--steps", str(STEPS), "--dropit", "0.5")
    check_against_reference(ranks, reference(strategy, 3, dropit=0.5))
    dense = reference(strategy, 3)
    assert not torch.allclose(ranks[0]["history"][-1], dense[0][0][-1]["params"])


@pytest.mark.parametrize(("entry", "strategy"), [("fabric", "vrl_sgd"), ("plain", "cocod_sgd"), ("ddp", "vrl_sgd")])
def test_a_checkpoint_saved_mid_period_resumes_exactly(entry, strategy, tmp_path):
    # Period 3, saved after step 4 (one step into a period; CoCoD-SGD's transfer in flight): the resumed run's
    # every step equals the uninterrupted run's, bit for bit.
    args = ("--entry", entry, "--strategy", strategy, "--steps", str(STEPS), "--save-at", "4")
    whole = run(tmp_path, *args)
    resumed = run(tmp_path, *args, "--resume")
    for rank in range(2):
        assert resumed[rank]["first"] == 5
        for got, want in zip(resumed[rank]["history"], whole[rank]["history"][5:]):
            assert torch.equal(got, want)
        assert torch.equal(resumed[rank]["final"], whole[rank]["final"])
        assert resumed[rank]["metrics"]["comm/rounds"] == whole[rank]["metrics"]["comm/rounds"]
    if entry == "fabric":  # one main file with the average, one shard per rank beside it
        shards = sorted(p.name.split(".")[0] for p in (tmp_path / "checkpoint.pt.shards").iterdir())
        assert shards == ["rank0-of-2", "rank1-of-2"]
