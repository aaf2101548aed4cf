"""The benchmark lab's smoke mode runs end to end (loopback, a few steps), so the scripts cannot rot unseen."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from native_utils import empty_cache

from lightning_localsgd.native import build

REPO = Path(__file__).parent.parent


def test_slow_link_smoke_writes_a_table_with_our_strategy_and_the_peers(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.slow_link", "--smoke", "--out", str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    table = (tmp_path / "mlp-loopback-smoke" / "table.md").read_text()
    assert "NOTICE: loopback" in table  # says plainly that the link was not shaped
    assert "compute limit" in table and "post-local SGD" in table and "local_sgd" in table
    assert "FAILED" not in proc.stdout
    assert (tmp_path / "mlp-loopback-smoke" / "loss_vs_seconds.png").stat().st_size > 0


def test_the_loopback_transfer_benchmark_prints_every_operation():
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.loopback_transfer", "--mib", "1", "--chunks", "4", "--repeats", "1"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    transfers, overlaps = (
        [line.split("|")[1:-1] for line in table.splitlines() if line.startswith("| ") and "---" not in line][1:]
        for table in proc.stdout.split("\n\n")[1:3]
    )
    milliseconds = [float(row[1]) for row in transfers]
    assert len(transfers) == 5 and all(ms > 0 for ms in milliseconds[:4]) and milliseconds[4] >= 0, proc.stdout
    assert [row[0].strip() for row in overlaps] == ["neighbour exchange, one message", "ring all-reduce"], proc.stdout
    for row in overlaps:  # compute alone, the transfer alone, both at once: each took time; "hidden" is a share
        assert all(float(cell) > 0 for cell in row[1:4]) and row[4].strip().endswith("%"), proc.stdout


def test_the_step_parts_benchmark_times_detag_s_gossip_inside_its_optimizer_step(monkeypatch, tmp_path):
    empty_cache(monkeypatch, tmp_path)  # kernels on, whatever the calling shell says
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.step_parts", "--strategy", "detag", "--params-millions", "1",
         "--steps", "5", "--warmup", "2", "--out", str(tmp_path / "records")],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rows = [line.split("|")[1:-1] for line in proc.stdout.splitlines() if line.startswith("| ") and "---" not in line]
    seconds = {label.strip(): float(value) for label, value in rows[1:]}
    assert {"forward", "backward", "gossip", "- waiting for neighbour exchanges"} <= set(seconds), proc.stdout
    if shutil.which(build.compiler()[0]) is not None:  # the kernels ran: their parts were timed
        assert {"- gossip kernels: mix", "- gossip kernels: tracker"} <= set(seconds), proc.stdout
    assert "gradient exchange (warm-up or compressed)" not in seconds, proc.stdout  # only the parts that ran
    whole = seconds["optimizer step, all of it"]
    # Forward, backward and the gossip run inside the optimizer step (its closure), the gossip's parts inside it.
    assert seconds["forward"] + seconds["backward"] + seconds["gossip"] <= whole <= seconds["step (batch start to end)"]
    nested = [value for label, value in seconds.items() if label.startswith("- ")]
    assert sum(nested) <= seconds["gossip"], proc.stdout
    rest = whole - seconds["forward"] - seconds["backward"] - seconds["gossip"]
    assert abs(seconds["the optimizer's own step"] - rest) <= 0.002, proc.stdout  # printed to the millisecond
    assert (tmp_path / "records" / "rank0.json").exists() and (tmp_path / "records" / "rank1.json").exists()
