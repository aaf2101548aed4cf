"""Streaming DiLoCo, plain and with compressed pseudo-gradients, in 2 real processes (CPU, gloo) through
``Trainer.fit``: validation and checkpoints see the consensus, a checkpoint taken with a fragment's transfer in flight
resumes exactly, the model after ``fit`` is one model, and the bytes logged are the bytes sent."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from test_lightning_e2e import run_case

# period 4, two fragments (the run's model: body Linear(6, 16) | BatchNorm + head): a round after every 2 steps, each
# fragment's transfer starting 1 step before it (after odd steps), so the checkpoint after step 5 is taken in flight.
STREAMING = {"fragments": 2, "sync_delay": 1}
CASES = {
    "streaming": STREAMING,
    "sign": {**STREAMING, "compressor": "sign", "error_feedback": True, "error_decay": 0.9},
    "int4": {**STREAMING, "compressor": "int4", "compressor_options": {"block_numel": 64}},
    "sparse_topk": {**STREAMING, "compressor": "sparse_topk", "compressor_options": {"k": 4, "chunk_numel": 32}},
}
PARAMETER_KEYS = ("body.0.weight", "body.0.bias", "body.1.weight", "body.1.bias", "head.weight", "head.bias")


def args_of(options: dict) -> tuple[str, ...]:
    return ("--strategy", "diloco", "--period", "4", "--options", json.dumps(options), "--val-every", "5", "--csv")


@pytest.mark.parametrize("case", sorted(CASES))
def test_streaming_diloco_evaluates_and_checkpoints_the_consensus_and_resumes_in_flight_exactly(tmp_path, case):
    args = args_of(CASES[case])
    full = run_case(tmp_path / "full", *args, "--max-steps", "12", "--ckpt-every", "5")
    for v0, v1 in zip(full[0]["val"], full[1]["val"], strict=True):
        torch.testing.assert_close(v0["evaluated"], (v0["local"] + v1["local"]) / 2)
    assert (full[0]["steps"][4]["params"] - full[1]["steps"][4]["params"]).abs().max() > 0  # mid-flight they differ
    ckpt = tmp_path / "full" / "ckpt" / "step=5.ckpt"
    weights = torch.load(ckpt, weights_only=False)["state_dict"]
    saved = torch.cat([weights[key].reshape(-1) for key in PARAMETER_KEYS])
    consensus = (full[0]["steps"][4]["params"] + full[1]["steps"][4]["params"]) / 2
    torch.testing.assert_close(saved, consensus)
    resumed = run_case(tmp_path / "resumed", *args, "--max-steps", "12", "--resume", str(ckpt))
    for rank in range(2):
        for got, want in zip(resumed[rank]["steps"], full[rank]["steps"][5:], strict=True):
            torch.testing.assert_close(got["params"], want["params"], rtol=0, atol=0)
    torch.testing.assert_close(full[0]["final"], full[1]["final"], rtol=0, atol=0)
    torch.testing.assert_close(resumed[0]["final"], full[0]["final"], rtol=0, atol=0)
    assert full[0]["comm"]["rounds"] == 6  # one fragment every 2 steps
    with open(tmp_path / "full" / "logs" / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("comm/mb_sent")]
    assert float(rows[-1]["comm/mb_sent"]) == pytest.approx(full[0]["comm"]["bytes_sent"] / 1e6)


def test_compressed_pseudo_gradients_send_a_fraction_of_the_bytes(tmp_path):
    """The same 12 steps with and without compression: same rounds, same flags, fewer bytes for the fragments."""
    plain = run_case(tmp_path / "plain", *args_of(STREAMING), "--max-steps", "12")
    sign = run_case(tmp_path / "sign", *args_of(CASES["sign"]), "--max-steps", "12")
    assert plain[0]["comm"]["rounds"] == sign[0]["comm"]["rounds"] == 6
    # float32 fragments of 112 and 49 elements (2 ranks: a ring all-reduce sends them once) against one float32
    # scale and the packed signs; the BatchNorm statistics (32 floats) travel in full precision in both runs
    fragments = [112, 49] * 3
    saved = sum(4 * n - (4 + (n + 7) // 8) for n in fragments)
    assert plain[0]["comm"]["bytes_sent"] - sign[0]["comm"]["bytes_sent"] == saved
