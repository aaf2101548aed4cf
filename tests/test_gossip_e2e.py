"""D-PSGD and DeTAG with 2 and 4 real processes (CPU, gloo) through ``Trainer.fit``."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
from dist_utils import run_ranks

SCRIPT = Path(__file__).parent / "e2e" / "run_case.py"
PARAM_KEYS = ["body.0.weight", "body.0.bias", "body.1.weight", "body.1.bias", "head.weight", "head.bias"]
NUMEL = 6 * 16 + 16 + 16 + 16 + 16 + 1  # run_case's Recorder
BUFFER_NUMEL = 16 + 16  # its BatchNorm's running mean and variance, gossiped with the parameters
# Guard checks after steps 4, 8 and 12; validation after steps 5 and 10; checkpoints after steps 6 and 12.
ARGS = ("--period", "4", "--val-every", "5", "--ckpt-every", "6", "--csv")
# Steps whose record (taken at the end of the batch) follows a world collective: the checks (4, 8, 12), the
# checkpoints' consensus (6, 12, saved before the record) and validation's (after 5 and 10: seen at 6 and 11).
WORLD_COLLECTIVE_STEPS = {4, 6, 8, 11, 12}


def run_gossip(out: Path, strategy: str, world: int, *args: str) -> list[dict]:
    proc = run_ranks(SCRIPT, out, "--strategy", strategy, "--devices", str(world), *args, world=world, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(world)]


def mean_of(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack(tensors).mean(0)


@pytest.fixture(scope="module", params=[("dpsgd", 2), ("detag", 2), ("dpsgd", 4), ("detag", 4)], ids=str)
def gossip_run(request, tmp_path_factory):
    strategy, world = request.param
    out = tmp_path_factory.mktemp(f"{strategy}{world}")
    extra = ("--gossip-rounds", "2") if strategy == "detag" else ()
    return strategy, world, out, extra, run_gossip(out / "full", strategy, world, *ARGS, *extra)


def test_every_step_gossips_with_the_neighbours_and_no_world_collective_runs_between_checks(gossip_run):
    strategy, world, _, _, ranks = gossip_run
    for rank_record in ranks:
        steps = rank_record["steps"]
        assert [s["exchanges"] for s in steps] == list(range(1, 13))
        for i in range(1, len(steps)):
            grew = steps[i]["collectives"] > steps[i - 1]["collectives"]
            assert grew == (steps[i]["global_step"] in WORLD_COLLECTIVE_STEPS), steps[i]["global_step"]
        assert rank_record["comm"]["rounds"] == 3  # the guard's checks, nothing averaged there
    neighbours = 1 if world == 2 else 2  # a ring: with 2 ranks both neighbours are the other rank
    rounds = 2 if strategy == "detag" else 1
    vectors = 2 if strategy == "detag" else 1  # DeTAG sends its tracker with the replica
    per_message = (vectors * NUMEL + BUFFER_NUMEL + 3) * 4
    assert ranks[0]["comm"]["exchange_bytes_sent"] == 12 * neighbours * rounds * per_message


def test_replicas_never_agree_yet_stay_close(gossip_run):
    ranks = gossip_run[-1]
    for step in range(12):
        params = [r["steps"][step]["params"] for r in ranks]
        spread = max((p - mean_of(params)).abs().max().item() for p in params)
        assert 0 < spread < 0.5
        assert not ranks[0]["steps"][step]["in_sync"]


def test_validation_checkpoints_and_the_model_after_fit_hold_the_consensus(gossip_run):
    strategy, world, out, _, ranks = gossip_run
    for vals in zip(*(r["val"] for r in ranks)):
        locals_ = [v["local"] for v in vals]
        assert (locals_[0] - locals_[1]).abs().max() > 1e-5
        for v in vals:
            torch.testing.assert_close(v["evaluated"], mean_of(locals_))
    # after validation at step 5 each rank trains on from its own replica
    assert (ranks[0]["steps"][5]["params"] - ranks[1]["steps"][5]["params"]).abs().max() > 1e-5
    ckpt = torch.load(out / "full" / "ckpt" / "step=6.ckpt", weights_only=False)
    weights = torch.cat([ckpt["state_dict"][k].reshape(-1) for k in PARAM_KEYS])
    torch.testing.assert_close(weights, mean_of([r["steps"][5]["params"] for r in ranks]))
    section = ckpt["lightning_localsgd"]
    shards = [torch.load(out / "full" / "ckpt" / name, weights_only=False) for name in section["shards"]]
    assert len(shards) == world
    for rank, shard in enumerate(shards):
        torch.testing.assert_close(torch.cat(shard["algorithm"]["param_buckets"]), ranks[rank]["steps"][5]["params"])
    if strategy == "detag":
        trackers = [torch.cat(s["algorithm"]["tracker"]) for s in shards]
        assert (trackers[0] - trackers[1]).abs().max() > 0  # each rank's own tracker is stored
    for r in ranks[1:]:
        torch.testing.assert_close(r["final"], ranks[0]["final"], rtol=0, atol=0)
    torch.testing.assert_close(ranks[0]["final"], mean_of([r["steps"][-1]["params"] for r in ranks]))


def test_gossip_metrics_and_the_consensus_distance_reach_the_logger(gossip_run):
    _, _, out, _, ranks = gossip_run
    with open(out / "full" / "logs" / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("comm/exchanges")]
    assert float(rows[-1]["comm/exchanges"]) == ranks[0]["comm"]["exchanges"] == 12
    assert float(rows[-1]["comm/exchange_mb_sent"]) == pytest.approx(ranks[0]["comm"]["exchange_bytes_sent"] / 1e6)
    distances = [float(r["comm/consensus_distance"]) for r in rows if r.get("comm/consensus_distance")]
    assert distances and all(d > 0 for d in distances[:-1])  # measured at each consensus (the last: the final one)


def test_resume_from_a_mid_run_checkpoint_matches_the_uninterrupted_run(gossip_run):
    strategy, world, out, extra, full = gossip_run
    ckpt = out / "full" / "ckpt" / "step=6.ckpt"
    resumed = run_gossip(out / "resumed", strategy, world, *ARGS, *extra, "--resume", str(ckpt))
    assert resumed[0]["steps"][0]["global_step"] == 7
    for rank in range(world):
        for got, want in zip(resumed[rank]["steps"], full[rank]["steps"][6:], strict=True):
            torch.testing.assert_close(got["params"], want["params"], rtol=0, atol=0)
        torch.testing.assert_close(resumed[rank]["final"], full[rank]["final"], rtol=0, atol=0)


def test_detag_with_its_defaults_trains_on_8_ranks(tmp_path):
    ranks = run_gossip(tmp_path, "detag", 8, "--period", "50", "--max-steps", "6")
    assert all(torch.isfinite(r["final"]).all() for r in ranks)
    for r in ranks[1:]:
        torch.testing.assert_close(r["final"], ranks[0]["final"], rtol=0, atol=0)
    assert ranks[0]["comm"]["exchanges"] == 6 and ranks[0]["comm"]["rounds"] == 0


# ---------------------------------------------------------------------------------------------- faults
FAULT_SCRIPT = Path(__file__).parent / "e2e" / "fault_case.py"


def run_fault(out: Path, *args: str, world: int = 2, expect_ok: bool = True):
    proc = run_ranks(FAULT_SCRIPT, out, *args, world=world, timeout=240)
    assert (proc.returncode == 0) == expect_ok, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc, [torch.load(p, weights_only=False) for p in sorted(out.glob("rank*.pt"))]


@pytest.mark.parametrize("strategy", ["dpsgd", "detag"])
def test_nan_on_one_rank_stops_it_and_its_neighbour_naming_it_before_anything_is_mixed(tmp_path, strategy):
    # Rank 1's loss turns NaN at step 6 (no grad scaler); the checkpoint at step 4 stays clean.
    args = ("--strategy", strategy, "--nan-at", "6", "--ckpt-every", "4", "--period", "50")
    proc, ranks = run_fault(tmp_path, *args, expect_ok=False)
    assert ranks == []
    assert "NonFiniteError" in proc.stderr and "rank 1 held inf/NaN gradients" in proc.stderr
    assert "neighbour rank 1 sent inf/NaN at the gossip of step 6" in proc.stderr
    checkpoint = tmp_path / "ckpt" / "step=4.ckpt"
    state = torch.load(checkpoint, weights_only=False)
    assert all(torch.isfinite(t).all() for t in state["state_dict"].values())


def test_sigterm_on_one_rank_stops_every_rank_at_the_next_check(tmp_path):
    # Rank 1 alone gets SIGTERM at step 5; the request travels with the guard's check after step 8.
    _, ranks = run_fault(tmp_path, "--strategy", "detag", "--term-at", "5", "--period", "4")
    assert [r.get("stopped") for r in ranks] == [True, True]
    assert [r["steps"][-1]["global_step"] for r in ranks] == [8, 8]
    assert torch.equal(ranks[0]["final"], ranks[1]["final"])


def test_fp16_overflow_on_one_rank_skips_its_own_step_and_keeps_the_tracker_finite(tmp_path):
    # An initial scale of 2**24 overflows fp16 gradients at first: the scalers skip and back off, each on its own.
    _, ranks = run_fault(tmp_path, "--strategy", "detag", "--fp16-init-scale", str(2.0**24), "--period", "4")
    for rank in ranks:
        scales = [s["scale"] for s in rank["steps"]]
        assert scales[-1] < 2.0**24  # some steps overflowed and were skipped
        assert torch.isfinite(rank["final"]).all()
    assert torch.equal(ranks[0]["final"], ranks[1]["final"])
