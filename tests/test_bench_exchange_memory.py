"""benchmarks.exchange_memory runs end to end at a tiny size (1 M parameters, 4 steps), so the script cannot rot
unseen: the baseline, the pair of plain runs and one strategy, each in fresh processes, then the table and JSON.
About 25 s (five Lightning process starts, two at a time at most), so it runs with ``-m slow``."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).parent.parent


@pytest.mark.slow
def test_exchange_memory_smoke_prints_the_table_and_writes_json(tmp_path):
    output = tmp_path / "exchange_memory.json"
    command = [sys.executable, "-m", "benchmarks.exchange_memory", "--strategies", "local_sgd"]
    command += ["--params-millions", "1", "--steps", "4", "--warmup", "0", "--output", str(output)]
    proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "| plain Lightning, 1 process |" in proc.stdout and "two plain 1-process runs at once" in proc.stdout
    # local_sgd rounds after its first step (first_period_one_step), so a round step is measured here
    assert "| `local_sgd` (round steps) | +" in proc.stdout
    rows = {row["name"]: row for row in json.loads(output.read_text())["rows"]}
    local = rows["local_sgd"]
    assert len(local["ranks"]) == 2 and local["round_step_seconds"] > 0 and local["peak_rss_bytes"] > 0
    assert len(rows["single_x2"]["step_seconds_range"]) == 2
    assert output.with_suffix(".md").read_text().startswith("MLP of 1.0 M")
