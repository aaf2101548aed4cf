"""Every Lightning the package declares (``lightning>=2.4``): what differs between versions is handled.

``make test-lightning-min`` runs this file and the resume tests with the lowest declared Lightning in front of the
installed one, with ``LOCALSGD_EXPECT_LIGHTNING`` naming the version that every process must have imported.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import lightning
import lightning as L
import pytest
import torch
from dist_utils import run_processes, run_ranks, run_script
from lightning.fabric.plugins import TorchCheckpointIO
from packaging.version import Version

import lightning_localsgd
from lightning_localsgd.strategies import lightning_compat

E2E = Path(__file__).parent / "e2e"
EXPECTED = os.environ.get("LOCALSGD_EXPECT_LIGHTNING") or lightning.__version__


# ---------------------------------------------------------------------- the Lightning under test, in every process
def _lightning_of_this_process(rank: int) -> tuple[str, str]:
    import lightning

    return lightning.__version__, lightning.__file__


def test_every_process_imports_the_expected_lightning():
    assert lightning.__version__ == EXPECTED, lightning.__file__
    # A plain child (torchrun, the examples) and the forkserver children of the e2e tests.
    plain = subprocess.run(
        [sys.executable, "-c", "import lightning; print(lightning.__version__)"], capture_output=True, text=True
    )
    assert plain.stdout.strip() == EXPECTED, plain.stderr[-2000:]
    for version, where in run_processes(2, _lightning_of_this_process):
        assert (version, where) == (EXPECTED, lightning.__file__)


@pytest.mark.skipif(
    "LOCALSGD_EXPECT_LIGHTNING" not in os.environ, reason="one Lightning installed: the launcher cannot pick another"
)
def test_the_ranks_lightnings_launcher_starts_import_the_expected_lightning(tmp_path):
    # The rank that Lightning's own launcher starts by re-running the script (about 10 s of imports: only where a
    # second Lightning is in front of the installed one, `make test-lightning-min`).
    proc = run_script(E2E / "version_case.py", tmp_path, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for rank in range(2):
        report = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert report == {"version": EXPECTED, "file": lightning.__file__}


def test_the_min_lightning_job_tests_the_floor_pyproject_declares_from_an_ignored_folder():
    root = Path(__file__).parent.parent
    floor = re.search(r'"lightning>=([0-9.]+)"', (root / "pyproject.toml").read_text()).group(1)
    makefile = (root / "Makefile").read_text()
    tested = re.search(r"^LIGHTNING_MIN \?= ([0-9.]+)$", makefile, re.M).group(1)
    assert Version(tested) == Version(floor)
    folder = re.search(r"^LIGHTNING_MIN_DIR \?= (\S+)$", makefile, re.M).group(1)
    assert f"{folder}/" in (root / ".gitignore").read_text().splitlines()


# ---------------------------------------------------------------------- load_checkpoint and `weights_only`
# Lightning 2.6.0 added `weights_only` to the strategies' `load_checkpoint` (and to `fit`/`fabric.load`), passing it
# on to the CheckpointIO; before, neither takes it, and the Trainer and Fabric call `load_checkpoint(path, ...)`.
LIGHTNING_PASSES_WEIGHTS_ONLY = Version(lightning.__version__).release >= (2, 6)


class _RecordingCheckpointIO(TorchCheckpointIO):
    """Records the keywords each load receives; takes none (as Lightning's before 2.6) unless Lightning passes one."""

    def __init__(self) -> None:
        self.calls: list[dict] = []

    def load_checkpoint(self, path, **kwargs):  # type: ignore[override]
        self.calls.append(kwargs)
        return {"state_dict": {}, "epoch": 3}


def _as_lightning_calls_it(load, path, **kwargs):
    """``load(path)`` on Lightning < 2.6; from 2.6 on with ``weights_only``, as the Trainer and Fabric pass it."""
    return load(path, weights_only=True, **kwargs) if LIGHTNING_PASSES_WEIGHTS_ONLY else load(path, **kwargs)


@pytest.mark.filterwarnings("ignore:The checkpoint has no per-rank")  # a bare checkpoint, as intended
def test_the_trainer_strategys_load_checkpoint_takes_what_the_installed_lightning_passes(tmp_path):
    io = _RecordingCheckpointIO()
    strategy = lightning_localsgd.LocalSGDStrategy(period=2, checkpoint_io=io)
    assert _as_lightning_calls_it(strategy.load_checkpoint, tmp_path / "x.ckpt") == {"state_dict": {}, "epoch": 3}
    assert io.calls == ([{"weights_only": True}] if LIGHTNING_PASSES_WEIGHTS_ONLY else [{}])


def test_the_fabric_strategys_load_checkpoint_takes_what_the_installed_lightning_passes(tmp_path):
    io = _RecordingCheckpointIO()
    strategy = lightning_localsgd.fabric.LocalSGDStrategy(period=2, checkpoint_io=io)
    loaded = _as_lightning_calls_it(strategy.load_checkpoint, tmp_path / "x.ckpt", state=None, strict=True)
    assert loaded == {"state_dict": {}, "epoch": 3}
    assert io.calls == ([{"weights_only": True}] if LIGHTNING_PASSES_WEIGHTS_ONLY else [{}])


# ---------------------------------------------------------------------- a checkpoint saved in on_train_batch_end
def _restored_loops(epoch: int, batch: int, last: bool) -> L.Trainer:
    """A trainer whose loops hold what a checkpoint saved in ``on_train_batch_end`` of batch index ``batch`` in
    epoch ``epoch`` holds: that batch processed but not completed, the epoch started but not processed."""
    trainer = L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False)
    fit_loop = trainer.fit_loop
    epochs = {"ready": epoch + 1, "started": epoch + 1, "processed": epoch, "completed": epoch}
    fit_loop.epoch_progress.load_state_dict({"total": epochs, "current": epochs})
    batches = {"ready": batch + 1, "started": batch + 1, "processed": batch + 1, "completed": batch}
    fit_loop.epoch_loop.batch_progress.load_state_dict({"total": batches, "current": batches, "is_last_batch": last})
    fit_loop.restarting = True
    return trainer


@pytest.fixture
def lightning_before_2_5(monkeypatch):
    monkeypatch.setattr(lightning_compat, "LIGHTNING_COMPLETES_BATCH_END_RESTARTS", False)


def test_a_mid_epoch_batch_end_checkpoint_resumes_at_the_next_batch(lightning_before_2_5):
    trainer = _restored_loops(epoch=1, batch=2, last=False)
    stepped = trainer.fit_loop.epoch_loop._batches_that_stepped
    lightning_compat.complete_batch_end_restart(trainer)
    # What Lightning's loops do next on a restart (2.4 and 2.5 alike): roll back to the completed counters.
    batches = trainer.fit_loop.epoch_loop.batch_progress
    batches.reset_on_restart()
    assert batches.current.ready == 3  # the next batch_idx: 3, after batches 0, 1, 2 of this epoch
    assert trainer.fit_loop.epoch_progress.current.completed == 1  # still epoch 1
    assert trainer.fit_loop.epoch_loop._batches_that_stepped == stepped + 1


def test_a_batch_end_checkpoint_after_an_epochs_last_batch_resumes_at_the_next_epochs_first(lightning_before_2_5):
    trainer = _restored_loops(epoch=1, batch=5, last=True)
    lightning_compat.complete_batch_end_restart(trainer)
    epochs = trainer.fit_loop.epoch_progress.total
    assert (epochs.processed, epochs.completed) == (2, 2)  # epoch 1 is done
    trainer.fit_loop.epoch_progress.reset_on_restart()
    trainer.fit_loop.epoch_loop.batch_progress.reset_on_restart()
    assert trainer.fit_loop.epoch_progress.current.processed == 2  # the sampler's epoch, and `current_epoch`
    assert trainer.current_epoch == 2
    assert trainer.fit_loop.epoch_loop.batch_progress.current.ready == 0


def test_other_checkpoints_and_lightning_2_5_on_are_left_alone(monkeypatch):
    completed = _restored_loops(epoch=0, batch=2, last=False)
    completed.fit_loop.epoch_loop.batch_progress.total.completed = 3  # saved after the batch completed
    monkeypatch.setattr(lightning_compat, "LIGHTNING_COMPLETES_BATCH_END_RESTARTS", False)
    lightning_compat.complete_batch_end_restart(completed)
    assert completed.fit_loop.epoch_loop.batch_progress.current.completed == 2
    monkeypatch.setattr(lightning_compat, "LIGHTNING_COMPLETES_BATCH_END_RESTARTS", True)
    at_batch_end = _restored_loops(epoch=0, batch=2, last=False)
    lightning_compat.complete_batch_end_restart(at_batch_end)
    assert at_batch_end.fit_loop.epoch_loop.batch_progress.current.completed == 2


def test_the_version_gate_matches_the_lightning_in_use():
    release = tuple(int(part) for part in lightning.__version__.split(".")[:2])
    assert lightning_compat.LIGHTNING_COMPLETES_BATCH_END_RESTARTS is (release >= (2, 5))


# ---------------------------------------------------------------------- the same, through Trainer.fit
def _run_case(out: Path, *args: str) -> list[dict]:
    proc = run_ranks(E2E / "run_case.py", out, *args, warnings="ignore", timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:]
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


def test_validation_after_a_mid_epoch_resume_runs_where_the_uninterrupted_runs_did(tmp_path):
    # 6 batches per epoch, validation after the epoch's 4th (steps 4 and 10), a checkpoint after step 3 (mid-epoch,
    # in on_train_batch_end): the resumed run must count its batches on from 3, as the uninterrupted one did.
    args = ("--strategy", "local_sgd", "--period", "2", "--max-steps", "10", "--epoch-batches", "6", "--val-every", "4")
    full = _run_case(tmp_path / "full", *args, "--ckpt-every", "3")
    resumed = _run_case(tmp_path / "resumed", *args, "--resume", str(tmp_path / "full" / "ckpt" / "step=3.ckpt"))
    assert [v["step"] for v in full[0]["val"]] == [4, 10]
    assert [v["step"] for v in resumed[0]["val"]] == [4, 10]
    assert [s["global_step"] for s in resumed[0]["steps"]] == list(range(4, 11))
    for rank in range(2):
        torch.testing.assert_close(resumed[rank]["final"], full[rank]["final"], rtol=0, atol=0)
