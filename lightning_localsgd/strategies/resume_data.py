"""Resume mid-epoch on the same batches: fast-forward the training data past what the checkpoint trained on.

Lightning restores its loop counters from a mid-epoch checkpoint but restarts a plain ``DataLoader`` from
the epoch's first batch, so a resumed run would see the epoch's first batches twice and never its last ones.
With a deterministic order (Lightning's ``DistributedSampler``, :class:`~lightning_localsgd.NonIIDSampler`,
any sampler seeded per epoch) skipping the batches already trained on makes the resumed run see exactly the
batches the uninterrupted run saw. Loaders that restore their own position (``state_dict`` /
``load_state_dict``, e.g. torchdata's ``StatefulDataLoader``) are left alone.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import lightning.pytorch as pl


class SkipFirstBatches:
    """Iterate ``loader`` but drop its first ``skip`` batches, once (the next epochs are whole).

    Skipping iterates the loader, so the skipped batches are loaded and thrown away: the cost of one partial
    epoch of data loading, once per resume. Every other attribute is the loader's (``sampler``, ``dataset``...).
    """

    def __init__(self, loader: Any, skip: int) -> None:
        self.loader = loader
        self.skip = skip

    def __iter__(self) -> Iterator[Any]:
        skip, self.skip = self.skip, 0
        return self._batches(skip)

    def _batches(self, skip: int) -> Iterator[Any]:
        # A generator: the loader's iterator (and its sampler's order) is made at the first `next`, after
        # Lightning has set the sampler's epoch, exactly as in the uninterrupted run.
        iterator = iter(self.loader)
        for _ in range(skip):
            next(iterator)
        yield from iterator

    def __len__(self) -> int:
        return len(self.loader)

    def __getattr__(self, name: str) -> Any:
        if name in ("loader", "skip"):  # not set yet (e.g. while unpickling)
            raise AttributeError(name)
        return getattr(self.loader, name)


def fast_forward_after_mid_epoch_resume(trainer: pl.Trainer) -> int:
    """Wrap the training loaders to skip the batches of this epoch the checkpoint had trained on; returns that count."""
    fit_loop = trainer.fit_loop
    loader = fit_loop._combined_loader
    # Batches of this epoch trained on before the checkpoint (its `completed` lags by the batch being saved).
    done = fit_loop.epoch_loop.batch_progress.current.processed
    if not fit_loop.restarting or loader is None or not 0 < done < fit_loop.max_batches:
        return 0  # a fresh start, or a checkpoint at an epoch's end (Lightning starts the next epoch itself)
    flattened = loader.flattened
    if any(callable(getattr(dl, "load_state_dict", None)) for dl in flattened):
        return 0  # a stateful loader resumes by itself
    loader.flattened = [SkipFirstBatches(dl, done) for dl in flattened]
    if fit_loop._data_fetcher is not None:
        iter(fit_loop._data_fetcher)  # Lightning's set-up made its iterators from the unwrapped loaders
    return done
