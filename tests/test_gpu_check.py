"""The device check (``benchmarks/gpu_check.py``) on CPU: the same script a GPU run uses, kept from rotting while no
GPU is around. Each strategy trains in 1 and in 2 real processes; the checks it makes are what this test reads."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.gpu_check import CORRECTNESS
from benchmarks.gpu_check_cases import STRATEGIES

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("gpu_check")
    command = [sys.executable, "-m", "benchmarks.gpu_check", "--device", "cpu", "--out", str(out), "--timeout", "300"]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert "failed: nothing" in done.stdout
    return json.loads((out / "gpu_check.json").read_text())


def test_every_strategy_passes_every_check_on_both_ranks(report: dict) -> None:
    assert report["failed"] == []
    assert set(report["rows"]) == set(STRATEGIES)
    for rank, result in enumerate(report["two_processes"]):
        for label in STRATEGIES:
            entry = result["strategies"][label]
            for name in CORRECTNESS:
                assert entry[name]["ok"], (rank, label, name, entry[name])
    lead = report["two_processes"][0]["strategies"]
    # The checks compared something: steps where replicas were claimed equal, and exact resumes.
    for label in ("local_sgd", "vrl_sgd", "ef_sign", "diloco", "stl_sgd", "hierarchical_local_sgd"):
        assert lead[label]["replicas_agree"]["steps_in_sync"] > 0, label
    assert lead["ef_sign"]["replicas_agree"]["steps_in_sync"] == lead["ef_sign"]["fit"]["steps"]  # every step
    for label in STRATEGIES:
        assert lead[label]["mid_period_resume"]["max_difference_to_uninterrupted"] == 0.0
        assert lead[label]["fp16_overflow"]["skipped_on_every_rank"], label
        assert lead[label]["fp16_overflow"]["scales"] == [lead[label]["fp16_overflow"]["expected_scale"]] * 2


def test_the_extras_and_the_ratios_are_measured(report: dict) -> None:
    for result in report["two_processes"]:
        assert result["dropit"]["ok"] and result["dropit"]["layers_swapped"] == 3
        assert result["ddp_hook"]["ok"] and result["ddp_hook"]["exchanges"] > 0
    rows = report["rows"]
    for label in STRATEGIES:
        assert rows[label]["local_step_ratio"] > 0, label
    for label in ("local_sgd", "vrl_sgd", "diloco", "ef_sign", "liec_sgd", "dpsgd"):  # blocking rounds
        assert rows[label]["round_to_all_reduce"] > 0, label
    codecs = report["one_process"]["codecs"]["by_compressor"]
    assert set(codecs) == {"sign", "topk 1%", "qsgd"}
    assert all(c["ratio_to_copy"] > 1 for c in codecs.values())  # nothing beats a plain copy of the bytes


def test_cuda_is_refused_where_there_is_none() -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    command = [sys.executable, "-m", "benchmarks.gpu_check", "--device", "cuda"]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "no CUDA device" in done.stderr
