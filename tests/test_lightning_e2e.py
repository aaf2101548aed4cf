"""Two real processes (CPU, gloo) through ``Trainer.fit``, as a user runs them."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from dist_utils import run_ranks

SCRIPT = Path(__file__).parent / "e2e" / "run_case.py"


def run_case(out: Path, *args: str) -> list[dict]:
    proc = run_ranks(SCRIPT, out, *args, warnings="ignore", timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


STRATEGIES = ["local_sgd", "vrl_sgd", "overlap_local_sgd", "cocod_sgd", "diloco"]
SYNCHRONISING = {"vrl_sgd", "local_sgd", "diloco"}  # replicas agree after a round (the overlapping ones never do)
LATE = {"overlap_local_sgd", "cocod_sgd"}  # a round's result, buffers included, is applied at the next round


@pytest.fixture(scope="module", params=STRATEGIES)
def fit_run(request, tmp_path_factory):
    """A 12-step run with period 4, validation every 5 steps and a checkpoint every 6 (both mid-period)."""
    out = tmp_path_factory.mktemp(request.param)
    args = ["--strategy", request.param, "--period", "4", "--val-every", "5", "--ckpt-every", "6", "--csv"]
    if request.param == "local_sgd":
        args.append("--rounds-end-periods")  # the same round steps as the others (default: torch's phase)
    return request.param, out, run_case(out, *args)


def round_steps(rank_steps: list[dict]) -> list[int]:
    """Indices of the steps that ended with a round (warm-up steps included)."""
    rounds = [s["rounds"] for s in rank_steps]
    return [i for i, r in enumerate(rounds) if r > (rounds[i - 1] if i else 0)]


def test_parameters_equal_on_all_ranks_right_after_a_round_and_not_before(fit_run):
    name, _, ranks = fit_run
    rounds = round_steps(ranks[0]["steps"])
    assert [ranks[0]["steps"][i]["global_step"] for i in rounds] == [4, 8, 12]
    for i, (mine, other) in enumerate(zip(ranks[0]["steps"], ranks[1]["steps"])):
        spread = (mine["params"] - other["params"]).abs().max().item()
        if name in SYNCHRONISING and i in rounds:
            assert mine["in_sync"] and spread == 0.0
        else:
            assert not mine["in_sync"] and spread > 1e-3
    assert ranks[0]["comm"]["rounds"] == 3


def test_float_buffers_are_averaged_at_each_round(fit_run):
    """At once where rounds apply at once; where they apply one round late the buffers travel with the transfer
    (``late_buffers.py``): b_i <- b_i + mean_j s_j - s_i, s being the buffers the previous round sent."""
    name, _, ranks = fit_run
    sent = None  # the first round has nothing to apply (CoCoD-SGD's set-up transfer sent equal buffers)
    for i in round_steps(ranks[0]["steps"]):
        before = [r["buffers_before_round"][i] for r in ranks]
        after = [r["steps"][i]["buffers"] for r in ranks]
        assert (before[0] - before[1]).abs().max() > 1e-3
        if name in LATE:
            for b, a, s in zip(before, after, sent or before):
                torch.testing.assert_close(a, b if sent is None else b + (sent[0] + sent[1]) / 2 - s)
            torch.testing.assert_close(after[0] + after[1], before[0] + before[1])  # the mean is kept
            sent = after
        else:
            for a in after:
                torch.testing.assert_close(a, (before[0] + before[1]) / 2)


def test_validation_sees_the_averaged_model_and_training_resumes_from_the_local_one(fit_run):
    _, _, ranks = fit_run
    assert [v["step"] for v in ranks[0]["val"]] == [5, 10]
    for v0, v1 in zip(ranks[0]["val"], ranks[1]["val"]):
        assert (v0["local"] - v1["local"]).abs().max() > 1e-3  # mid-period: replicas differ
        torch.testing.assert_close(v0["evaluated"], (v0["local"] + v1["local"]) / 2)
        torch.testing.assert_close(v1["evaluated"], v0["evaluated"])
    # After validation at step 5 each rank trains on from its own replica: at step 6 they still differ.
    assert (ranks[0]["steps"][5]["params"] - ranks[1]["steps"][5]["params"]).abs().max() > 1e-3


def test_checkpoint_weights_are_the_average_and_every_rank_state_is_stored(fit_run):
    name, out, ranks = fit_run
    ckpt = torch.load(out / "ckpt" / "step=6.ckpt", weights_only=False)
    weights = torch.cat(
        [
            ckpt["state_dict"][k].reshape(-1)
            for k in ["body.0.weight", "body.0.bias", "body.1.weight", "body.1.bias", "head.weight", "head.bias"]
        ]
    )
    local = [r["steps"][5]["params"] for r in ranks]
    torch.testing.assert_close(weights, (local[0] + local[1]) / 2)
    # The main file holds metadata only; each rank's state is in the shard that rank wrote beside it.
    section = ckpt["lightning_localsgd"]
    token = section["token"]
    assert section["world_size"] == 2
    assert section["shards"] == [f"step=6.ckpt.shards/rank{r}-of-2.{token}.pt" for r in range(2)]
    assert not _tensors_in(section)
    shards = [torch.load(out / "ckpt" / n, weights_only=False) for n in section["shards"]]
    for rank in range(2):
        assert (shards[rank]["rank"], shards[rank]["token"]) == (rank, token)
        saved = torch.cat(shards[rank]["algorithm"]["param_buckets"])  # mid-period: the replica is stored
        torch.testing.assert_close(saved, local[rank])
        assert set(shards[rank]["rng"]) >= {"torch", "python", "numpy"}
    # Rank 0's optimizer state is the main file's (written once); every other rank's is in its shard.
    assert shards[0]["optimizer_states"] is None
    momentum = [ckpt["optimizer_states"][0]["state"][0]["momentum_buffer"]]
    momentum.append(shards[1]["optimizer_states"][0]["state"][0]["momentum_buffer"])
    assert (momentum[0] - momentum[1]).abs().max() > 1e-4  # each rank's own optimizer state
    if name == "diloco":  # the global model and its outer momentum: the same on every rank, stored by rank 0
        assert shards[0]["algorithm"]["outer_optimizer"]["state"] and shards[0]["algorithm"]["global_params"]
        assert shards[1]["algorithm"]["shared_from_rank0"] == ["global_params", "outer_optimizer"]
        assert "global_params" not in shards[1]["algorithm"] and "outer_optimizer" not in shards[1]["algorithm"]
    if name == "vrl_sgd":
        deltas = [torch.cat(shards[r]["algorithm"]["delta"]) for r in range(2)]
        assert (deltas[0] + deltas[1]).abs().max() < 1e-5 and deltas[0].abs().max() > 1e-3
    # No state travelled to rank 0: the save's object collectives carried a token and a path, not tensors.
    steps = ranks[0]["steps"]
    assert steps[5]["object_bytes"] - steps[4]["object_bytes"] < 1000, steps[5]["object_bytes"]


def test_communication_metrics_reach_the_logger(fit_run):
    import csv

    _, out, ranks = fit_run
    with open(out / "logs" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    logged = [(int(r["step"]), float(r["comm/rounds"]), float(r["comm/mb_sent"])) for r in rows if r["comm/rounds"]]
    # Every 2 batches (log_every_n_steps=2) with Lightning's numbering for values logged in a batch (0-based: the
    # row of step 1 holds the values after batch 2), then once more at the end of training (step 12).
    assert [step for step, _, _ in logged][:5] == [1, 3, 5, 7, 9]
    assert [rounds for step, rounds, _ in logged if step in (1, 3, 7)] == [0.0, 1.0, 2.0]  # after batches 2, 4, 8
    assert logged[-1][0] == 12
    assert logged[-1][1] == ranks[0]["comm"]["rounds"] == 3
    assert logged[-1][2] == pytest.approx(ranks[0]["comm"]["bytes_sent"] / 1e6)
    assert "comm/seconds" in rows[-1]
    # Per-step exchange counters belong to gossip and compressed exchanges; none of these strategies has them.
    assert not any(name.startswith("comm/exchange") for name in rows[0])


def test_model_after_fit_is_the_average_on_every_rank(fit_run):
    _, _, ranks = fit_run
    torch.testing.assert_close(ranks[0]["final"], ranks[1]["final"], rtol=0, atol=0)
    last = [r["steps"][-1]["params"] for r in ranks]
    torch.testing.assert_close(ranks[0]["final"], (last[0] + last[1]) / 2)


@pytest.mark.parametrize(
    ("strategy", "optimizer"),
    [
        ("local_sgd", "sgd"),
        ("vrl_sgd", "sgd"),
        ("vrl_sgd", "adam"),
        ("overlap_local_sgd", "sgd"),
        ("cocod_sgd", "adam"),
        ("diloco", "adam"),
    ],
)
def test_resume_from_a_mid_period_checkpoint_matches_the_uninterrupted_run(tmp_path, strategy, optimizer):
    # period 4, checkpoint at step 6: mid-period, and for the overlapping strategies with a transfer in flight
    extra = ["--strategy", strategy, "--period", "4", "--optimizer", optimizer, "--max-steps", "10"]
    full = run_case(tmp_path / "full", *extra, "--ckpt-every", "6")
    ckpt = tmp_path / "full" / "ckpt" / "step=6.ckpt"
    resumed = run_case(tmp_path / "resumed", *extra, "--resume", str(ckpt))
    assert resumed[0]["steps"][0]["global_step"] == 7
    for rank in range(2):
        # The last step (10) is mid-period: the replicas differ, and each must match its uninterrupted twin.
        torch.testing.assert_close(resumed[rank]["steps"][-1]["params"], full[rank]["steps"][-1]["params"])
        torch.testing.assert_close(resumed[rank]["final"], full[rank]["final"])
        assert resumed[rank]["comm"]["rounds"] == full[rank]["comm"]["rounds"]
    assert (full[0]["steps"][-1]["params"] - full[1]["steps"][-1]["params"]).abs().max() > 1e-3


@pytest.mark.parametrize("strategy", ["local_sgd", "overlap_local_sgd"])
def test_no_collective_is_issued_on_a_local_step(tmp_path, strategy):
    ranks = run_case(tmp_path, "--strategy", strategy, "--period", "3", "--warmup", "2", "--max-steps", "11")
    steps = ranks[0]["steps"]
    rounds = round_steps(steps)
    for i in range(1, len(steps)):
        issued = steps[i]["collectives"] - steps[i - 1]["collectives"]
        if i in rounds:
            # warm-up: gradients + buffers + Lightning's SIGTERM flag; round: parameters + buffers + flag
            # (the overlapping strategy starts its parameter transfer at a round and waits for it at the next)
            assert issued == 3, steps[i]
        else:
            assert issued == 0, steps[i]
    if strategy == "local_sgd":  # warm-up steps 1-2, then torch's phase: rounds after local steps 1, 4, 7
        assert [steps[i]["global_step"] for i in rounds] == [1, 2, 3, 6, 9]
    else:  # warm-up steps 1-2, then every 3rd local step
        assert [steps[i]["global_step"] for i in rounds] == [1, 2, 5, 8, 11]


def test_one_count_per_batch_with_two_optimizers_in_manual_optimization(tmp_path):
    ranks = run_case(tmp_path, "--strategy", "local_sgd", "--period", "2", "--manual", "--max-steps", "12")
    steps = ranks[0]["steps"]
    # Lightning's global_step counts each optimizer's step (2 per batch); the algorithm counts batches.
    assert [s["algorithm_step"] for s in steps] == list(range(1, len(steps) + 1))
    assert steps[-1]["global_step"] == 2 * len(steps)


def test_one_count_per_optimizer_step_under_gradient_accumulation(tmp_path):
    ranks = run_case(tmp_path, "--strategy", "vrl_sgd", "--period", "2", "--accumulate", "3", "--max-steps", "4")
    steps = ranks[0]["steps"]
    assert len(steps) == 12  # 12 micro-batches
    assert [s["algorithm_step"] for s in steps] == [0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3, 4]
    assert [s["in_sync"] for s in steps[2::3]] == [False, True, False, True]


# ---------------------------------------------------------------------- per-rank checkpoint shards
def _tensors_in(payload) -> list:
    if isinstance(payload, torch.Tensor):
        return [payload]
    if isinstance(payload, dict):
        payload = list(payload.values())
    if isinstance(payload, (list, tuple)):
        return [t for item in payload for t in _tensors_in(item)]
    return []


def _run(out: Path, *args: str, devices: int = 2) -> tuple[str, list[dict]]:
    """As ``run_case``, with ``devices`` processes, warnings shown; returns stderr too."""
    proc = run_ranks(SCRIPT, out, "--devices", str(devices), *args, world=devices, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stderr, [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(devices)]


def _shards(main: Path) -> list[dict]:
    section = torch.load(main, weights_only=False)["lightning_localsgd"]
    return [torch.load(main.parent / name, weights_only=False) for name in section["shards"]]


# VRL-SGD with dropout, period 4 (rounds at steps 4 and 8), 4 batches per epoch, a checkpoint every 2 steps.
DROPOUT_ARGS = (
    "--strategy",
    "vrl_sgd",
    "--period",
    "4",
    "--max-steps",
    "10",
    "--dropout",
    "0.3",
    "--epoch-batches",
    "4",
)


@pytest.fixture(scope="module")
def dropout_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("dropout")
    return out, run_case(out / "full", *DROPOUT_ARGS, "--ckpt-every", "2")


def test_a_checkpoint_right_after_a_round_stores_no_replica(dropout_run):
    out, _ = dropout_run
    for step, after_round in ((4, True), (6, False), (8, True)):
        for shard in _shards(out / "full" / "ckpt" / f"step={step}.ckpt"):
            algorithm = shard["algorithm"]
            assert algorithm["in_sync"] is after_round
            # In sync, the replica is the main file's consensus weights: stored once, there.
            assert ("param_buckets" in algorithm) is ("float_buffers" in algorithm) is (not after_round)
            assert len(algorithm["delta"]) > 0  # VRL-SGD's own per-rank state is always kept


@pytest.mark.parametrize("step", [4, 6])  # 4: right after a round, at an epoch's end; 6: mid-period, mid-epoch
def test_resume_with_dropout_matches_the_uninterrupted_run_exactly(dropout_run, step):
    out, full = dropout_run
    resumed = run_case(
        out / f"resumed_{step}", *DROPOUT_ARGS, "--resume", str(out / "full" / "ckpt" / f"step={step}.ckpt")
    )
    assert resumed[0]["steps"][0]["global_step"] == step + 1
    for rank in range(2):
        # Each rank's dropout masks follow its own generator: the restored one, drawn from as without a stop.
        for got, want in zip(resumed[rank]["steps"], full[rank]["steps"][step:], strict=True):
            torch.testing.assert_close(got["params"], want["params"], rtol=0, atol=0)
        torch.testing.assert_close(resumed[rank]["final"], full[rank]["final"], rtol=0, atol=0)
    assert (full[0]["steps"][-1]["params"] - full[1]["steps"][-1]["params"]).abs().max() > 1e-3


def test_the_main_file_loads_into_the_module_in_a_plain_process(fit_run):
    import importlib.util

    _, out, ranks = fit_run
    spec = importlib.util.spec_from_file_location("run_case_module", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    model = module.Recorder.load_from_checkpoint(out / "ckpt" / "step=6.ckpt", optimizer="sgd")
    local = [r["steps"][5]["params"] for r in ranks]
    torch.testing.assert_close(module.flat(model), (local[0] + local[1]) / 2)


def test_resume_at_another_world_size_warns_and_trains_to_the_end(tmp_path):
    # Local SGD, period 4 (torch's phase: rounds after steps 1, 5, 9); 2 ranks checkpoint at steps 5 and 10.
    args = ("--strategy", "local_sgd", "--period", "4", "--max-steps", "10", "--ckpt-every", "5")
    _run(tmp_path / "n2", *args)
    main = tmp_path / "n2" / "ckpt" / "step=5.ckpt"
    assert all("param_buckets" not in shard["algorithm"] for shard in _shards(main))  # right after a round
    stderr, three = _run(tmp_path / "n3", *args, "--resume", str(main), devices=3)
    assert "written by 'LocalSGDStrategy' with 2 ranks; this run is 'LocalSGDStrategy' with 3" in stderr
    assert [r["steps"][0]["global_step"] for r in three] == [6, 6, 6]
    assert [r["steps"][-1]["global_step"] for r in three] == [10, 10, 10]
    for rank in range(3):
        torch.testing.assert_close(three[rank]["final"], three[0]["final"], rtol=0, atol=0)
    # The main file does not grow with the world size; there is one shard per rank.
    sizes = [(tmp_path / n / "ckpt" / "step=10.ckpt").stat().st_size for n in ("n2", "n3")]
    assert abs(sizes[1] - sizes[0]) < 400, sizes
    assert [s["rank"] for s in _shards(tmp_path / "n3" / "ckpt" / "step=10.ckpt")] == [0, 1, 2]
