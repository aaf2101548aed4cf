"""Measure what autograd keeps for backward: saved-tensor bytes on any device, the allocator's peak on CUDA.

``with SavedTensorBytes(model) as saved: loss = model(x).sum()`` then ``saved.bytes`` is what the graph holds
for backward at the end of the forward pass, the point at which it is largest; run ``backward`` after the
``with`` block (the hooks only see tensors being saved).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Optional

import torch
from torch import Tensor, nn


class SavedTensorBytes(torch.autograd.graph.saved_tensors_hooks):
    """Count the bytes of the tensors autograd saves for backward while the context is active.

    Each storage counts once, whole (two ops saving the same activation, e.g. a ReLU's output that is also the
    next layer's input, keep it alive once; a view keeps its whole storage alive), and parameters' storages not at
    all (they exist whether or not anything is saved), so figures with and without DropIT compare the memory
    that training adds. Storages are told apart by address, so measure one forward pass at a time: its saved
    tensors are all alive until backward, so no address is reused among them.

    On CUDA, ``cuda_peak_bytes`` is ``torch.cuda.max_memory_allocated`` over the context, parameters and
    temporaries included (None elsewhere).

    Args:
        model: whose parameters (or any tensors) are left out; None counts everything.
    """

    def __init__(self, model: Optional[nn.Module] = None, exclude: Iterable[Tensor] = ()) -> None:
        tensors = [*(model.parameters() if model is not None else ()), *exclude]
        self._excluded = {t.untyped_storage().data_ptr() for t in tensors}
        self._seen: set[tuple[int, int]] = set()
        self.bytes = 0
        self.tensors = 0
        self.cuda_peak_bytes: Optional[int] = None
        self._cuda = torch.cuda.is_available()
        super().__init__(self._pack, lambda packed: packed)

    def _pack(self, tensor: Tensor) -> Tensor:
        storage = tensor.untyped_storage()
        key = (storage.data_ptr(), storage.nbytes())
        if key[0] not in self._excluded and key not in self._seen:
            self._seen.add(key)
            self.bytes += key[1]
            self.tensors += 1
        return tensor

    def __enter__(self) -> SavedTensorBytes:
        if self._cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        super().__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        super().__exit__(*exc)
        if self._cuda:
            torch.cuda.synchronize()
            self.cuda_peak_bytes = torch.cuda.max_memory_allocated()
