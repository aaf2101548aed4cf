"""Flat, contiguous storage for parameters, and packed collectives for gradients and buffers.

A round must cost one collective per bucket, never one per tensor, and must not copy the model twice.
:class:`FlatParameters` therefore re-homes each trainable parameter into a slice of a few large flat
tensors: averaging a bucket in place averages the parameters themselves, with no copy in or out.
Gradients and floating-point buffers are not re-homed (autograd and modules replace those tensors),
so they are packed into one temporary tensor per dtype for their collective.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from itertools import groupby
from typing import Optional

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


def _is_dense(tensor: Tensor) -> bool:
    """Whether the elements fill exactly ``numel`` consecutive storage slots, in some order of the dimensions.

    Such a tensor (contiguous, ``channels_last``, a transpose...) can live in a flat slice with its strides intact.
    """
    if tensor.numel() == 0:
        return True
    expected = 1
    for size, stride in sorted((d for d in zip(tensor.shape, tensor.stride()) if d[0] != 1), key=lambda d: d[1]):
        if stride != expected:
            return False
        expected *= size
    return True


def _check_one_device(params: Sequence[nn.Parameter]) -> None:
    """A replica must live on one real device: refuse model parallelism within a rank and parameters without data."""
    first_on: dict[str, int] = {}
    for i, p in enumerate(params):
        first_on.setdefault(str(p.device), i)
    seen = ", ".join(
        f"{device} (first: parameter {i}, shape {tuple(params[i].shape)})" for device, i in first_on.items()
    )
    if len(first_on) > 1:
        raise ValueError(
            f"The trainable parameters are on several devices: {seen}. Like DistributedDataParallel, a local-update "
            "strategy needs each rank's replica on a single device (one device per process; no model parallelism "
            "within a rank). Move the whole module to one device (`module.to(device)`) or set `requires_grad=False` "
            "on the parameters that stay elsewhere."
        )
    if "meta" in first_on:
        raise ValueError(
            f"The trainable parameters are on the `meta` device ({seen}): they hold no values to train or average. "
            "Materialise the module first (e.g. `module.to_empty(device=...)`, then initialise or load its weights)."
        )


class FlatParameters:
    """Trainable parameters stored as views into a few contiguous buckets.

    Each parameter keeps the strides it had when this object was built (``channels_last`` stays ``channels_last``),
    and :meth:`views_of` gives views of the same strides, so elementwise operations between parameters and
    bucket-shaped state pair the same elements.

    Args:
        params: the parameters to manage, in a deterministic order (the same on every rank), all on one device
            and each dense in memory (not an expanded or sliced view).
        bucket_cap_mb: largest bucket size in MiB; a single larger parameter gets a bucket of its own.
        fragment_of: ``id(parameter) -> fragment index`` (0, 1, ... in parameter order), for algorithms that
            synchronise parts of the model at different times (Streaming DiLoCo): no bucket holds parameters of two
            fragments, and :attr:`bucket_fragments` says whose each bucket is. Default: one fragment.
        in_place: leave every parameter in its own memory and make each its own bucket (a view of it), instead of
            re-homing: for memory someone else owns, such as FSDP2's local shards (``comm/local_shards.py``). A
            round then costs one collective per parameter.
        aliases: ``id(other tensor) -> id(parameter)``: other objects that stand for a parameter (the ``DTensor``
            an optimizer holds for a local shard); :attr:`index_of` maps them to the parameter's index.
    """

    def __init__(
        self,
        params: Iterable[nn.Parameter],
        bucket_cap_mb: float = DEFAULT_BUCKET_CAP_MB,
        fragment_of: Optional[Mapping[int, int]] = None,
        in_place: bool = False,
        aliases: Optional[Mapping[int, int]] = None,
    ) -> None:
        self.params: list[nn.Parameter] = list(dict.fromkeys(params))  # drop tied duplicates, keep order
        self.index_of: dict[int, int] = {id(p): i for i, p in enumerate(self.params)}  # id(parameter) -> index
        self.in_place = in_place
        for other, param in (aliases or {}).items():
            if param in self.index_of:
                self.index_of[other] = self.index_of[param]
        if not self.params:
            raise ValueError("There are no trainable parameters to synchronise (none has `requires_grad=True`).")
        _check_one_device(self.params)
        for i, p in enumerate(self.params):
            if not _is_dense(p):
                raise ValueError(
                    f"Parameter {i} (shape {tuple(p.shape)}, strides {p.stride()}) is not dense in memory: it is an "
                    "expanded, sliced or otherwise strided view, which a flat bucket cannot hold with its layout. "
                    "Give it storage of its own before training, e.g. `p.data = p.data.contiguous()`."
                )
        # (shape, strides) each parameter is re-homed with; fixed, so that views of state buckets stay element-aligned.
        self.layouts: list[tuple[torch.Size, tuple[int, ...]]] = [(p.shape, p.stride()) for p in self.params]
        # (bucket index, offset) of each parameter; the fragment each bucket belongs to.
        self._slots: list[tuple[int, int]] = [(0, 0)] * len(self.params)
        self.bucket_fragments: list[int] = []
        fragment = [0 if fragment_of is None else fragment_of[id(p)] for p in self.params]
        if in_place:
            self.buckets: list[Tensor] = self._own_buckets(fragment)
        else:
            self.buckets = self._packed_buckets(fragment, int(bucket_cap_mb * 2**20))
        self._expected_ptrs: list[int] = []
        self.rehome()

    def _packed_buckets(self, fragment: list[int], cap_bytes: int) -> list[Tensor]:
        """New flat buckets of at most ``cap_bytes`` (a larger parameter alone), one (device, dtype) and one fragment
        each, in parameter order; the parameters are re-homed into them by :meth:`rehome`."""
        sizes: list[int] = []
        templates: list[Tensor] = []
        for f in sorted(set(fragment)):
            members = [i for i in range(len(self.params)) if fragment[i] == f]
            for group in _grouped_by_layout([self.params[i] for i in members]):
                used_bytes = cap_bytes  # forces a new bucket for each layout group
                for i in (members[j] for j in group):
                    p = self.params[i]
                    nbytes = p.numel() * p.element_size()
                    if used_bytes + nbytes > cap_bytes and used_bytes > 0:
                        sizes.append(0)
                        templates.append(p)
                        self.bucket_fragments.append(f)
                        used_bytes = 0
                    self._slots[i] = (len(sizes) - 1, sizes[-1])
                    sizes[-1] += p.numel()
                    used_bytes += nbytes
        return [torch.empty(n, dtype=t.dtype, device=t.device) for n, t in zip(sizes, templates)]

    def _own_buckets(self, fragment: list[int]) -> list[Tensor]:
        """Each parameter its own bucket: a flat view of its own memory (``in_place``)."""
        for i, p in enumerate(self.params):
            if not p.is_contiguous():
                raise ValueError(f"Parameter {i} must be contiguous to be its own bucket; strides {p.stride()}.")
            self._slots[i] = (i, 0)
        self.bucket_fragments = list(fragment)
        return [p.detach().view(-1) for p in self.params]

    @property
    def numel(self) -> int:
        return sum(b.numel() for b in self.buckets)

    def views_of(self, buckets: Sequence[Tensor]) -> list[Tensor]:
        """Per-parameter views into ``buckets`` (contiguous, same sizes as :attr:`buckets`), in parameter order.

        Each view has its parameter's shape and strides (:attr:`layouts`).
        """
        for i, bucket in enumerate(buckets):
            if not bucket.is_contiguous():
                raise ValueError(
                    f"Bucket {i} must be contiguous to hold parameter views; got strides {bucket.stride()}."
                )
        views = []
        for (shape, stride), (b, offset) in zip(self.layouts, self._slots):
            piece = buckets[b][offset : offset + shape.numel()]
            # as_strided is relative to the slice's own storage offset; a dense layout stays inside the slice.
            views.append(piece.as_strided(shape, stride))
        return views

    def views_in_bucket(self, index: int, buffer: Tensor) -> dict[int, Tensor]:
        """Views into ``buffer`` (laid out as bucket ``index``) of that bucket's parameters, by parameter index."""
        views = {}
        for i, ((shape, stride), (b, offset)) in enumerate(zip(self.layouts, self._slots)):
            if b == index:
                views[i] = buffer[offset : offset + shape.numel()].as_strided(shape, stride)
        return views

    def zeros_like_buckets(self) -> list[Tensor]:
        return [torch.zeros_like(b) for b in self.buckets]

    def rehome(self) -> None:
        """Copy every parameter's current value into its slice and make the parameter a view of it.

        The parameter gets back the layout it had when this object was built, whatever layout its replacement had.
        In place (``in_place=True``), the buckets are the parameters' own memory: there is nothing to copy, and a
        parameter given new memory cannot follow (:meth:`ensure_views` raises).
        """
        if self.in_place:
            self._expected_ptrs = [p.data_ptr() for p in self.params]
            return
        with torch.no_grad():
            for p, view in zip(self.params, self.views_of(self.buckets)):
                view.copy_(p.detach())
                p.data = view
        self._expected_ptrs = [p.data_ptr() for p in self.params]

    def ensure_views(self) -> bool:
        """Re-home parameters whose storage was replaced (``module.to``, ``p.data = ...``). Returns True if it did."""
        intact = all(p.data_ptr() == ptr for p, ptr in zip(self.params, self._expected_ptrs))
        if not intact and self.in_place:
            raise RuntimeError(
                "A parameter's memory was replaced (`module.to(...)`, `p.data = ...`) while the algorithm keeps it in "
                "place (FSDP2's local shards): its state no longer matches the model. Move the module before `fit`."
            )
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


# Averaged in float32 and rounded once: a sum-then-divide in half precision loses the mean's low bits.
LOW_PRECISION = (torch.float16, torch.bfloat16)


def mean_(tensors: Sequence[Tensor], comm: Communicator) -> None:
    """Replace each tensor by its mean over the ranks, one collective per tensor; half precision averaged in float32."""
    if comm.world_size == 1 or not tensors:
        return
    with torch.no_grad():
        work = [t.float() if t.dtype in LOW_PRECISION else t for t in tensors]
        comm.all_reduce_mean_(work)
        for target, result in zip(tensors, work):
            if result is not target:
                target.copy_(result)


def mean_packed_(tensors: Sequence[Tensor], comm: Communicator) -> None:
    """Average many small tensors (buffers, loose parameters) in one collective per (device, dtype)."""
    if comm.world_size == 1 or not tensors:
        return
    with torch.no_grad():
        for group in _grouped_by_layout(tensors):
            members = [tensors[i] for i in group]
            flat = _pack(members)
            mean_([flat], comm)
            _unpack_into(flat, members)


def float_buffers(module: nn.Module) -> list[Tensor]:
    """The module's floating-point buffers (BatchNorm running statistics), in a deterministic order."""
    return [b for _, b in module.named_buffers() if b.is_floating_point()]


def average_float_buffers(module: nn.Module, comm: Communicator) -> None:
    """Average every floating-point buffer over ranks, one collective per dtype.

    Integer buffers (``num_batches_tracked``) are left alone: they count identically on every rank.
    """
    mean_packed_(float_buffers(module), comm)


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
