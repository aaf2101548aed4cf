"""The per-step gradient exchange: synchronous SGD steps (post-local SGD's warm-up), and the local phase of
algorithms that exchange (compressed) gradients at every step (LIEC-SGD, EF-SGD).

Warm-up gradients travel bucket by bucket while backward still runs
(:class:`~lightning_localsgd.comm.GradientAverager`, as DDP's reducer does). Before gradients are used or
compressed, the step's flag collective checks that every rank's local gradients are finite and that the ranks are
at the same point; a bad step is dropped on every rank or stops the run, so an inf/NaN never reaches another rank
or an error buffer (a compressed algorithm sends its first payload in the same collective, used only where the
verdict allows: ``compressed.py``). An algorithm with ``exchanges_every_step = True`` then exchanges each
optimizer's gradients in :meth:`GradientExchange._exchange_gradients` and leaves in ``.grad`` the direction the
optimizer steps on (the compressed algorithms stream the gradients chunk by chunk, see ``compressed.py``).

Parameters without a gradient are treated as DDP treats them. If any rank lacks a gradient for a parameter it
exchanges, it says so in the flag collective, and the ranks then agree on per-parameter "had a gradient" flags (one
more small all-reduce, :func:`~lightning_localsgd.comm.grad_sync.agreed_gradient_flags`; a step where every rank has
every gradient costs nothing more). A parameter that no rank gave a gradient is left out of the exchange: its
``.grad`` stays ``None``, so the optimizer skips it (no weight decay, no momentum), and its error-feedback state is
not touched. One that some rank gave a gradient is exchanged on every rank, the missing gradients counting as zero,
so every rank steps on it alike. At a full-precision step (LIEC-SGD), a parameter left out whose replicas may differ
(it was stepped since the last full-precision round) has its replicas averaged all the same.

The managed set followed at an exchange is the trainable set, *plus* the managed parameters an optimizer holds
whose ``requires_grad`` is off for now: ``LightningModule.toggle_optimizer`` turns the other optimizers' parameters
off for one optimizer's step (a GAN), and those keep their place and their error-feedback state instead of being
re-bucketed twice a step. A layer really frozen while an optimizer still holds it leaves the managed set at the next
round, which follows ``requires_grad`` alone.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Optional

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from lightning_localsgd.algorithms.frames import header_area_bytes_sent
from lightning_localsgd.algorithms.guard import (
    EXCHANGE,
    GRADIENTS_MISSING,
    WARMUP,
    failures_named,
    finite_flag,
    nonfinite_error,
)
from lightning_localsgd.algorithms.profiling import phase
from lightning_localsgd.comm import GradientAverager, average_gradients
from lightning_localsgd.comm.flat import mean_packed_
from lightning_localsgd.comm.grad_sync import agreed_gradient_flags

# Gradient buckets are smaller than parameter buckets: a round wants few large collectives, a synchronous step
# wants the first bucket on its way while backward still runs (DDP starts with 1 MB too). Measured in the lab,
# 1.3 M-parameter MLP over 1 Gbit/s: one 5.3 MB bucket ran at 0.92x Lightning DDP's steps/s, 1 MB buckets at 1.00x.
GRADIENT_BUCKET_CAP_MB = 1.0

if TYPE_CHECKING:
    from lightning_localsgd.algorithms.compressed import Speculation
    from lightning_localsgd.algorithms.periodic import PeriodicAlgorithm


class GradientExchange:
    """The gradient-exchange half of :class:`~lightning_localsgd.algorithms.periodic.PeriodicAlgorithm` (a mixin)."""

    # True: the local phase exchanges gradients at every step through `_exchange_gradients` (LIEC-SGD, EF-SGD).
    exchanges_every_step: bool = False

    def _init_gradient_exchange(self) -> None:
        # Per optimizer index, during warm-up only: the averager and the parameters it was built over.
        self._grad_averagers: dict[int, GradientAverager] = {}
        self._grad_averager_keys: dict[int, tuple[int, ...]] = {}
        # Parameters (by id) stepped by a compressed exchange since the last full-precision step, for algorithms whose
        # replicas differ between rounds (LIEC-SGD): one left out of a full-precision step is still averaged there.
        self._stepped_since_full: set[int] = set()
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

    def reads_gradients_before_step(self: PeriodicAlgorithm) -> bool:
        """Whether :meth:`before_optimizer_step` reads or writes ``.grad`` at this step (warm-up averages, per-step
        exchanges, STL-SGD's proximal term): where not, a caller that must first show the gradients to the algorithm
        (replica groups' local shards) skips that work."""
        return self.in_warmup() or self.exchanges_every_step

    def _exchange_gradients(
        self: PeriodicAlgorithm, optimizer: Optimizer, params: list[nn.Parameter], indices: list[int], scale: float
    ) -> None:
        """Exchange the finite gradients of ``params`` (the managed parameters ``flat.params[i]`` for ``i`` in
        ``indices``, in that order; a missing gradient counts as zero) and leave in every ``.grad`` the direction
        ``optimizer`` steps on. Gradients are still multiplied by ``scale`` (fp16 AMP's grad scaler): the algorithm
        works on them divided by it and writes the direction multiplied back. Every rank calls it alike."""
        raise NotImplementedError(f"{type(self).__name__} sets `exchanges_every_step` but has no exchange.")

    def _guarded_exchange(self: PeriodicAlgorithm, optimizer: Optimizer) -> None:
        where = f"the gradient exchange of step {self.step}"
        with failures_named(self.label, where, self.timeout), phase("exchange"):
            self.flat.ensure_views()
            scale = float(self.grad_scale()) if self.grad_scale is not None else 1.0
            params = self._managed_params_of(optimizer)
            grads = [p.grad for p in params if p.grad is not None]
            finite = finite_flag(grads)  # on the device: read once, with the flag collective
            full = self._full_precision_step()
            if full:  # it averages the parameters too
                finite = finite & self._contribution_finite_flag()
            if any(p.grad is None for p in self._exchange_candidates(optimizer)):
                self.requests_pending.add(GRADIENTS_MISSING)  # every rank then agrees on per-parameter flags
            # The first chunk's payload, prepared as if nothing were wrong, travels with the flags; it is used only
            # where the verdict shows that today's exchange would have sent exactly it.
            speculation = None if full else self._speculate(optimizer, params, scale)
            bad, areas = self._agree_carrying(
                finite, self.step, EXCHANGE, where, speculation.payload if speculation is not None else None
            )
            some_missing = self.take_agreed_request(GRADIENTS_MISSING)
            self._follow_exchange_set(optimizer)
            params = self._managed_params_of(optimizer)
            if speculation is not None and (bad or not params):
                self._settle_speculation(speculation, None)
                speculation = None
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
            # The payload area of the flags' frame counts with the exchange's bytes; the flags, as elsewhere, do not.
            sent_before = self.comm.stats.bytes_sent - header_area_bytes_sent(self.header_capacity, self.comm)
            managed = params
            if some_missing:
                params = self._drop_untouched(params)
            if speculation is not None:  # kept where the exchange is over the very parameters it was prepared for
                self._settle_speculation(speculation, areas if speculation.params == [id(p) for p in params] else None)
            self._track_stepped(managed, params, full)
            if params:
                index_of = self.flat.index_of
                indices = [index_of[id(p)] for p in params]
                with torch.no_grad():
                    self._exchange_gradients(optimizer, params, indices, scale)
            if not full:  # a full-precision step's bytes count with the rounds'
                self.comm.stats.exchanges += 1
                self.comm.stats.exchange_bytes_sent += self.comm.stats.bytes_sent - sent_before

    def _speculate(
        self: PeriodicAlgorithm, optimizer: Optimizer, params: list[nn.Parameter], scale: float
    ) -> Optional[Speculation]:
        """This step's first payload for ``optimizer``'s managed ``params``, prepared before the flags are agreed so
        that it travels in their frame (algorithms with ``header_capacity > 0``); None: the frame goes empty."""
        return None

    def _settle_speculation(self: PeriodicAlgorithm, speculation: Speculation, areas: Optional[list[Tensor]]) -> None:
        """Keep ``speculation`` for the exchange, with every rank's payload area (``areas``), or drop it (None):
        undo anything preparing it changed (a random compressor's draws)."""

    def _drop_untouched(self: PeriodicAlgorithm, params: list[nn.Parameter]) -> list[nn.Parameter]:
        """The parameters some rank has a gradient for (the ranks agree on the flags: one small all-reduce); the
        others get ``.grad = None`` on every rank, so the optimizer skips them, and stay out of the exchange."""
        touched = agreed_gradient_flags(params, self.comm)
        for p, flag in zip(params, touched):
            if not flag:
                p.grad = None
        return [p for p, flag in zip(params, touched) if flag]

    def _track_stepped(
        self: PeriodicAlgorithm, managed: list[nn.Parameter], exchanged: list[nn.Parameter], full: bool
    ) -> None:
        """Where replicas differ between rounds (LIEC-SGD's immediate errors): remember which parameters compressed
        steps moved; at a full-precision step, average those the exchange leaves out (no gradient anywhere), so the
        step still brings every replica of them together. Parameters never stepped are identical everywhere and are
        left alone, bit for bit."""
        if self.rounds_synchronise:
            return
        if not full:
            self._stepped_since_full.update(id(p) for p in exchanged)
            return
        exchanged_ids = {id(p) for p in exchanged}
        stale = [p for p in managed if id(p) in self._stepped_since_full and id(p) not in exchanged_ids]
        if stale:
            with torch.no_grad():
                mean_packed_([p.data for p in stale], self.comm)
        self._stepped_since_full.difference_update(id(p) for p in managed)

    # ------------------------------------------------------------------ the managed set at an exchange
    def _exchange_set(self: PeriodicAlgorithm, optimizer: Optimizer) -> list[nn.Parameter]:
        """The managed set an exchange follows: the trainable parameters, and the managed ones an optimizer holds
        whose ``requires_grad`` is off for now (``toggle_optimizer``), in the module's order."""
        managed = self.flat.index_of
        held = {id(p) for opt in (*self._optimizers, optimizer) for group in opt.param_groups for p in group["params"]}
        return list(
            dict.fromkeys(
                p for p in self.module.parameters() if p.requires_grad or (id(p) in managed and id(p) in held)
            )
        )

    def _exchange_set_changed(self: PeriodicAlgorithm, optimizer: Optimizer) -> bool:
        return [id(p) for p in self._exchange_set(optimizer)] != [id(p) for p in self.flat.params]

    def _follow_exchange_set(self: PeriodicAlgorithm, optimizer: Optimizer) -> None:
        """Re-bucket at an exchange only if the set changed beyond toggling (after `_agree`: every rank alike)."""
        if self._local_backup is None and self._exchange_set_changed(optimizer):
            self._rebucket(self._exchange_set(optimizer), average_leaving=not self.in_sync)

    def _exchange_candidates(self: PeriodicAlgorithm, optimizer: Optimizer) -> list[nn.Parameter]:
        """``optimizer``'s parameters that its exchange will handle once the set is followed."""
        managed = self.flat.index_of
        return [p for group in optimizer.param_groups for p in group["params"] if p.requires_grad or id(p) in managed]

    def _full_precision_step(self) -> bool:
        """Whether this step's exchange is a full-precision round (LIEC-SGD's every p-th step), not a compressed one."""
        return False

    def _average_warmup_gradients(self: PeriodicAlgorithm, optimizer: Optimizer) -> None:
        where = f"warm-up step {self.step}"
        with failures_named(self.label, where, self.timeout), phase("warmup/gradients"):
            averager = self._gradient_averager(optimizer)
            grads = [p.grad for p in self._trainable() if p.grad is not None]
            finite = self.gradients_may_overflow or finite_flag(grads)  # local gradients, before they are replaced
            averager.launch_pending()  # every bucket on its way before the flag collective, in the same order
            bad = self._agree(finite, self.step, WARMUP, where)
            if bad or self._exchange_set_changed(optimizer):
                averager.discard()
            else:
                averager.finish()
                return
            self._follow_exchange_set(optimizer)
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
        """The warm-up averager of ``optimizer``, over its managed parameters that require a gradient (a managed one
        whose ``requires_grad`` went off keeps its place; the averager is rebuilt around it)."""
        index = self._optimizer_index(optimizer)
        params = [p for p in self._managed_params_of(optimizer) if p.requires_grad]
        key = tuple(id(p) for p in params)
        averager = self._grad_averagers.get(index)
        if averager is not None and self._grad_averager_keys.get(index) != key and not averager.armed:
            averager.close()
            averager = None
        if averager is None:
            averager = self._grad_averagers[index] = GradientAverager(params, self.comm, GRADIENT_BUCKET_CAP_MB)
            self._grad_averager_keys[index] = key
        return averager

    def _close_gradient_averagers(self) -> None:
        for averager in self._grad_averagers.values():
            averager.close()
        self._grad_averagers = {}
        self._grad_averager_keys = {}

    def _stepped_state(self: PeriodicAlgorithm) -> list[str]:
        """The parameters stepped since the last full-precision step, by name (for a checkpoint)."""
        names = {id(p): n for n, p in self.module.named_parameters()}
        return sorted(names[i] for i in self._stepped_since_full if i in names)

    def _load_stepped_state(self: PeriodicAlgorithm, saved: Any) -> None:
        by_name = dict(self.module.named_parameters())
        self._stepped_since_full = {id(by_name[n]) for n in (saved or []) if n in by_name}
