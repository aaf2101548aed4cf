"""LIEC-SGD and EF-SGD with two real processes (CPU, gloo) through ``Trainer.fit``."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import torch
from test_lightning_e2e import run_case

PARAM_KEYS = ["body.0.weight", "body.0.bias", "body.1.weight", "body.1.bias", "head.weight", "head.bias"]
NUMEL = 6 * 16 + 16 + 16 + 16 + 16 + 1  # run_case's Recorder
# Period 4 (full rounds after steps 4, 8, 12), validation after steps 5 and 10, checkpoints after 6 and 12.
ARGS = ("--period", "4", "--val-every", "5", "--ckpt-every", "6", "--csv")


# The sharded server, with 64-element blocks (3 for the 161 elements): rank 0 serves two blocks, rank 1 the last 33.
SHARDED = ("--server", "sharded", "--block-size-mb", str(256 / 2**20))
RUNS = {
    "liec_sgd": ("liec_sgd",),
    "liec_sgd_vr": ("liec_sgd", "--variance-reduction"),
    "liec_sgd_sharded": ("liec_sgd", *SHARDED),
    "ef_sign": ("ef_sign",),
}


@pytest.fixture(scope="module", params=sorted(RUNS))
def compressed_run(request, tmp_path_factory):
    """(strategy name, output folder, per-rank records, the run's extra arguments)."""
    out = tmp_path_factory.mktemp(request.param)
    name, *extra = RUNS[request.param]
    return name, out, run_case(out / "full", "--strategy", name, *extra, *ARGS), tuple(extra)


def _shards(main: Path) -> list[dict]:
    section = torch.load(main, weights_only=False)["lightning_localsgd"]
    return [torch.load(main.parent / name, weights_only=False) for name in section["shards"]]


def test_replicas_drift_under_liec_and_never_under_ef(compressed_run):
    name, _, ranks, _ = compressed_run
    gaps = [(a["params"] - b["params"]).abs().max().item() for a, b in zip(ranks[0]["steps"], ranks[1]["steps"])]
    if name == "ef_sign":
        assert gaps == [0.0] * 12  # every rank steps on the same decoded mean
    else:
        assert min(gaps) > 1e-5  # each rank's own immediate error and momentum


def test_each_compressed_step_sends_the_packed_payload_and_full_rounds_are_counted_apart(compressed_run):
    name, _, ranks, extra = compressed_run
    comm = ranks[0]["comm"]
    compressed_steps = 12 - 3 if name == "liec_sgd" else 12
    assert comm["exchanges"] == compressed_steps
    if extra == SHARDED:
        # Shards of 128 and 33 elements (2 and 1 blocks). Each rank sends the other its shard's payload (all-to-all)
        # and its server result padded to the larger shard's (all-gather).
        payload = [2 * 4 + math.ceil(128 / 8), 4 + math.ceil(33 / 8)]
        for rank in range(2):
            sent = payload[1 - rank] + max(payload)
            assert ranks[rank]["comm"]["exchange_bytes_sent"] == compressed_steps * sent
    else:
        payload = 4 + math.ceil(NUMEL / 8)  # one float32 scale (one 5 MiB block), then 1 bit per element
        assert comm["exchange_bytes_sent"] == compressed_steps * payload
    assert comm["rounds"] == 3
    # The rest: full rounds (LIEC: parameters and gradients in float32), buffer rounds and consensus.
    assert comm["bytes_sent"] > comm["exchange_bytes_sent"]


def test_validation_checkpoints_and_the_final_model_hold_the_consensus(compressed_run):
    name, out, ranks, extra = compressed_run
    for v0, v1 in zip(ranks[0]["val"], ranks[1]["val"]):
        torch.testing.assert_close(v0["evaluated"], (v0["local"] + v1["local"]) / 2)
        torch.testing.assert_close(v1["evaluated"], v0["evaluated"], rtol=0, atol=0)
    # Each rank trains on from its own replica after validation (LIEC: they still differ at step 6).
    if name == "liec_sgd":
        assert (ranks[0]["steps"][5]["params"] - ranks[1]["steps"][5]["params"]).abs().max() > 1e-5
    ckpt = torch.load(out / "full" / "ckpt" / "step=6.ckpt", weights_only=False)
    weights = torch.cat([ckpt["state_dict"][k].reshape(-1) for k in PARAM_KEYS])
    local = [r["steps"][5]["params"] for r in ranks]
    torch.testing.assert_close(weights, (local[0] + local[1]) / 2)
    shards = _shards(out / "full" / "ckpt" / "step=6.ckpt")
    key = "server_error" if name == "liec_sgd" else "error"
    errors = [torch.cat(s["algorithm"][key]) for s in shards]
    assert errors[0].abs().max() > 0
    if extra == SHARDED:  # each rank holds the server error of the part it serves, zeros elsewhere
        assert int(((errors[0] != 0) & (errors[1] != 0)).sum()) == 0 and errors[1].abs().max() > 0
    elif name == "liec_sgd":
        torch.testing.assert_close(errors[0], errors[1], rtol=0, atol=0)  # one server error, held by every rank
    else:
        assert (errors[0] - errors[1]).abs().max() > 0  # each rank's own
    if "--variance-reduction" in extra:  # Delta_i learnt at the full round after step 4, one per rank, summing to 0
        deltas = [torch.cat(s["algorithm"]["delta"]) for s in shards]
        assert deltas[0].abs().max() > 1e-4
        torch.testing.assert_close(deltas[0] + deltas[1], torch.zeros_like(deltas[0]), rtol=0, atol=1e-6)
        assert all(s["algorithm"]["lr_sums"] for s in shards)  # mid-period: the rates since that round
    torch.testing.assert_close(ranks[0]["final"], ranks[1]["final"], rtol=0, atol=0)
    last = [r["steps"][-1]["params"] for r in ranks]
    torch.testing.assert_close(ranks[0]["final"], (last[0] + last[1]) / 2)


def test_exchange_metrics_reach_the_logger(compressed_run):
    _, out, ranks, _ = compressed_run
    with open(out / "full" / "logs" / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("comm/exchanges")]
    assert rows and float(rows[-1]["comm/exchanges"]) == ranks[0]["comm"]["exchanges"]
    assert float(rows[-1]["comm/exchange_mb_sent"]) == pytest.approx(ranks[0]["comm"]["exchange_bytes_sent"] / 1e6)


def test_resume_from_a_mid_period_checkpoint_restores_every_error_and_matches_the_uninterrupted_run(compressed_run):
    name, out, full, extra = compressed_run
    resumed = run_case(
        out / "resumed", "--strategy", name, *extra, *ARGS, "--resume", str(out / "full" / "ckpt" / "step=6.ckpt")
    )
    assert resumed[0]["steps"][0]["global_step"] == 7
    for rank in range(2):
        for got, want in zip(resumed[rank]["steps"], full[rank]["steps"][6:], strict=True):
            torch.testing.assert_close(got["params"], want["params"], rtol=0, atol=0)
        torch.testing.assert_close(resumed[rank]["final"], full[rank]["final"], rtol=0, atol=0)
