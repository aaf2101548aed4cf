"""Checkpoints every N rounds, written atomically, and the newest complete one found again on restart.

``trainer.fit(model, ckpt_path="last")`` resumes from the newest complete checkpoint in ``dirpath`` (Lightning
asks every ``ModelCheckpoint`` for its last checkpoints), so the same command line serves the first start and
every restart (``torchrun --max-restarts``, a SLURM requeue, a job re-submitted by hand).
"""

from __future__ import annotations

import os
import re
import shutil
import zipfile
from pathlib import Path
from typing import Any, Optional

import lightning.pytorch as pl
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.callbacks import ModelCheckpoint
from typing_extensions import override

from lightning_localsgd._validation import check_int
from lightning_localsgd.strategies.checkpointing import PARTIAL_SUFFIX, SHARDS_SUFFIX, missing_shards, remove_shards

__all__ = ["PARTIAL_SUFFIX", "RoundCheckpoint", "hpc_checkpoint", "is_complete", "newest_complete_checkpoint"]

_NAME = re.compile(r"^round-(\d+)-step-(\d+)\.ckpt$")


def is_complete(path: Path) -> bool:
    """Whether a checkpoint's main file is whole and every per-rank shard it names is present.

    Files are renamed into place only once written, so a half-written file never carries the final name;
    a zip-directory check still guards against a file truncated by a full disk or a copy cut short, and
    the shard check against a shard lost (deleted, or not copied along with the main file).
    """
    if not zipfile.is_zipfile(path):  # torch.save writes a zip archive; a truncated one has no directory
        return False
    try:
        return not missing_shards(path)
    except Exception:  # a damaged archive: not a checkpoint to resume from
        return False


def newest_complete_checkpoint(dirpath: _PATH) -> Optional[Path]:
    """The checkpoint with the most rounds in ``dirpath`` that is complete (see :func:`is_complete`); None if
    there is none."""
    folder = Path(dirpath)
    if not folder.is_dir():
        return None
    candidates = sorted(
        ((int(m.group(1)), int(m.group(2)), path) for path in folder.iterdir() if (m := _NAME.match(path.name))),
        reverse=True,
    )
    return next((path for _, _, path in candidates if is_complete(path)), None)


def hpc_checkpoint(trainer: pl.Trainer) -> Optional[Path]:
    """The newest complete ``hpc_ckpt_N.ckpt`` Lightning's SLURM requeue handler wrote in ``default_root_dir``."""
    numbered = sorted(
        (
            (int(m.group(1)), path)
            for path in Path(trainer.default_root_dir).glob("hpc_ckpt_*.ckpt")
            if (m := re.match(r"^hpc_ckpt_(\d+)\.ckpt$", path.name))
        ),
        reverse=True,
    )
    return next((path for _, path in numbered if is_complete(path)), None)


class RoundCheckpoint(ModelCheckpoint):
    """Save a full checkpoint right after every ``every_n_rounds``-th round of a local-update strategy.

    A round is the natural moment: with Local SGD and VRL-SGD the replicas agree there, and every rank is at
    the same step. Each rank's own state (replica, optimizer, algorithm buffers, RNG) is in its shard beside
    the checkpoint (``<name>.shards/``), so resuming continues exactly. Under other strategies every optimizer
    step counts as a round.

    Args:
        dirpath: folder of the checkpoints (default ``<default_root_dir>/round_checkpoints``: it must not depend
            on the logger's version, which changes on every restart).
        every_n_rounds: rounds between two checkpoints.
        keep_last: how many of the newest checkpoints to keep (older ones and their shards are deleted after a save
            succeeds).
    """

    def __init__(self, dirpath: Optional[_PATH] = None, every_n_rounds: int = 10, keep_last: int = 2) -> None:
        self.every_n_rounds = check_int("every_n_rounds", every_n_rounds, 1)
        self.keep_last = check_int("keep_last", keep_last, 1)
        super().__init__(dirpath=dirpath, save_top_k=-1, every_n_epochs=0, save_on_train_epoch_end=False)
        self._rounds_seen = 0  # rounds at the previous batch end
        self._explicit_dirpath = dirpath is not None

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(every_n_rounds=self.every_n_rounds)

    def resolve_dirpath(self, trainer: pl.Trainer) -> Path:
        if not self._explicit_dirpath:
            self.dirpath = os.path.join(trainer.default_root_dir, "round_checkpoints")
        return Path(self.dirpath)

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.resolve_dirpath(trainer)
        super().setup(trainer, pl_module, stage)
        self.resolve_dirpath(trainer)  # ModelCheckpoint's set-up would pick the logger's (versioned) folder
        if trainer.is_global_zero:  # leftovers of a save interrupted by a crash
            folder = Path(str(self.dirpath))
            for partial in folder.glob(f"*{PARTIAL_SUFFIX}"):
                partial.unlink(missing_ok=True)
            for shards in folder.glob(f"*{SHARDS_SUFFIX}"):  # shards whose main file was never renamed into place
                main = shards.with_name(shards.name[: -len(SHARDS_SUFFIX)])
                if _NAME.match(main.name) and not main.exists():
                    shutil.rmtree(shards, ignore_errors=True)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        rounds = self._rounds(trainer)
        if rounds == self._rounds_seen:
            return  # no round (or no step) ended with this batch
        self._rounds_seen = rounds
        if rounds % self.every_n_rounds == 0 and not trainer.sanity_checking:
            self.save_round(trainer, rounds)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        pass  # saves follow rounds only

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        pass

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._rounds_seen = self._rounds(trainer)  # after a resume: the restored count

    def save_round(self, trainer: pl.Trainer, rounds: int) -> Path:
        """Write the checkpoint of this round under a temporary name, then rename it into place (atomic)."""
        folder = self.resolve_dirpath(trainer)
        final = folder / f"round-{rounds:08d}-step-{trainer.global_step:09d}.ckpt"
        partial = final.with_name(final.name + PARTIAL_SUFFIX)
        # Every rank writes its shard (named after `final`), then rank 0 the main file: all ranks take part.
        self._save_checkpoint(trainer, str(partial))
        if trainer.is_global_zero:
            with open(partial, "rb") as handle:
                os.fsync(handle.fileno())
            os.replace(partial, final)
            self._fsync_folder(folder)
            self._prune(folder)
        self._last_checkpoint_saved = str(final)
        trainer.strategy.barrier("RoundCheckpoint.save_round")
        return final

    @override
    def _find_last_checkpoints(self, trainer: pl.Trainer) -> set[str]:
        # Lightning resumes from the most recently written of these: the newest round checkpoint, or the
        # checkpoint a SLURM requeue signal wrote (`hpc_ckpt_N.ckpt`) if that came later.
        candidates = {newest_complete_checkpoint(self.resolve_dirpath(trainer)), hpc_checkpoint(trainer)}
        return {str(path) for path in candidates if path is not None}

    def _prune(self, folder: Path) -> None:
        saved = sorted(path for path in folder.iterdir() if _NAME.match(path.name))
        for old in saved[: -self.keep_last]:
            old.unlink(missing_ok=True)  # the main file first: a checkpoint is never left looking complete
            remove_shards(old)

    @staticmethod
    def _rounds(trainer: pl.Trainer) -> int:
        # The schedule's rounds, not the communication counter: warm-up steps synchronise but are not rounds.
        rounds = getattr(trainer.strategy, "rounds", None)
        return rounds if isinstance(rounds, int) else trainer.global_step

    @staticmethod
    def _fsync_folder(folder: Path) -> None:
        descriptor = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(descriptor)  # the rename itself survives a power cut
        finally:
            os.close(descriptor)
