"""Settings that add a world collective to every local step are named in a warning (2 real CPU processes, gloo).

``Trainer(max_time=...)``, ``ModelCheckpoint(train_time_interval=...)`` and ``self.log(..., sync_dist=True)`` in
``training_step``; their alternatives, and synced validation metrics, warn about nothing.
"""

from __future__ import annotations

import json
from pathlib import Path

from dist_utils import run_ranks

SCRIPT = Path(__file__).parent / "e2e" / "per_step_collectives_case.py"
WARNINGS = {
    "max_time": "`Trainer(max_time=...)` (or `Timer(duration=...)`) broadcasts whether time is up from rank 0 after "
    "every training batch: one collective on every local step",
    "train_time_interval": "`ModelCheckpoint(train_time_interval=...)` broadcasts whether the interval has passed "
    "from rank 0 after every training batch: one collective on every local step",
    "sync_dist": "`self.log(..., sync_dist=True)` on every step ('train_loss' in `training_step`) syncs each value "
    "when it is logged: a barrier and an all-reduce per value on every local step",
}
INSTEAD = {"max_time": "`max_steps`", "train_time_interval": "`every_n_train_steps`", "sync_dist": "`sync_dist=False`"}


def run_case(out: Path, *args: str) -> tuple[str, list[list[int]]]:
    """Stderr of the run, and each rank's count of world-group collectives inside each training batch."""
    proc = run_ranks(SCRIPT, out, *args)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    ranks = [json.loads(p.read_text())["per_step"] for p in sorted(out.glob("rank*.json"))]
    assert len(ranks) == 2
    return proc.stderr, ranks


def test_each_setting_that_costs_a_collective_per_local_step_is_named_once_with_what_to_use_instead(tmp_path):
    stderr, ranks = run_case(tmp_path, "--costly")
    # What the warnings claim: Timer 1 + ModelCheckpoint 1 + the logged value 2 (barrier, all-reduce) per step.
    assert ranks == [[4] * 6] * 2
    for setting, text in WARNINGS.items():
        assert stderr.count(text) == 1, (setting, stderr[-6000:])
        warning = next(line for line in stderr.splitlines() if text in line)
        assert "undoes what LocalSGDStrategy saves" in warning and INSTEAD[setting] in warning, warning


def test_the_alternatives_and_synced_validation_metrics_warn_about_nothing(tmp_path):
    stderr, ranks = run_case(tmp_path)
    for per_step in ranks:
        # No world collective inside a training batch, except the checkpoint's own at step 4 (every_n_train_steps).
        assert per_step[3] > 0 and per_step[:3] + per_step[4:] == [0] * 5, per_step
    assert "on every local step" not in stderr, stderr[-6000:]
