"""Lightning 2.4: complete the restart of a checkpoint saved in ``on_train_batch_end``, as Lightning 2.5 does.

``RoundCheckpoint``, SLURM's requeue and ``ModelCheckpoint(every_n_train_steps=...)`` save in ``on_train_batch_end``,
before Lightning marks the batch completed. From 2.5 on, Lightning completes that batch when it restarts. Lightning
2.4 rolls its counters back to the completed ones instead, so the resumed run counts the saved batch again: mid-epoch
every later ``batch_idx`` is one too low, and after an epoch's last batch it trains one batch of the finished epoch
more than the uninterrupted run did (which breaks exact resumes).
"""

from __future__ import annotations

import re

import lightning
import lightning.pytorch as pl

# Lightning 2.5.0 added the restart stages (`restarted_on_train_batch_end`) to its loops.
_MAJOR_MINOR = tuple(int(part) for part in re.findall(r"\d+", lightning.__version__)[:2])
LIGHTNING_COMPLETES_BATCH_END_RESTARTS = _MAJOR_MINOR >= (2, 5)


def saved_in_train_batch_end(trainer: pl.Trainer) -> bool:
    """Whether the loops were just restored from a checkpoint written in ``on_train_batch_end``."""
    epoch_loop = trainer.fit_loop.epoch_loop
    total = epoch_loop.batch_progress.total
    return (
        epoch_loop.restarting
        and total.started == total.ready
        and total.processed == total.started
        and total.completed == total.processed - 1
    )


def complete_batch_end_restart(trainer: pl.Trainer) -> None:
    """On Lightning < 2.5, right after the loops are restored: count the saved batch as completed (and, if it was
    its epoch's last, the epoch as done), so that 2.4 resumes at the next batch as 2.5 does."""
    if LIGHTNING_COMPLETES_BATCH_END_RESTARTS or not saved_in_train_batch_end(trainer):
        return
    fit_loop = trainer.fit_loop
    epoch_loop = fit_loop.epoch_loop
    if not epoch_loop._should_accumulate():
        epoch_loop._batches_that_stepped += 1  # the saved batch stepped; the checkpoint predates the count
    epoch_loop.batch_progress.increment_completed()
    if epoch_loop.batch_progress.is_last_batch:
        # The epoch had ended: the next one starts from its first batch, with the sampler's next epoch.
        epoch_loop.batch_progress.reset_on_run()
        epoch_loop.scheduler_progress.reset_on_run()
        epoch_loop.automatic_optimization.optim_progress.reset_on_run()
        epoch_loop.val_loop.batch_progress.total.reset()
        fit_loop.epoch_progress.increment_processed()
        fit_loop.epoch_progress.increment_completed()
