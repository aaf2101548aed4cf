"""Averaging over ranks, written once: the replica (parameter buckets and averaged buffers), whole modules (the
copies kept by weight-averaging callbacks), and the one-time copy of rank 0's model at set-up."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from lightning_localsgd.comm import Communicator
from lightning_localsgd.comm.flat import _grouped_by_layout, _pack, _unpack_into, mean_, mean_packed_

__all__ = ["average_module_", "average_replica_", "broadcast_module_state_", "mean_", "mean_packed_"]


def average_replica_(buckets: Sequence[Tensor], buffers: Sequence[Tensor], comm: Communicator) -> None:
    """x_i <- mean_j x_j for the parameter buckets and the averaged buffers."""
    mean_(buckets, comm)
    mean_packed_(buffers, comm)


def average_module_(module: nn.Module, comm: Communicator) -> None:
    """Average every floating-point parameter and buffer of ``module`` (e.g. an EMA copy kept by a callback)."""
    tensors = [t.data for t in module.parameters() if t.is_floating_point()]
    tensors += [b for b in module.buffers() if b.is_floating_point()]
    mean_packed_(tensors, comm)


def broadcast_module_state_(module: nn.Module, comm: Communicator, src: int = 0) -> None:
    """Every parameter and buffer, trainable or not, takes rank ``src``'s value, as DDP does at construction.

    A frozen layer initialised without a shared seed would otherwise differ on every rank for the whole run, so
    validation, checkpoints and the final model would depend on the rank.
    """
    if comm.world_size == 1:
        return
    tensors = list(dict.fromkeys([p.data for p in module.parameters()] + list(module.buffers())))
    tensors = [t for t in tensors if t.numel() > 0]
    with torch.no_grad():
        for group in _grouped_by_layout(tensors):
            members = [tensors[i] for i in group]
            flat = _pack(members)
            comm.broadcast_([flat], src=src)
            _unpack_into(flat, members)
