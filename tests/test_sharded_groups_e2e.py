"""Replica groups through ``Trainer.fit``: 4 processes as 2 groups x 2 shards against 2 unsharded processes.

The central claim: sharding inside a group changes memory and bytes, never the result. Each replica group of the
sharded run sees the same batches as one rank of the unsharded run (``tests/e2e/sharded_case.py``), so the
consensus after ``fit`` and what validation evaluated must agree to float rounding, and each rank's bytes across
groups must be its shard's share of the model's: the expected shard sizes come from FSDP2's documented layout
(``torch.chunk`` along dim 0), computed here independently.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from dist_utils import run_ranks

CASE = Path(__file__).parent / "e2e" / "sharded_case.py"
# The model of sharded_case.py: parameter shapes in order.
SHAPES = [(5, 6), (5,), (3, 5), (3,), (2, 3), (2,)]
SHARD_SIZE = 2


def shard_numel(shape: tuple[int, ...], k: int, shards: int) -> int:
    """Elements of shard ``k`` of a parameter: FSDP2 chunks dim 0 as ``torch.chunk`` does (the last ones may be short
    or empty)."""
    rows = shape[0]
    per = math.ceil(rows / shards)
    mine = max(0, min(rows, (k + 1) * per) - k * per)
    return mine * math.prod(shape[1:])


def run(out: Path, world: int, *args: str) -> dict:
    proc = run_ranks(CASE, out, *args, world=world, timeout=240)
    assert proc.returncode == 0, proc.stdout[-4000:]
    result = torch.load(out / "result.pt", weights_only=False)
    result["validated"] = [torch.load(out / f"validated{r}.pt", weights_only=False) for r in range(world)]
    return result


def assert_same_model(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float = 1e-5) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.allclose(a[name], b[name], rtol=0, atol=atol), (name, (a[name] - b[name]).abs().max())


CASES = {
    "local_sgd": ["--strategy", "local_sgd"],
    "local_sgd-adam": ["--strategy", "local_sgd", "--optimizer", "adam"],
    "vrl_sgd": ["--strategy", "vrl_sgd"],
    "diloco": ["--strategy", "diloco"],
    "diloco-overlap": ["--strategy", "diloco", "--overlap"],
    "overlap_local_sgd": ["--strategy", "overlap_local_sgd"],
    "cocod_sgd": ["--strategy", "cocod_sgd"],
    "stl_sgd": ["--strategy", "stl_sgd"],
    "local_sgd-activation_checkpointing": ["--strategy", "local_sgd", "--checkpoint-activations"],
    "diloco-sharded_in_configure_model": ["--strategy", "diloco", "--configure-model"],
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_sharded_groups_train_the_same_model_as_unsharded_ranks_with_a_shard_of_the_bytes(
    case: str, tmp_path: Path
) -> None:
    args = [*CASES[case], "--val-every", "6", "--validate-after"]
    sharded = run(tmp_path / "sharded", 4, *args, "--shard-size", str(SHARD_SIZE), "--shard-layers", "Linear")
    plain = run(tmp_path / "plain", 2, *args, "--shard-size", "1")

    assert_same_model(sharded["final"], plain["final"])
    # Validation evaluated the consensus: the same on every rank of both runs, at each validation (steps 6 and 12,
    # then `trainer.validate` after `fit`, which evaluates the model `fit` left).
    assert len(plain["validated"][0]) == 3
    assert_same_model(sharded["validated"][0][-1], sharded["final"], atol=0)
    for rank_validated in [*sharded["validated"], *plain["validated"]]:
        for seen, expected in zip(rank_validated, plain["validated"][0]):
            assert_same_model(seen, expected)

    # Bytes across groups: rank (g, k) sends shard k's share of the model, the same number T of model transfers
    # (rounds, set-up broadcast, final average) for both shards of a group, and nothing else (the guard's flags go
    # over the world, counted apart). Unsharded rank g sends T whole models plus its flags.
    full = sum(math.prod(s) for s in SHAPES)
    rounds = plain["sent"][0]["rounds"]
    assert rounds >= 2 and all(s["rounds"] == rounds for s in sharded["sent"])
    for group in range(2):
        transfers = set()
        for k in range(SHARD_SIZE):
            mine = sum(shard_numel(s, k, SHARD_SIZE) for s in SHAPES)
            sent = sharded["sent"][group * SHARD_SIZE + k]["bytes"]
            assert sent % (4 * mine) == 0, (group, k, sent, mine)
            transfers.add(sent // (4 * mine))
        assert len(transfers) == 1
        count = transfers.pop()
        assert count >= rounds
        assert plain["sent"][group]["bytes"] >= count * 4 * full

    # Activation checkpointing recomputes each forward in backward (12 batches, 3 validations).
    recomputed = "--checkpoint-activations" in args
    assert [s["forwards"] for s in sharded["sent"]] == [(24 if recomputed else 12) + 3] * 4

    # The logged split: across groups, the algorithm's bytes; inside a group, FSDP2's.
    for sent in sharded["sent"]:
        assert sent["metrics"]["comm/intra_group_mb"] == pytest.approx(12 * INTRA_BYTES_PER_BATCH / 1e6, rel=1e-6)
        assert sent["metrics"]["comm/inter_group_mb"] == pytest.approx(sent["bytes"] / 1e6, rel=1e-6)
    assert "comm/intra_group_mb" not in plain["sent"][0]["metrics"]


# FSDP2's traffic per rank and training batch for `--shard-layers Linear`: each Linear its own unit (gathered for
# forward and again for backward: inner units reshard after forward), `head` a root of its own (gathered once);
# gradients reduce-scattered; dim 0 padded to a multiple of 2; ring: (S - 1) / S of the padded float32 tensor.
PADDED = {"body.0": 3 * 2 * 6 + 3 * 2, "body.2": 2 * 2 * 5 + 2 * 2, "head": 1 * 2 * 3 + 1 * 2}


def intra_bytes_per_batch(gathered_bytes: int) -> int:
    return sum(n * (gathers * gathered_bytes + 4) for n, gathers in zip(PADDED.values(), (2, 2, 1))) // 2


INTRA_BYTES_PER_BATCH = intra_bytes_per_batch(4)


@pytest.mark.parametrize("dtype", [None, "bf16"])
def test_the_intra_group_bytes_logged_are_what_fsdp2_sent(dtype: str | None, tmp_path: Path) -> None:
    # Counted from the all-gathers and reduce-scatters FSDP2 called (sharded_case.py wraps them). In bf16 the
    # parameters travel in 2 bytes, gradients are reduce-scattered in float32, and the shards stay float32.
    args = ["--strategy", "diloco", "--shard-size", "2", "--shard-layers", "Linear"]
    sharded = run(tmp_path / "sharded", 4, *args, *(["--param-dtype", dtype] if dtype else []))
    for sent in sharded["sent"]:
        assert sent["fsdp_bytes"] == 12 * intra_bytes_per_batch(2 if dtype else 4)
        assert sent["metrics"]["comm/intra_group_mb"] == pytest.approx(sent["fsdp_bytes"] / 1e6, rel=1e-6)
    assert all(value.dtype == torch.float32 for value in sharded["final"].values())
    if dtype:  # computed in bf16: near the float32 unsharded run, not equal
        plain = run(tmp_path / "plain", 2, "--strategy", "diloco", "--shard-size", "1")
        assert_same_model(sharded["final"], plain["final"], atol=5e-3)


def test_the_example_yaml_trains_4_processes_and_its_checkpoint_loads_in_one(tmp_path: Path) -> None:
    pytest.importorskip("sklearn")  # the example's data ship with scikit-learn (a dev dependency)
    import subprocess
    import sys

    from lightning_localsgd import consolidate_checkpoint
    from lightning_localsgd.demos.digits import DigitsCNN

    examples = Path(__file__).parent.parent / "examples"
    command = [
        *(sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "4"),
        *(str(examples / "cli.py"), "fit", "--config", str(examples / "sharded_diloco.yaml")),
        *("--trainer.max_steps", "12", "--trainer.strategy.init_args.period", "5", "--trainer.logger", "false"),
        *("--trainer.enable_progress_bar", "false", f"--trainer.default_root_dir={tmp_path}"),
    ]
    proc = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (checkpoint,) = (tmp_path / "checkpoints").glob("*.ckpt")
    consolidate_checkpoint(checkpoint, tmp_path / "plain.ckpt")
    model = DigitsCNN.load_from_checkpoint(tmp_path / "plain.ckpt")
    assert sum(p.numel() for p in model.parameters()) > 10_000


def test_mid_period_resume_from_a_sharded_checkpoint_is_exact_and_its_weights_load_in_one_process(
    tmp_path: Path,
) -> None:
    from lightning_localsgd import consolidate_checkpoint

    args = ["--strategy", "vrl_sgd", "--optimizer", "adam", "--shard-size", "2", "--max-steps", "12"]
    whole = run(tmp_path / "whole", 4, *args, "--ckpt-every", "6", "--val-every", "6")
    checkpoint = tmp_path / "whole" / "ckpt" / "step=6.ckpt"  # rounds after steps 1, 5, 9: mid-period
    resumed = run(tmp_path / "resumed", 4, *args, "--resume", str(checkpoint))
    for name, value in whole["final"].items():
        assert torch.equal(value, resumed["final"][name]), name

    # Nothing gathered to rank 0: the main file holds no weights, each rank wrote its own part.
    main = torch.load(checkpoint, weights_only=False)
    assert main["state_dict"] == {}
    assert main["optimizer_states"] == []
    shards = checkpoint.parent / "step=6.ckpt.shards"
    assert len(list(shards.glob("rank*-of-4.*.pt"))) == 4

    # A fresh run evaluating the checkpoint (`trainer.validate(ckpt_path=...)`, no `fit`) evaluates that consensus.
    evaluated = tmp_path / "evaluated"
    proc = run_ranks(CASE, evaluated, *args, "--val-every", "6", "--validate-only", str(checkpoint), world=4)
    assert proc.returncode == 0, proc.stdout[-4000:]
    for r in range(4):
        (seen,) = torch.load(evaluated / f"validated{r}.pt", weights_only=False)
        assert_same_model(seen, whole["validated"][0][0], atol=0)

    # The consolidated weights are the consensus validation evaluated at step 6, and load into the plain module.
    consolidate_checkpoint(checkpoint, tmp_path / "plain.ckpt")
    plain = torch.load(tmp_path / "plain.ckpt", weights_only=False)
    assert_same_model(plain["state_dict"], whole["validated"][0][0], atol=0)
    import sys

    sys.path.insert(0, str(CASE.parent))
    from sharded_case import Net

    net = Net("sgd", 1)
    net.load_state_dict(plain["state_dict"])


def test_a_non_finite_shard_stops_every_rank_of_every_group_naming_its_group(tmp_path: Path) -> None:
    # Rank 3's shard turns NaN after step 6; FSDP2's next gather spreads it to rank 2's gradients (same group). The
    # round's flags go over the whole world, so rank 0 and 1 (whose shard group saw nothing) stop too, not hang.
    args = ["--strategy", "local_sgd", "--shard-size", "2", "--nan", "3", "6"]
    proc = run_ranks(CASE, tmp_path, *args, world=4, timeout=120)
    assert proc.returncode != 0
    logs = [(tmp_path / f"rank{r}.log").read_text() for r in range(4)]
    for log in logs:
        assert "NonFiniteError" in log and "ranks [2, 3] held inf/NaN parameters" in log, log[-2000:]


def test_a_world_that_shard_size_does_not_divide_is_refused_on_every_rank(tmp_path: Path) -> None:
    proc = run_ranks(CASE, tmp_path, "--strategy", "local_sgd", "--shard-size", "2", world=3, timeout=120)
    assert proc.returncode != 0
    for r in range(3):
        log = (tmp_path / f"rank{r}.log").read_text()
        assert "cannot be split into replica groups of shard_size=2" in log, log[-2000:]


def test_sigterm_on_one_rank_stops_every_rank_of_every_group_after_the_same_batch(tmp_path: Path) -> None:
    # Rank 3 alone gets SIGTERM in step 5; its request travels in the next round's flags (rounds after steps 1, 5,
    # 9), which go over the whole world: ranks 0 and 1, in no shard group with rank 3, stop after step 9 too.
    args = ["--strategy", "local_sgd", "--shard-size", "2", "--term", "3", "5", "--max-steps", "20"]
    proc = run_ranks(CASE, tmp_path, *args, world=4, timeout=120)
    assert proc.returncode == 0, proc.stdout[-4000:]
    stops = [torch.load(tmp_path / f"stopped{r}.pt")["stopped_after"] for r in range(4)]
    assert stops == [9, 9, 9, 9]


def test_a_second_fit_continues_the_sharded_run_as_the_unsharded_one(tmp_path: Path) -> None:
    args = ["--strategy", "vrl_sgd", "--max-steps", "6", "--second-fit", "6"]
    sharded = run(tmp_path / "sharded", 4, *args, "--shard-size", "2")
    plain = run(tmp_path / "plain", 2, *args, "--shard-size", "1")
    assert_same_model(sharded["final"], plain["final"])
    assert sharded["sent"][0]["rounds"] == plain["sent"][0]["rounds"] == 3  # rounds after steps 1, 5, 9
