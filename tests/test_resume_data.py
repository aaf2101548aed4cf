"""Mid-epoch resume: the training data is fast-forwarded past the batches the checkpoint had trained on."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from lightning_localsgd.strategies.resume_data import SkipFirstBatches


def loader() -> DataLoader:
    data = TensorDataset(torch.arange(40))
    sampler = DistributedSampler(data, num_replicas=2, rank=0, shuffle=True, seed=3)
    return DataLoader(data, batch_size=4, sampler=sampler)


def test_skipping_follows_the_epoch_set_after_iter_as_lightning_does():
    whole = loader()
    whole.sampler.set_epoch(1)
    expected = [batch[0].tolist() for batch in whole][2:]

    wrapped = SkipFirstBatches(loader(), skip=2)
    iterator = iter(wrapped)  # Lightning makes its iterator during set-up ...
    wrapped.sampler.set_epoch(1)  # ... and sets the epoch afterwards (delegated to the loader's sampler)
    assert [batch[0].tolist() for batch in iterator] == expected
    assert len(wrapped) == 5  # the epoch's length stays the loader's: Lightning counts the skipped ones as done


def test_only_the_first_epoch_after_the_resume_is_shortened():
    wrapped = SkipFirstBatches(loader(), skip=3)
    assert len(list(iter(wrapped))) == 2
    assert len(list(iter(wrapped))) == 5
