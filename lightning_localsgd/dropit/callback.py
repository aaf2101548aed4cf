"""DropIT for a Lightning ``Trainer``: the model's layers swapped for the fit, restored after it."""

from __future__ import annotations

from collections.abc import Sequence

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from typing_extensions import override

from lightning_localsgd.dropit.swap import apply_dropit, remove_dropit
from lightning_localsgd.dropit.validation import check_gamma, check_skip

__all__ = ["DropITCallback"]


class DropITCallback(Callback):
    """Train with DropIT: every ``nn.Linear`` and ``nn.Conv2d`` keeps only the top ``1 - gamma`` of its input
    (by magnitude) for the weight gradient, saving activation memory (Chen et al., ICLR 2023, arXiv 2202.13808).

    The layers are swapped when the fit starts (after ``configure_model`` and the strategy's set-up, so layers
    created there are included) and restored when it ends, also after an exception: validation inside the fit
    runs through the DropIT layers, whose forward is exact; ``trainer.validate`` / ``test`` / ``predict`` and
    the model after ``fit`` see the plain layers. Parameters and ``state_dict`` keys never change, so
    checkpoints are ordinary.

    Args:
        gamma: the fraction of each layer input dropped, in (0, 1). The paper: 0.5 to 0.7 from scratch, 0.9 for
            fine-tuning. Memory is saved only if ``(1 - gamma) * (value bytes + 4) < value bytes``: gamma > 0.5
            for float32, > 2/3 for float16/bfloat16 (a warning says when it is not).
        skip: qualified module names left dense, with everything under them (``["head"]`` skips ``head``,
            ``head.0``, ...), e.g. a classifier head that fine-tuning must learn exactly. A name matching no
            module is an error.
    """

    def __init__(self, gamma: float, skip: Sequence[str] = ()) -> None:
        self.gamma = check_gamma(gamma)
        self.skip = check_skip(skip)
        self.swapped: list[str] = []

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.swapped = apply_dropit(pl_module, self.gamma, self.skip)
        if not self.swapped:
            rank_zero_warn("DropITCallback found no nn.Linear or nn.Conv2d to swap: training is unchanged.")
            return
        rank_zero_info(f"DropIT (gamma={self.gamma}) on {len(self.swapped)} layers: {', '.join(self.swapped)}.")

    def _restore(self, pl_module: pl.LightningModule) -> None:
        if self.swapped:
            remove_dropit(pl_module, self.swapped)  # only its own: layers built as DropIT layers stay
            self.swapped = []

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._restore(pl_module)

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._restore(pl_module)
