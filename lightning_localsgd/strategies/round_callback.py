"""A callback the strategies insert first in ``trainer.callbacks``: the start and end of a training step."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from lightning_localsgd.strategies.checkpointing import restore_rng_states

if TYPE_CHECKING:
    from lightning_localsgd.strategies.base import LocalUpdateStrategy


class RoundCallback(Callback):
    """Tells the strategy a batch ended, before ``ModelCheckpoint`` or any user callback runs.

    Strategies have no ``on_train_batch_end`` hook of their own, and the step must be counted once per batch
    (not once per optimizer, not once per micro-batch), so the round happens here.

    After a mid-epoch resume it also restores each rank's random number generators at the first batch, before
    any other hook: in the uninterrupted run nothing drew from them between the checkpoint and that batch's
    ``training_step`` (dropout), but the resumed run made a new data iterator in between, which draws.
    """

    def __init__(self, strategy: LocalUpdateStrategy) -> None:
        self._strategy = strategy
        strategy._resume_rng = None  # set again only if this fit resumes from a checkpoint with shards

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # The data are set up by now, so the epoch's length is known. At an epoch's start or end the generators
        # restored at load time are right: the next epoch's iterator draws first, in both runs.
        fit_loop = trainer.fit_loop
        done = fit_loop.epoch_loop.batch_progress.current.processed
        if not 0 < done < fit_loop.max_batches:
            self._strategy._resume_rng = None
        # The step budget is known too: warn now if no round will average the replicas.
        self._strategy._round_budget.at_start(trainer)

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        states, self._strategy._resume_rng = self._strategy._resume_rng, None
        if states is not None:
            restore_rng_states(states)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._strategy.on_train_batch_end_first(trainer)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._strategy._resume_rng = None
