"""DiLoCo: Local SGD whose rounds feed an outer optimizer.

Paper: "DiLoCo: Distributed Low-Communication Training of Language Models" (Douillard et al., arXiv 2311.08455).

Update rule, per rank i, with global parameters theta kept apart from the replicas (on the CPU by default):
    x_i <- inner optimizer step on g_i                        every step (the user's optimizer, state local)
    every `period` steps:
        x_mean = mean_j x_j                                   one all-reduce of the model, as Local SGD's round
        pseudo-gradient  delta = theta - x_mean
        theta <- outer optimizer step on theta with gradient delta   (Nesterov SGD, lr 0.7, momentum 0.9 by default)
        x_i <- theta                                          every replica restarts from the global model
Normalisation statistics are averaged at the round, as in Local SGD. With an outer SGD of lr 1 and no momentum,
theta <- theta - (theta - x_mean) = x_mean: Local SGD (tested step for step).

``overlap=True``: a delayed outer step, built like CoCoD-SGD's rounds (this package's own schedule, not the one of
Streaming DiLoCo below). At a round's start each rank keeps its replica
``s_i`` and starts a non-blocking all-reduce of it; the ``period`` inner steps run meanwhile; at the round's end
    theta <- outer step on theta with gradient (theta - mean_j s_j)      (the previous round's progress)
    x_i  <- theta + (x_i - s_i)                                          (keep this round's own progress)
and the next round starts at once. The outer step is one round late and the transfer never blocks; the replicas
never coincide (each keeps its own progress), so evaluation and checkpoints use their average. With an outer SGD
of lr 1 and no momentum this is CoCoD-SGD (tested step for step), normalisation statistics included (they travel
with the transfer, ``late_buffers.py``). Memory: two more copies of the model.

Streaming DiLoCo ("Streaming DiLoCo with overlapping communication", Douillard et al., arXiv 2501.18512),
``fragments=F``, ``sync_delay=tau``, ``merge_alpha=alpha``: the model is cut into F
fragments of whole layers (``fragments.py``), each with its own slice of theta and its own outer optimizer. A round
comes every ``period / F`` steps and synchronises one fragment, in turn, so each is synchronised every ``period``
steps and the link carries 1/F of the model at a time. ``tau`` steps before fragment f's round each rank snapshots
its x_f and starts its all-reduce (non-blocking); at the round, with the mean m_f landed,
    theta_f <- outer step on theta_f with gradient (theta_f - m_f)
    x_f     <- lerp(theta_f, x_f, alpha) = (1 - alpha) theta_f + alpha x_f      (alpha = 0: the global model)
so the last tau local steps of that fragment are kept only in proportion alpha. With ``compressor=`` the
pseudo-gradients theta_f - x_f themselves are compressed and all-gathered (``pseudo_gradients.py``) and the outer
step takes their decoded mean. ``fragments=1, sync_delay=0, merge_alpha=0`` without compressor is the round above,
bit for bit. Normalisation statistics are averaged at every round (with ``sync_delay > 0`` they travel with the
transfer and land one round late, ``late_buffers.py``). ``overlap=True`` is a different schedule: the whole model's
outer step one full period late, every replica keeping its own progress.

theta and the outer optimizer's state are the same on every rank (every rank computes the same outer step from the
same mean), are kept in float32 (or the parameters' wider dtype), and are part of each rank's checkpoint state.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor, nn

from lightning_localsgd._validation import check_bool, check_int, check_unit_interval
from lightning_localsgd.algorithms.averaging import average_replica_, mean_, mean_packed_
from lightning_localsgd.algorithms.buffers import BufferSelection
from lightning_localsgd.algorithms.fragments import split_into_fragments
from lightning_localsgd.algorithms.periodic import PeriodicAlgorithm
from lightning_localsgd.algorithms.precision import in_state_precision, state_copy, write_back
from lightning_localsgd.algorithms.pseudo_gradients import PseudoGradientCodec
from lightning_localsgd.algorithms.rank_state import StateInit
from lightning_localsgd.comm import FlatParameters
from lightning_localsgd.comm.communicator import PendingAllGather
from lightning_localsgd.comm.flat import DEFAULT_BUCKET_CAP_MB

DEFAULT_OUTER_OPTIMIZER = "SGD"
DEFAULT_OUTER_OPTIONS: dict[str, Any] = {"lr": 0.7, "momentum": 0.9, "nesterov": True}
GLOBAL_DEVICES = ("cpu", "device")


def outer_optimizer_class(name: str) -> type[torch.optim.Optimizer]:
    """A ``torch.optim`` optimizer by its class name (``"SGD"``, ``"Adam"``, ``"AdamW"``, ...)."""
    optimizer = getattr(torch.optim, name, None) if isinstance(name, str) else None
    if not (isinstance(optimizer, type) and issubclass(optimizer, torch.optim.Optimizer)):
        raise ValueError(f"`outer_optimizer` must name a torch.optim optimizer such as 'SGD' or 'AdamW', got {name!r}.")
    return optimizer


def check_outer_optimizer(name: str, options: Optional[dict[str, Any]]) -> tuple[str, dict[str, Any]]:
    """Validate the outer optimizer and its keyword arguments now, on a throwaway tensor."""
    optimizer = outer_optimizer_class(name)
    if options is not None and not isinstance(options, dict):
        raise ValueError(f"`outer_optimizer_options` must be a mapping of keyword arguments, got {options!r}.")
    chosen = dict(DEFAULT_OUTER_OPTIONS if options is None and name == DEFAULT_OUTER_OPTIMIZER else options or {})
    try:
        optimizer([torch.zeros(1)], **chosen)
    except (TypeError, ValueError) as error:
        raise ValueError(f"`outer_optimizer_options` {chosen} do not fit torch.optim.{name}: {error}") from error
    return name, chosen


class DiLoCo(PeriodicAlgorithm):
    """DiLoCo and Streaming DiLoCo (see the module docstring).

    Args:
        period: inner steps between two outer steps of each fragment (H; the paper uses 500 on language models).
        outer_optimizer: a ``torch.optim`` class name (default ``"SGD"``).
        outer_optimizer_options: its keyword arguments (default for SGD: lr 0.7, momentum 0.9, Nesterov).
        global_device: where theta and the outer optimizer's state live: ``"cpu"`` (default: no accelerator memory)
            or ``"device"`` (the model's device: faster outer steps on a GPU).
        overlap: the delayed outer step (see the module docstring): the round's transfer runs behind the next
            ``period`` inner steps.
        fragments: F, fragments of whole layers synchronised in turn, one every ``period / F`` steps (a divisor of
            ``period``).
        sync_delay: tau, steps between the start of a fragment's transfer and its outer step (``< period / F``).
        merge_alpha: alpha in [0, 1): the share of its own replica a fragment keeps at its outer step.
        compressor: compress the pseudo-gradients (``"int8"``, ``"int4"``, ``"sparse_topk"``, ...; None: the
            replicas are averaged in full precision).
        compressor_options: the compressor's keyword arguments.
        error_feedback: carry what compression dropped to the fragment's next round (default: on for
            ``sparse_topk``).
        error_decay: the carried error's decay per round, in (0, 1] (SparseLoCo: 0.95 with no outer momentum).
        warmup_steps, bucket_cap_mb, buffers: as :class:`PeriodicAlgorithm` (theta starts as the model when the
            local phase starts).
    """

    def __init__(
        self,
        period: int = 100,
        outer_optimizer: str = DEFAULT_OUTER_OPTIMIZER,
        outer_optimizer_options: Optional[dict[str, Any]] = None,
        global_device: str = "cpu",
        overlap: bool = False,
        warmup_steps: int = 0,
        bucket_cap_mb: float = DEFAULT_BUCKET_CAP_MB,
        buffers: BufferSelection = None,
        fragments: int = 1,
        sync_delay: int = 0,
        merge_alpha: float = 0.0,
        compressor: Optional[str] = None,
        compressor_options: Optional[dict[str, Any]] = None,
        error_feedback: Optional[bool] = None,
        error_decay: float = 1.0,
    ) -> None:
        period = check_int("period", period, 1)
        self.fragments = check_int("fragments", fragments, 1)
        if period % self.fragments:
            raise ValueError(
                f"`period={period}` must be a multiple of `fragments={self.fragments}`: a fragment is synchronised "
                "every `period` steps and the fragments take turns every `period / fragments` steps."
            )
        super().__init__(period // self.fragments, warmup_steps, False, bucket_cap_mb, buffers)
        self.outer_period = period  # each fragment's period, H; `self.period` is the rounds' spacing H / F
        self.sync_delay = check_int("sync_delay", sync_delay, 0)
        if self.sync_delay >= self.period:
            raise ValueError(
                f"`sync_delay={self.sync_delay}` must be less than `period / fragments = {self.period}`: a fragment's "
                "transfer must land before the next fragment's starts."
            )
        self.merge_alpha = check_unit_interval("merge_alpha", merge_alpha, include_one=False)
        if compressor is None and (compressor_options is not None or error_feedback or error_decay != 1.0):
            raise ValueError("`compressor_options`, `error_feedback` and `error_decay` need a `compressor`.")
        self.codec = (
            None
            if compressor is None
            else PseudoGradientCodec(compressor, compressor_options, error_feedback, error_decay)
        )
        self.overlap = check_bool("overlap", overlap)
        if self.overlap and self.streaming:
            raise ValueError(
                "`overlap=True` (the whole model's outer step one period late) does not combine with `fragments`, "
                "`sync_delay`, `merge_alpha` or `compressor` (Streaming DiLoCo): choose one of the two schedules."
            )
        self.round_lead_steps = self.sync_delay
        # After a round every replica holds theta, unless fragments are synchronised apart or replicas keep a share.
        self.rounds_synchronise = not self.overlap and self.fragments == 1 and self.merge_alpha == 0
        self.applies_rounds_late = self.overlap
        self.outer_optimizer_name, self.outer_optimizer_options = check_outer_optimizer(
            outer_optimizer, outer_optimizer_options
        )
        if global_device not in GLOBAL_DEVICES:
            raise ValueError(f"`global_device` must be one of {list(GLOBAL_DEVICES)}, got {global_device!r}.")
        self.global_device = global_device
        self.global_params: list[Tensor] = []  # theta, one tensor per bucket (at least float32)
        self.outers: list[torch.optim.Optimizer] = []  # one outer optimizer per fragment
        # A fragment's transfer: started (``sync_delay`` steps before its round, or at it), landed, then applied.
        self._landing: Optional[FragmentLanding] = None

    # theta and its outer optimizer follow the same all-reduced mean on every rank: one copy in a checkpoint.
    shared_state_keys = ("global_params", "outer_optimizer")

    @property
    def streaming(self) -> bool:
        """Whether any Streaming DiLoCo knob is set (fragments, delay, merge or compression)."""
        return self.fragments > 1 or self.sync_delay > 0 or self.merge_alpha > 0 or self.codec is not None

    @property
    def outer(self) -> Optional[torch.optim.Optimizer]:
        """The outer optimizer of a model in one fragment (None before the local phase)."""
        return self.outers[0] if self.outers else None

    def set_nonfinite_policy(self, policy: str) -> None:
        super().set_nonfinite_policy(policy)
        if self.on_nonfinite == "skip_round" and (self.fragments > 1 or self.sync_delay > 0):
            raise ValueError(
                "`on_nonfinite='skip_round'` rolls every rank back to its last good round, which with fragments or "
                "a sync delay would replay another fragment's transfer. Use `on_nonfinite='raise'` (the default)."
            )

    def _fragment_of(self, params: list[nn.Parameter]) -> Optional[dict[int, int]]:
        if self.fragments == 1:
            return None
        names = {id(p): n for n, p in self.module.named_parameters()}
        return split_into_fragments(params, names, self.fragments)

    def _buckets_of(self, fragment: int) -> list[int]:
        return [b for b, f in enumerate(self.flat.bucket_fragments) if f == fragment]

    def _next_fragment(self) -> int:
        """The fragment the next round (or the round being held) synchronises: they take turns."""
        return self.rounds % self.fragments

    def _begin_local_phase(self) -> None:
        """theta <- the model (in sync: after set-up or warm-up), with fresh outer optimizers."""
        device = torch.device("cpu") if self.global_device == "cpu" else self.flat.buckets[0].device
        self.global_params = [
            b.detach().to(device=device, dtype=torch.promote_types(b.dtype, torch.float32), copy=True)
            for b in self.flat.buckets
        ]
        optimizer = outer_optimizer_class(self.outer_optimizer_name)
        self.outers = [
            optimizer([self.global_params[b] for b in self._buckets_of(f)], **self.outer_optimizer_options)
            for f in range(self.fragments)
        ]
        self._landing = None
        if self.overlap:
            self._start_round()

    def _declare_state_buffers(self) -> dict[str, StateInit]:
        state: dict[str, StateInit] = {}
        if self.overlap:  # s_i, and the buffer its mean is all-reduced into (holding the mean once it landed)
            state.update(round_start="params", round_start_mean="params")
        if self.codec is not None and self.codec.error_feedback:
            state["pseudo_gradient_error"] = "zeros"  # float32 for half-precision models
        return state

    def _outer_step(self, fragment: int, means: list[Tensor], deltas: bool = False) -> None:
        """theta_f <- outer optimizer step with the pseudo-gradient theta_f - mean (or ``means`` themselves with
        ``deltas=True``: the decoded mean pseudo-gradients). ``means`` are scratch (the callers overwrite them
        next): one on theta's device in theta's dtype receives the pseudo-gradient itself, so the step holds no
        copy of the model."""
        thetas = [self.global_params[b] for b in self._buckets_of(fragment)]
        for theta, mean in zip(thetas, means):
            if deltas:
                theta.grad = mean.to(theta.device, theta.dtype)
            elif mean.device == theta.device and mean.dtype == theta.dtype:
                theta.grad = torch.sub(theta, mean, out=mean)
            else:  # theta on the CPU, or a half-precision model: one converted copy
                theta.grad = theta - mean.to(theta.device, theta.dtype)
        self.outers[fragment].step()
        for theta in thetas:
            theta.grad = None

    def _round(self) -> None:
        with torch.no_grad():
            if self.overlap:
                self._delayed_round()
            elif self.sync_delay == 0 and self.merge_alpha == 0 and self.codec is None:
                self._fragment_round_in_place(self._next_fragment())  # one fragment: DiLoCo's round
            else:
                self._fragment_round(self._next_fragment())

    def _fragment_round_in_place(self, fragment: int) -> None:
        """The blocking round on one fragment: its buckets averaged in place (normalisation statistics with them),
        the outer step on theta_f - mean, and x_f <- theta_f."""
        indices = self._buckets_of(fragment)
        buckets = [self.flat.buckets[b] for b in indices]
        average_replica_(buckets, self.averaged_buffers(), self.comm)
        self._outer_step(fragment, buckets)
        for b, bucket in zip(indices, buckets):
            bucket.copy_(self.global_params[b])

    def _start_round_ahead(self) -> None:
        with torch.no_grad():
            self._send_fragment(self._next_fragment(), blocking=False)

    def _send_fragment(self, fragment: int, blocking: bool) -> None:
        """Start fragment ``fragment``'s transfer: its replica (or compressed pseudo-gradient) leaves now; the round
        reads what landed. ``blocking``: at the round itself (no sync delay), buffers averaged with it."""
        indices = self._buckets_of(fragment)
        replicas = [self.flat.buckets[b] for b in indices]
        landing = FragmentLanding(fragment)
        if self.codec is None:
            landing.values = [state_copy(x) for x in replicas]  # averaged in float32 for a half-precision model
        else:
            errors = (
                [self.state_buckets("pseudo_gradient_error")[b] for b in indices] if self.codec.error_feedback else []
            )
            payload = self.codec.encode([self.global_params[b] for b in indices], replicas, errors)
        if blocking:
            mean_packed_(self.averaged_buffers(), self.comm)
            if self.codec is None:
                mean_(landing.values, self.comm)
            else:
                landing.payloads = self.comm.all_gather_(payload)
        else:
            self._start_transfers(landing.values)  # zeros if this replica is non-finite; buffers travel along
            if self.codec is not None:
                if self._withholding:
                    payload.zero_()  # nothing non-finite on the wire; the flags stop every rank before reading
                landing.gather = self.comm.start_all_gather_(payload)
                self._in_flight.append(landing.gather)
        self._landing = landing

    def _fragment_round(self, fragment: int) -> None:
        """Fragment ``fragment``'s outer step from what its transfer brought, then the merge."""
        if self._landing is None:  # no sync delay: the transfer starts, and lands, now
            self._send_fragment(fragment, blocking=True)
        self._settle_in_flight()
        landing, self._landing = self._landing, None
        assert landing is not None and landing.fragment == fragment, "a fragment's transfer landed out of turn"
        indices = self._buckets_of(fragment)
        if self.codec is None:
            self._outer_step(fragment, landing.values)
        else:
            payloads = landing.gathered()
            self._outer_step(fragment, self.codec.mean(payloads, [self.flat.buckets[b].numel() for b in indices]), True)
        replicas = [self.flat.buckets[b] for b in indices]
        if self.merge_alpha == 0:
            for b, x in zip(indices, replicas):
                x.copy_(self.global_params[b])
            return
        worked = in_state_precision(replicas)
        for b, x in zip(indices, worked):  # x <- (1 - alpha) theta + alpha x
            x.lerp_(self.global_params[b].to(x.device, x.dtype), 1 - self.merge_alpha)
        write_back(replicas, worked)

    def _delayed_round(self) -> None:
        """``overlap=True``: the previous round's outer step, this round's own progress kept, the next started."""
        self._settle_in_flight()
        starts, means = self.state_buckets("round_start"), self.state_buckets("round_start_mean")
        self._outer_step(0, means)
        worked = in_state_precision(self.flat.buckets)
        for x, start, theta in zip(worked, starts, self.global_params):
            x.sub_(start).add_(theta.to(x.device, x.dtype))  # theta + this round's own progress
        write_back(self.flat.buckets, worked)
        self._start_round()  # normalisation statistics travel with it (late_buffers.py)

    def _start_round(self) -> None:
        """s_i <- x_i, and its all-reduce started; it lands during the next ``period`` inner steps."""
        self._settle_in_flight()
        for start, mean, x in zip(
            self.state_buckets("round_start"), self.state_buckets("round_start_mean"), self.flat.buckets
        ):
            start.copy_(x)
            mean.copy_(x)
        self._start_transfers(self.state_buckets("round_start_mean"))

    def _on_relayout(self, old: FlatParameters) -> None:
        raise ValueError(
            f"{self.label}: the set of trainable parameters changed during fit; DiLoCo's outer optimizer state is laid "
            "out for the set it started with. Freeze or unfreeze layers before `fit`, or start a new `fit`."
        )

    def _extra_state(self) -> dict[str, Any]:
        if not self.outers:  # still in warm-up: theta does not exist yet
            return {}
        outer = [o.state_dict() for o in self.outers]
        state: dict[str, Any] = {"outer_optimizer": outer[0] if self.fragments == 1 else outer}
        if not self._theta_is_the_replica():  # else the replica (or the checkpoint's weights) restores it
            state["global_params"] = [t.detach().cpu() for t in self.global_params]
        if self._landing is not None:  # landed by now (saving settles transfers): read at the fragment's round
            state["fragment_landing"] = self._landing.state_dict()
        return state

    def _theta_is_the_replica(self) -> bool:
        """Right after a blocking round the replica is a copy of theta, bit for bit: stored once, not twice."""
        return not self.overlap and all(
            theta.device == bucket.device and theta.dtype == bucket.dtype and torch.equal(theta, bucket)
            for theta, bucket in zip(self.global_params, self.flat.buckets)
        )

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        if "outer_optimizer" not in state:  # saved in warm-up
            return
        if not self.outers:  # saved after warm-up, loaded into a run that is still set up for it
            self._begin_local_phase()
        saved = state.get("global_params")
        if saved is None:  # saved right after a blocking round: theta is the replica, restored before this
            saved = self.flat.buckets
        if len(saved) != len(self.global_params):
            raise ValueError("The saved DiLoCo state was laid out for another model: resume with the same model.")
        outer = state["outer_optimizer"]
        outer = [outer] if isinstance(outer, dict) else list(outer)
        if len(outer) != self.fragments:
            raise ValueError(
                f"The saved DiLoCo state has {len(outer)} fragment(s) and this run {self.fragments}: resume with the "
                "same `fragments`."
            )
        with torch.no_grad():
            for theta, value in zip(self.global_params, saved):
                theta.copy_(value)
        for optimizer, optimizer_state in zip(self.outers, outer):
            optimizer.load_state_dict(optimizer_state)
        landing = state.get("fragment_landing")
        self._landing = None if landing is None else FragmentLanding.from_state(landing, self.flat.buckets[0].device)


class FragmentLanding:
    """One fragment's transfer: the replicas' mean (full precision) or every rank's payload (compressed)."""

    def __init__(self, fragment: int) -> None:
        self.fragment = fragment
        self.values: list[Tensor] = []  # averaged in place by the all-reduce
        self.payloads: Optional[list[Tensor]] = None  # every rank's, in rank order, once gathered
        self.gather: Optional[PendingAllGather] = None  # the non-blocking all-gather bringing them

    def gathered(self) -> list[Tensor]:
        if self.payloads is None:
            assert self.gather is not None and self.gather.done, "settle the transfer before reading it"
            self.payloads, self.gather = self.gather.wait(), None
        return self.payloads

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"fragment": self.fragment, "values": [v.detach().cpu() for v in self.values]}
        if self.payloads is not None or self.gather is not None:
            state["payloads"] = [p.cpu() for p in self.gathered()]
        return state

    @classmethod
    def from_state(cls, state: dict[str, Any], device: torch.device) -> FragmentLanding:
        landing = cls(int(state["fragment"]))
        landing.values = [v.to(device) for v in state["values"]]
        if "payloads" in state:
            landing.payloads = [p.to(device) for p in state["payloads"]]
        return landing
