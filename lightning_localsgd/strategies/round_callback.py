"""A callback the strategies insert first in ``trainer.callbacks``: the end of a training step."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

if TYPE_CHECKING:
    from lightning_localsgd.strategies.base import LocalUpdateStrategy


class RoundCallback(Callback):
    """Tells the strategy a batch ended, before ``ModelCheckpoint`` or any user callback runs.

    Strategies have no ``on_train_batch_end`` hook of their own, and the step must be counted once per batch
    (not once per optimizer, not once per micro-batch), so the round happens here.
    """

    def __init__(self, strategy: LocalUpdateStrategy) -> None:
        self._strategy = strategy

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._strategy.on_train_batch_end_first(trainer)
