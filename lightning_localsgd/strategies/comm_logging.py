"""The ``comm/*`` metrics in Lightning's usual places: ``callback_metrics``, the loggers and the progress bar.

Logged through ``LightningModule.log`` (from the strategy's first ``on_train_batch_end``), so they behave as the
user's own values: ``ModelCheckpoint(monitor="comm/mb_sent")`` and ``EarlyStopping`` see them at every step, the
loggers get them every ``log_every_n_steps`` steps, the progress bar shows the rounds and megabytes sent. Each
rank logs its own (no ``sync_dist``: that would be a collective on every local step).
"""

from __future__ import annotations

import lightning.pytorch as pl
import torch

PROGRESS_BAR_METRICS = ("comm/rounds", "comm/mb_sent")


def log_step_metrics(module: pl.LightningModule, metrics: dict[str, float], progress_bar: bool) -> None:
    """Log ``metrics`` for this training step (call from an ``on_train_batch_end`` hook)."""
    for name, value in metrics.items():
        shown = progress_bar and name in PROGRESS_BAR_METRICS
        module.log(name, float(value), on_step=True, on_epoch=False, prog_bar=shown, logger=True, sync_dist=False)


def log_final_metrics(trainer: pl.Trainer, metrics: dict[str, float]) -> None:
    """After the last step (the final average sent more): to the loggers and into ``callback_metrics``, where
    ``LightningModule.log`` can no longer reach."""
    for logger in trainer.loggers:
        logger.log_metrics(metrics, step=trainer.global_step)
    trainer.callback_metrics.update({name: torch.tensor(float(value)) for name, value in metrics.items()})
