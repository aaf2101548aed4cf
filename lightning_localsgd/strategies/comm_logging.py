"""The ``comm/*`` metrics in Lightning's usual places: ``callback_metrics``, the loggers and the progress bar.

Written there directly at every step, as ``LightningModule.log`` would leave them, so they behave as the user's
own values: ``ModelCheckpoint(monitor="comm/mb_sent")`` and ``EarlyStopping`` see them at every step, the loggers
get them every ``log_every_n_steps`` steps, the progress bar shows the rounds and megabytes sent. Not through
``LightningModule.log``: its bookkeeping cost about 1 ms per value per step (8 ms a step for the eight values,
measured on the lab's MLP, where a whole ``ef_sign`` step takes 28 ms). Each rank logs its own (no ``sync_dist``:
that would be a collective on every local step).
"""

from __future__ import annotations

import lightning.pytorch as pl
import torch

PROGRESS_BAR_METRICS = ("comm/rounds", "comm/mb_sent")


def log_step_metrics(trainer: pl.Trainer, metrics: dict[str, float], progress_bar: bool) -> None:
    """Put ``metrics`` where this training step's logged values go (call from an ``on_train_batch_end`` hook)."""
    values = {name: float(value) for name, value in metrics.items()}
    trainer.callback_metrics.update({name: torch.tensor(value) for name, value in values.items()})
    if progress_bar:
        trainer.progress_bar_metrics.update({n: values[n] for n in PROGRESS_BAR_METRICS if n in values})
    # When and under which step Lightning writes a value logged in this batch: every `log_every_n_steps` optimizer
    # steps (and at a stop), numbered by the optimizer steps taken before this batch's (0-based).
    step = _lightning_log_step(trainer)
    if trainer.loggers and ((step + 1) % trainer.log_every_n_steps == 0 or trainer.should_stop):
        for logger in trainer.loggers:
            logger.log_metrics(values, step=step)


def _lightning_log_step(trainer: pl.Trainer) -> int:
    # The counter Lightning's own logging uses (one per optimizer step, also under manual optimisation); 2.4 to 2.6
    # keep it on the epoch loop, under a private name: fall back to the global step where it is missing.
    counter = getattr(trainer.fit_loop.epoch_loop, "_batches_that_stepped", None)
    return int(counter) if counter is not None else max(trainer.global_step - 1, 0)


def log_final_metrics(trainer: pl.Trainer, metrics: dict[str, float]) -> None:
    """After the last step (the final average sent more): to the loggers and into ``callback_metrics``, where
    ``LightningModule.log`` can no longer reach."""
    for logger in trainer.loggers:
        logger.log_metrics(metrics, step=trainer.global_step)
    trainer.callback_metrics.update({name: torch.tensor(float(value)) for name, value in metrics.items()})
