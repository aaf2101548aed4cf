"""Gradient averaging that overlaps with backward: one non-blocking all-reduce per bucket, started during backward.

Synchronous SGD steps (post-local SGD's warm-up, and any algorithm that exchanges gradients every step) need
the mean gradient before ``optimizer.step()``. Averaging after the whole backward (:func:`average_gradients`)
leaves the link idle while backward runs and the processor idle while the gradients travel. As DDP's reducer
does, :class:`GradientAverager` groups the parameters into buckets in reverse order (backward produces the last
layers' gradients first) and starts each bucket's all-reduce as soon as backward has accumulated all of its
gradients, so the transfers run under the rest of backward.

A training step (every rank alike)::

    averager.arm()            # before the backward whose gradients the optimizer steps on (the last micro-batch's)
    loss.backward()           # buckets are launched as their gradients are accumulated
    averager.finish()         # before optimizer.step(): every p.grad holds the mean over ranks
    optimizer.step()

or ``averager.discard()`` instead of ``finish()`` to drop the exchange (each rank keeps its own gradients).

Semantics are :func:`average_gradients`'s: a missing gradient counts as zero, and one extra element per
parameter carries "this rank had a gradient" (:func:`gradient_flags`), so a parameter that no rank touched keeps
``grad=None`` while one that some rank touched gets the same gradient on every rank. The per-step exchanges of
compressed gradients agree on the same flags with :func:`agreed_gradient_flags` before they compress.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any, Optional

import torch
from torch import Tensor, nn

from lightning_localsgd._validation import check_positive_float
from lightning_localsgd.comm.communicator import Communicator, PendingAllReduce
from lightning_localsgd.comm.flat import DEFAULT_BUCKET_CAP_MB


def gradient_flags(params: Sequence[nn.Parameter], dtype: torch.dtype, device: torch.device) -> Tensor:
    """This rank's "had a gradient" flags, one element per parameter: 1 where ``p.grad`` exists, else 0. Summed or
    averaged over the ranks, a flag is 0 exactly where no rank had a gradient."""
    flags = torch.ones(len(params), dtype=dtype, device=device)  # on the device: no host-to-device copy
    for i, p in enumerate(params):
        if p.grad is None:
            flags[i] = 0.0
    return flags


def agreed_gradient_flags(params: Sequence[nn.Parameter], comm: Communicator) -> list[bool]:
    """For each parameter, whether any rank holds a gradient for it: one small all-reduce of
    :func:`gradient_flags`, the same answer on every rank. Every rank calls it with the same parameters."""
    if not params:
        return []
    flags = gradient_flags(params, torch.float32, params[0].device)
    comm.all_reduce_sum_([flags])
    return [flag > 0 for flag in flags.tolist()]


def _read_flags(flags: Sequence[Tensor]) -> list[list[float]]:
    """Every bucket's flags, read on the host together: one sync per device for all buckets, not one per bucket."""
    by_device: dict[torch.device, list[int]] = {}
    for i, f in enumerate(flags):
        by_device.setdefault(f.device, []).append(i)
    out: list[list[float]] = [[] for _ in flags]
    for members in by_device.values():
        values = torch.cat([flags[i].float() for i in members]).tolist()
        for i in members:
            out[i], values = values[: flags[i].numel()], values[flags[i].numel() :]
    return out


class _Bucket:
    """Parameters of one (device, dtype) whose gradients travel together, and the buffer they travel in."""

    __slots__ = ("buffer", "flags", "launched", "missing", "params", "pending", "seen", "views")

    def __init__(self, params: list[nn.Parameter]) -> None:
        self.params = params
        numel = sum(p.numel() for p in params)
        # The gradients, then one "this rank had a gradient" flag per parameter: a single collective carries both.
        self.buffer = torch.zeros(numel + len(params), dtype=params[0].dtype, device=params[0].device)
        self.views: list[Tensor] = []
        offset = 0
        for p in params:
            self.views.append(self.buffer[offset : offset + p.numel()])
            offset += p.numel()
        self.flags = self.buffer[offset:]
        self.seen = [False] * len(params)  # gradient accumulated during the armed backward
        self.missing = len(params)
        self.launched = False
        self.pending: Optional[PendingAllReduce] = None

    def reset(self) -> None:
        self.seen = [False] * len(self.params)
        self.missing = len(self.params)
        self.launched = False
        self.pending = None


class GradientAverager:
    """Average ``.grad`` over ranks with one non-blocking all-reduce per bucket, launched during backward.

    Args:
        params: the parameters whose gradients to average, in a deterministic order (the same on every rank);
            tied duplicates are dropped. Each must require a gradient.
        comm: the communicator; transfers go through :meth:`Communicator.start_all_reduce_mean_` (its own
            process group on a real communicator; collectives, bytes and wait seconds are counted in its stats).
        bucket_cap_mb: largest bucket in MiB (flags not counted); a larger parameter gets a bucket of its own.
            Smaller buckets start earlier in backward but cost more collectives; DDP's default is 25.

    Buckets hold one (device, dtype) each and follow the reverse parameter order. They are launched in bucket
    order on every rank, whatever order their gradients become ready in, so that the collectives pair up
    across ranks. Between :meth:`arm` and :meth:`finish`, do not modify gradients (clip after :meth:`finish`).
    """

    def __init__(
        self, params: Sequence[nn.Parameter], comm: Communicator, bucket_cap_mb: float = DEFAULT_BUCKET_CAP_MB
    ) -> None:
        self.params: list[nn.Parameter] = list(dict.fromkeys(params))
        if not self.params:
            raise ValueError("GradientAverager got no parameters: pass the parameters whose gradients to average.")
        frozen = [i for i, p in enumerate(self.params) if not p.requires_grad]
        if frozen:
            raise ValueError(
                f"Parameters {frozen} do not require a gradient, so they never get one to average: pass only "
                "trainable parameters (`[p for p in module.parameters() if p.requires_grad]`)."
            )
        self.comm = comm
        self.bucket_cap_mb = check_positive_float("bucket_cap_mb", bucket_cap_mb)
        self._buckets = [_Bucket([self.params[i] for i in members]) for members in self._assign_buckets()]
        # Parameter index -> (bucket index, position in the bucket).
        self._where: dict[int, tuple[int, int]] = {}
        index_of = {id(p): i for i, p in enumerate(self.params)}
        for b, bucket in enumerate(self._buckets):
            for slot, p in enumerate(bucket.params):
                self._where[index_of[id(p)]] = (b, slot)
        self._armed = False
        self._next_launch = 0  # buckets [0, _next_launch) are launched this step
        self._lock = threading.Lock()  # hooks may run on autograd's device threads
        self._active = comm.world_size > 1  # a single rank already holds the mean
        self._handles: list[Any] = []
        if self._active:
            comm.prepare_non_blocking()  # here, where every rank is, not in a hook during backward
            self._handles = [p.register_post_accumulate_grad_hook(self._hook_for(i)) for i, p in enumerate(self.params)]

    # ------------------------------------------------------------------ layout
    def _assign_buckets(self) -> list[list[int]]:
        """Parameter indices per bucket: reverse parameter order, one (device, dtype) per bucket, capped in size."""
        cap_bytes = int(self.bucket_cap_mb * 2**20)
        done: list[tuple[int, list[int]]] = []  # (position in reverse order of the first member, members)
        open_buckets: dict[tuple[str, torch.dtype], tuple[int, list[int], int]] = {}  # key -> (first, members, bytes)
        for position, i in enumerate(reversed(range(len(self.params)))):
            p = self.params[i]
            key = (str(p.device), p.dtype)
            nbytes = p.numel() * p.element_size()
            current = open_buckets.get(key)
            if current is not None and current[2] + nbytes > cap_bytes:
                done.append(current[:2])
                current = None
            if current is None:
                current = (position, [], 0)
            current[1].append(i)
            open_buckets[key] = (current[0], current[1], current[2] + nbytes)
        done.extend(current[:2] for current in open_buckets.values())
        return [members for _, members in sorted(done, key=lambda d: d[0])]

    @property
    def bucket_members(self) -> list[list[int]]:
        """Indices into :attr:`params` of each bucket's parameters, in bucket (launch) order."""
        index_of = {id(p): i for i, p in enumerate(self.params)}
        return [[index_of[id(p)] for p in bucket.params] for bucket in self._buckets]

    @property
    def num_buckets(self) -> int:
        return len(self._buckets)

    @property
    def launched_buckets(self) -> int:
        """Buckets whose all-reduce has started since the last :meth:`arm` (0 on a single rank)."""
        return self._next_launch

    @property
    def armed(self) -> bool:
        return self._armed

    # ------------------------------------------------------------------ the moments of a step
    def arm(self) -> None:
        """The next backward produces the gradients the optimizer will step on: launch buckets as they are ready."""
        with self._lock:
            if self._next_launch > 0:
                raise RuntimeError(
                    f"GradientAverager.arm() was called with {self._next_launch} of {len(self._buckets)} buckets of "
                    "the previous exchange still in flight: call finish() (or discard()) after each armed backward."
                )
            for bucket in self._buckets:
                bucket.reset()  # an earlier armed backward that launched nothing does not count
            self._armed = True

    def launch_pending(self) -> None:
        """Launch every bucket not launched yet, in bucket order; a parameter without a gradient counts as zero."""
        with self._lock:
            if not self._active:
                return
            while self._next_launch < len(self._buckets):
                self._launch_next()

    def finish(self) -> None:
        """Launch what is left, wait for every bucket and write the mean over ranks into each ``p.grad``; disarm.

        A parameter that no rank gave a gradient keeps ``grad=None``; one that some rank did gets the mean
        (missing gradients counting as zero) on every rank.
        """
        try:
            self.launch_pending()
            if not self._active:
                return
            with torch.no_grad():
                for bucket in self._buckets:
                    assert bucket.pending is not None
                    bucket.pending.wait()
                for bucket, touched in zip(self._buckets, _read_flags([b.flags for b in self._buckets])):
                    self._unpack(bucket, touched)
        finally:
            self._reset()

    def discard(self) -> None:
        """Drop this step's exchange and keep each rank's own ``.grad`` untouched; disarm.

        If armed (or partly launched), the rest is launched and everything is waited for: ranks may have launched
        different numbers of buckets during backward, and every bucket must pair with its peers before the next
        exchange starts. Unarmed with nothing launched, nothing is sent. Every rank must call it at the same step.
        """
        try:
            if self._armed or self._next_launch > 0:
                self.launch_pending()
            for bucket in self._buckets:
                if bucket.pending is not None:
                    bucket.pending.wait()
        finally:
            self._reset()

    def close(self) -> None:
        """Remove the gradient hooks (after :meth:`finish` or :meth:`discard`); the averager is unusable afterwards."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._active = False
        self._reset()

    # ------------------------------------------------------------------ internals
    def _hook_for(self, index: int) -> Any:
        def hook(param: Tensor) -> None:
            if self._armed:  # unarmed (an accumulation micro-batch): nothing to do, cheaply
                self._mark_ready(index)

        return hook

    def _mark_ready(self, index: int) -> None:
        b, slot = self._where[index]
        with self._lock:
            bucket = self._buckets[b]
            if bucket.launched:
                raise RuntimeError(
                    f"The gradient of parameter {index} was accumulated again after its bucket ({b}) was sent: a "
                    "second backward ran while the GradientAverager was armed. Call arm() right before the last "
                    "backward of the step only, and finish() before the next one."
                )
            if not bucket.seen[slot]:
                bucket.seen[slot] = True
                bucket.missing -= 1
            # Bucket order on every rank: a ready bucket waits for the ones before it.
            while self._next_launch < len(self._buckets) and self._buckets[self._next_launch].missing == 0:
                self._launch_next()

    def _launch_next(self) -> None:
        bucket = self._buckets[self._next_launch]
        self._pack(bucket)
        bucket.launched = True
        bucket.pending = self.comm.start_all_reduce_mean_(bucket.buffer)
        self._next_launch += 1

    @staticmethod
    def _pack(bucket: _Bucket) -> None:
        with torch.no_grad():
            # Flags written on the device: built on the host, they would be a blocking copy on CUDA in a backward hook.
            bucket.flags.fill_(1.0)
            for i, (p, view) in enumerate(zip(bucket.params, bucket.views)):
                grad = p.grad
                if grad is None:
                    view.zero_()
                    bucket.flags[i] = 0.0
                    continue
                if grad.layout != torch.strided:
                    raise RuntimeError(
                        f"A parameter of shape {tuple(p.shape)} has a {grad.layout} gradient; GradientAverager "
                        "averages dense gradients only (use `sparse=False` in nn.Embedding / EmbeddingBag)."
                    )
                view.copy_(grad.reshape(-1))

    @staticmethod
    def _unpack(bucket: _Bucket, touched: list[float]) -> None:
        for p, view, flag in zip(bucket.params, bucket.views, touched):
            if flag == 0.0:
                p.grad = None  # no rank had a gradient: the optimizer skips it everywhere
            elif p.grad is not None:
                p.grad.copy_(view.view_as(p))
            else:
                p.grad = view.view_as(p).clone()  # the buffer is reused next step

    def _reset(self) -> None:
        with self._lock:
            for bucket in self._buckets:
                bucket.reset()
            self._next_launch = 0
            self._armed = False
