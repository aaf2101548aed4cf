"""The per-step gradient exchange: synchronous SGD steps (post-local SGD's warm-up), and the local phase of
algorithms that exchange (compressed) gradients at every step (LIEC-SGD, EF-SGD).

Warm-up gradients travel bucket by bucket while backward still runs
(:class:`~lightning_localsgd.comm.GradientAverager`, as DDP's reducer does). Before gradients are used or
compressed, the step's flag collective checks that every rank's local gradients are finite and that the ranks are
at the same point; a bad step is dropped on every rank or stops the run, so an inf/NaN never reaches another rank
or an error buffer. An algorithm with ``exchanges_every_step = True`` then gets its step's gradients as one float32
vector per optimizer (unscaled under a grad scaler) in :meth:`GradientExchange._exchange_gradients` and returns the
direction the optimizer steps on.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Callable, Optional

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from lightning_localsgd.algorithms.guard import EXCHANGE, WARMUP, all_finite, failures_named, nonfinite_error
from lightning_localsgd.algorithms.profiling import phase
from lightning_localsgd.comm import GradientAverager, average_gradients

# Gradient buckets are smaller than parameter buckets: a round wants few large collectives, a synchronous step
# wants the first bucket on its way while backward still runs (DDP starts with 1 MB too). Measured in the lab,
# 1.3 M-parameter MLP over 1 Gbit/s: one 5.3 MB bucket ran at 0.92x Lightning DDP's steps/s, 1 MB buckets at 1.00x.
GRADIENT_BUCKET_CAP_MB = 1.0

if TYPE_CHECKING:
    from lightning_localsgd.algorithms.periodic import PeriodicAlgorithm


def flat_gradients(params: Sequence[nn.Parameter], scale: float = 1.0, dtype: torch.dtype = torch.float32) -> Tensor:
    """The gradients as one vector of ``dtype`` (a missing gradient counts as zero), divided by ``scale``."""
    parts = [p.grad.reshape(-1) if p.grad is not None else p.new_zeros(p.numel()) for p in params]
    flat = torch.cat(parts).to(dtype) if parts else torch.zeros(0, dtype=dtype)
    return flat.div_(scale) if scale != 1.0 else flat


def write_gradients(params: Sequence[nn.Parameter], flat: Tensor, scale: float = 1.0) -> None:
    """Every parameter's ``.grad`` set from ``flat`` (times ``scale``), in the parameter's dtype and layout."""
    offset = 0
    for p in params:
        part = flat[offset : offset + p.numel()].view(p.shape)
        offset += p.numel()
        if scale != 1.0:
            part = part * scale
        if p.grad is None:
            p.grad = torch.empty_like(p)  # the parameter's memory format, as autograd would give
        p.grad.copy_(part)


def flat_slices(views: Sequence[Tensor], indices: Sequence[int]) -> Tensor:
    """Per-parameter state views ``views[i]`` for ``i`` in ``indices`` as one vector (a copy)."""
    parts = [views[i].reshape(-1) for i in indices]
    return torch.cat(parts) if parts else torch.zeros(0)


def write_slices(views: Sequence[Tensor], indices: Sequence[int], flat: Tensor) -> None:
    offset = 0
    for i in indices:
        view = views[i]
        view.copy_(flat[offset : offset + view.numel()].view(view.shape))
        offset += view.numel()


class GradientExchange:
    """The gradient-exchange half of :class:`~lightning_localsgd.algorithms.periodic.PeriodicAlgorithm` (a mixin)."""

    # True: the local phase exchanges gradients at every step through `_exchange_gradients` (LIEC-SGD, EF-SGD).
    exchanges_every_step: bool = False

    def _init_gradient_exchange(self) -> None:
        self._grad_averagers: dict[int, GradientAverager] = {}  # per optimizer index, during warm-up only
        # The grad scaler's current scale under fp16 AMP (gradients are still scaled when the exchange runs):
        # compressors and error buffers work on unscaled gradients, so errors stay in gradient units.
        self.grad_scale: Optional[Callable[[], float]] = None

    def before_backward(self: PeriodicAlgorithm, optimizer: Optimizer) -> None:
        """Before the backward whose gradients ``optimizer`` steps on (not before earlier micro-batches'): in
        warm-up, gradients then travel bucket by bucket while backward still runs, as under DDP."""
        if self.in_warmup():
            self._gradient_averager(optimizer).arm()

    def before_optimizer_step(self: PeriodicAlgorithm, optimizer: Optimizer) -> None:
        """After backward, before ``optimizer.step()``: in warm-up, average the gradients this optimizer will use;
        in the local phase of an algorithm that exchanges gradients every step, exchange them."""
        if self.in_warmup():
            self._average_warmup_gradients(optimizer)
        elif self.exchanges_every_step:
            self._guarded_exchange(optimizer)

    def _exchange_gradients(self: PeriodicAlgorithm, optimizer: Optimizer, indices: list[int], grads: Tensor) -> Tensor:
        """The direction ``optimizer`` steps on, from this rank's finite, unscaled float32 gradients ``grads`` of the
        managed parameters ``flat.params[i]`` for ``i`` in ``indices`` (in that order). Every rank calls it alike."""
        raise NotImplementedError(f"{type(self).__name__} sets `exchanges_every_step` but has no exchange.")

    def _guarded_exchange(self: PeriodicAlgorithm, optimizer: Optimizer) -> None:
        where = f"the gradient exchange of step {self.step}"
        with failures_named(self.label, where, self.timeout), phase("exchange"):
            self.flat.ensure_views()
            scale = float(self.grad_scale()) if self.grad_scale is not None else 1.0
            params = self._managed_params_of(optimizer)
            grads = [p.grad for p in params if p.grad is not None]
            finite = all_finite(grads)
            full = self._full_precision_step()
            if full:  # it averages the parameters too
                finite = finite and self._contribution_is_finite()
            bad = self._agree(finite, self.step, EXCHANGE, where)
            self._follow_managed_set()
            params = self._managed_params_of(optimizer)
            if bad:
                if self.grad_scale is not None:
                    # fp16 AMP: an overflow is the scaler's business. Every rank's scaler must see it, so that all
                    # of them skip this step and lower their scale alike; nothing reaches an error buffer.
                    for p in params:
                        if p.grad is not None:
                            p.grad.fill_(float("nan"))
                    return
                if self.on_nonfinite == "raise":
                    raise nonfinite_error(self.label, where, "gradients", bad, self.step)
                self._warn_skipped(bad, where, self.step, "its gradients were dropped on every rank")
                for p in params:
                    p.grad = None
                self._skip_step = True
                return
            if not params:
                return
            index_of = self.flat.index_of
            indices = [index_of[id(p)] for p in params]
            sent_before = self.comm.stats.bytes_sent
            with torch.no_grad():
                direction = self._exchange_gradients(optimizer, indices, flat_gradients(params, scale))
                write_gradients(params, direction, scale)
            if not full:  # a full-precision step's bytes count with the rounds'
                self.comm.stats.exchanges += 1
                self.comm.stats.exchange_bytes_sent += self.comm.stats.bytes_sent - sent_before

    def _full_precision_step(self) -> bool:
        """Whether this step's exchange is a full-precision round (LIEC-SGD's every p-th step), not a compressed one."""
        return False

    def _average_warmup_gradients(self: PeriodicAlgorithm, optimizer: Optimizer) -> None:
        where = f"warm-up step {self.step}"
        with failures_named(self.label, where, self.timeout), phase("warmup/gradients"):
            averager = self._gradient_averager(optimizer)
            grads = [p.grad for p in self._trainable() if p.grad is not None]
            finite = self.gradients_may_overflow or all_finite(grads)  # local gradients, before they are replaced
            averager.launch_pending()  # every bucket on its way before the flag collective, in the same order
            bad = self._agree(finite, self.step, WARMUP, where)
            if bad or self._managed_set_changed():
                averager.discard()
            else:
                averager.finish()
                return
            self._follow_managed_set()
            params = self._managed_params_of(optimizer)
            if bad:
                if self.on_nonfinite == "raise":
                    raise nonfinite_error(self.label, where, "gradients", bad, self.step)
                self._warn_skipped(bad, where, self.step, "its gradients were dropped on every rank")
                for p in params:
                    p.grad = None  # the optimizer skips parameters without a gradient: no update anywhere
                self._skip_step = True
                return
            average_gradients(params, self.comm)  # the trainable set changed: this step, over the new set

    def _gradient_averager(self: PeriodicAlgorithm, optimizer: Optimizer) -> GradientAverager:
        index = self._optimizer_index(optimizer)
        averager = self._grad_averagers.get(index)
        if averager is None:
            params = self._managed_params_of(optimizer)
            averager = self._grad_averagers[index] = GradientAverager(params, self.comm, GRADIENT_BUCKET_CAP_MB)
        return averager

    def _close_gradient_averagers(self) -> None:
        for averager in self._grad_averagers.values():
            averager.close()
        self._grad_averagers = {}
