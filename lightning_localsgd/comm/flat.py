"""Flat, contiguous storage for parameters, and packed collectives for gradients and buffers.

A round must cost one collective per bucket, never one per tensor, and must not copy the model twice.
:class:`FlatParameters` therefore re-homes each trainable parameter into a slice of a few large flat
tensors: averaging a bucket in place averages the parameters themselves, with no copy in or out.
Gradients and floating-point buffers are not re-homed (autograd and modules replace those tensors),
so they are packed into one temporary tensor per dtype for their collective.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from itertools import groupby

import torch
from torch import Tensor, nn

from lightning_localsgd.comm.communicator import Communicator

DEFAULT_BUCKET_CAP_MB = 25.0


def _layout_key(tensor: Tensor) -> tuple[str, str]:
    return (str(tensor.device), str(tensor.dtype))


def _grouped_by_layout(tensors: Sequence[Tensor]) -> list[list[int]]:
    """Indices of ``tensors`` grouped by (device, dtype), groups in order of first appearance."""
    order = {key: i for i, key in reversed(list(enumerate(_layout_key(t) for t in tensors)))}
    indices = sorted(range(len(tensors)), key=lambda i: (order[_layout_key(tensors[i])], i))
    return [list(group) for _, group in groupby(indices, key=lambda i: order[_layout_key(tensors[i])])]


class FlatParameters:
    """Trainable parameters stored as views into a few contiguous buckets.

    Args:
        params: the parameters to manage, in a deterministic order (the same on every rank).
        bucket_cap_mb: largest bucket size in MiB; a single larger parameter gets a bucket of its own.
    """

    def __init__(self, params: Iterable[nn.Parameter], bucket_cap_mb: float = DEFAULT_BUCKET_CAP_MB) -> None:
        self.params: list[nn.Parameter] = list(dict.fromkeys(params))  # drop tied duplicates, keep order
        self.index_of: dict[int, int] = {id(p): i for i, p in enumerate(self.params)}  # id(parameter) -> index
        if not self.params:
            raise ValueError("There are no trainable parameters to synchronise (none has `requires_grad=True`).")
        cap_bytes = int(bucket_cap_mb * 2**20)
        # (bucket index, offset) of each parameter, and the numel of each bucket.
        self._slots: list[tuple[int, int]] = [(0, 0)] * len(self.params)
        sizes: list[int] = []
        templates: list[Tensor] = []
        for group in _grouped_by_layout(self.params):
            used_bytes = cap_bytes  # forces a new bucket for each layout group
            for i in group:
                p = self.params[i]
                nbytes = p.numel() * p.element_size()
                if used_bytes + nbytes > cap_bytes and used_bytes > 0:
                    sizes.append(0)
                    templates.append(p)
                    used_bytes = 0
                self._slots[i] = (len(sizes) - 1, sizes[-1])
                sizes[-1] += p.numel()
                used_bytes += nbytes
        self.buckets: list[Tensor] = [torch.empty(n, dtype=t.dtype, device=t.device) for n, t in zip(sizes, templates)]
        self._expected_ptrs: list[int] = []
        self.rehome()

    @property
    def numel(self) -> int:
        return sum(b.numel() for b in self.buckets)

    def views_of(self, buckets: Sequence[Tensor]) -> list[Tensor]:
        """Per-parameter views into ``buckets`` (same layout as :attr:`buckets`), in parameter order."""
        views = []
        for p, (b, offset) in zip(self.params, self._slots):
            views.append(buckets[b][offset : offset + p.numel()].view_as(p))
        return views

    def zeros_like_buckets(self) -> list[Tensor]:
        return [torch.zeros_like(b) for b in self.buckets]

    def rehome(self) -> None:
        """Copy every parameter's current value into its slice and make the parameter a view of it."""
        with torch.no_grad():
            for p, view in zip(self.params, self.views_of(self.buckets)):
                view.copy_(p.detach())
                p.data = view
        self._expected_ptrs = [p.data_ptr() for p in self.params]

    def ensure_views(self) -> bool:
        """Re-home parameters whose storage was replaced (``module.to``, ``p.data = ...``). Returns True if it did."""
        intact = all(p.data_ptr() == ptr for p, ptr in zip(self.params, self._expected_ptrs))
        if not intact:
            self.rehome()
        return not intact


def _pack(tensors: Sequence[Tensor]) -> Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def _unpack_into(flat: Tensor, tensors: Sequence[Tensor]) -> None:
    offset = 0
    for t in tensors:
        t.copy_(flat[offset : offset + t.numel()].view_as(t))
        offset += t.numel()


def float_buffers(module: nn.Module) -> list[Tensor]:
    """The module's floating-point buffers (BatchNorm running statistics), in a deterministic order."""
    return [b for _, b in module.named_buffers() if b.is_floating_point()]


def average_float_buffers(module: nn.Module, comm: Communicator) -> None:
    """Average floating-point buffers over ranks, one collective per dtype.

    Integer buffers (``num_batches_tracked``) are left alone: they count identically on every rank.
    """
    buffers = float_buffers(module)
    with torch.no_grad():
        for group in _grouped_by_layout(buffers):
            members = [buffers[i] for i in group]
            flat = _pack(members)
            comm.all_reduce_mean_([flat])
            _unpack_into(flat, members)


def average_gradients(params: Sequence[nn.Parameter], comm: Communicator) -> None:
    """Synchronous data-parallel step: average ``.grad`` over ranks, one collective per dtype.

    A missing gradient counts as zero, as in DDP. One extra element per parameter carries "this rank had a
    gradient", so a parameter that no rank touched keeps ``grad=None`` (the optimizer then skips it) while
    one that some rank touched gets a gradient on every rank: replicas stay identical.
    """
    with torch.no_grad():
        for group in _grouped_by_layout(params):
            members = [params[i] for i in group]
            parts = [p.grad.reshape(-1) if p.grad is not None else p.new_zeros(p.numel()) for p in members]
            flags = torch.tensor(
                [float(p.grad is not None) for p in members], dtype=members[0].dtype, device=members[0].device
            )
            flat = torch.cat([*parts, flags])
            comm.all_reduce_mean_([flat])
            offset = 0
            for p in members:
                averaged = flat[offset : offset + p.numel()].view_as(p)
                offset += p.numel()
                if p.grad is not None:
                    p.grad.copy_(averaged)
                else:
                    p.grad = averaged.clone()
            touched = flat[offset:]
            for p, flag in zip(members, touched.tolist()):
                if flag == 0.0:
                    p.grad = None
