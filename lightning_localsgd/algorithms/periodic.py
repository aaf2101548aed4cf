"""The machinery every "local steps, then synchronise" algorithm shares.

An algorithm instance belongs to one rank. It owns that rank's replica bookkeeping and talks to the
other ranks only through a :class:`~lightning_localsgd.comm.Communicator`. The training loop (Lightning,
Fabric, plain PyTorch or simulated workers) drives it through four moments of a training step:

1. :meth:`before_optimizer_step` after backward, before each optimizer's ``step``;
2. :meth:`after_optimizer_step` right after each optimizer's ``step``;
3. :meth:`end_step` once per training step in which any optimizer stepped (never per micro-batch,
   never once per optimizer): counts the step and synchronises when the schedule says so;
4. :meth:`enter_consensus` / :meth:`exit_consensus` around evaluation and checkpoint weights.

Schedule (post-local SGD, "Don't Use Large Mini-Batches, Use Local SGD", arXiv 1808.07217): the first
``warmup_steps`` steps are synchronous data-parallel SGD (gradients averaged before each optimizer step);
after that the replicas step locally and average every ``period`` steps.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import timedelta
from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from lightning_localsgd._validation import check_bool, check_choice, check_int, check_positive_float
from lightning_localsgd.algorithms.guard import (
    CONSENSUS,
    FINAL,
    ON_NONFINITE_CHOICES,
    REQUESTS,
    ROUND,
    WARMUP,
    agree,
    all_finite,
    failures_named,
    nonfinite_error,
    out_of_step_error,
    position,
)
from lightning_localsgd.comm import Communicator, FlatParameters, average_float_buffers, average_gradients
from lightning_localsgd.comm.communicator import PendingAllReduce
from lightning_localsgd.comm.flat import DEFAULT_BUCKET_CAP_MB, float_buffers


class PeriodicAlgorithm:
    """Local steps with a parameter average every ``period`` optimizer steps (Local SGD's skeleton).

    Subclasses change what a round does (:meth:`_round`), may start work when local steps begin
    (:meth:`_begin_local_phase`), and declare with :attr:`rounds_synchronise` whether replicas agree after
    a round. Non-blocking work in flight is settled by :meth:`_settle_in_flight` before state is read.

    Args:
        period: optimizer steps between two rounds (H, k or tau in the papers).
        warmup_steps: initial optimizer steps run as synchronous SGD (gradients averaged every step).
        first_period_one_step: if True, the first round comes right after the first local step and then every
            ``period`` steps (rounds at local steps 1, H+1, 2H+1, ...), the phase of torch's
            ``PeriodicModelAverager``; if False, rounds come after local steps H, 2H, ...
        bucket_cap_mb: size of the flat buckets parameters are stored in; one collective per bucket.
    """

    rounds_synchronise: bool = True  # after a round every replica holds the same model

    def __init__(
        self,
        period: int,
        warmup_steps: int = 0,
        first_period_one_step: bool = False,
        bucket_cap_mb: float = DEFAULT_BUCKET_CAP_MB,
    ) -> None:
        self.period = check_int("period", period, 1)
        self.warmup_steps = check_int("warmup_steps", warmup_steps, 0)
        self.first_period_one_step = check_bool("first_period_one_step", first_period_one_step)
        self.bucket_cap_mb = check_positive_float("bucket_cap_mb", bucket_cap_mb)
        self.step = 0  # training steps completed (a step = one batch in which an optimizer stepped)
        self.in_sync = True  # every replica holds the same model
        self._module: Optional[nn.Module] = None
        self._comm: Optional[Communicator] = None
        self._flat: Optional[FlatParameters] = None
        self._optimizers: list[Optimizer] = []
        self._local_backup: Optional[tuple[list[Tensor], list[Tensor]]] = None
        self._in_flight: list[PendingAllReduce] = []  # non-blocking transfers started by a round
        # Safety (see guard.py): set by the training loop's glue, read at every synchronisation point.
        self.label = type(self).__name__  # names the run in error messages
        self.timeout: Optional[timedelta] = None  # the collectives' timeout, quoted in error messages
        self.on_nonfinite = "raise"
        self.gradients_may_overflow = False  # a grad scaler handles inf gradients itself (fp16 AMP)
        self.requests_pending: set[str] = set()  # raised here (e.g. by a signal), sent at the next sync point
        self.agreed_requests: set[str] = set()  # raised by some rank: every rank acts on them at the same step
        self.rounds_rolled_back = 0
        self._rollback_point: Optional[tuple[dict[str, Any], list[dict[str, Any]], Callable[[], None]]] = None
        self._skip_step = False  # this step's gradients were non-finite and were dropped on every rank

    def set_nonfinite_policy(self, policy: str) -> None:
        """``"raise"``: stop with :class:`~lightning_localsgd.errors.NonFiniteError` naming the rank and step.
        ``"skip_round"``: every rank returns to its state at the last good round (replica, optimizer and
        algorithm state; one extra copy of each is kept) and training goes on; a warm-up step whose gradients
        are non-finite is dropped on every rank."""
        self.on_nonfinite = check_choice("on_nonfinite", policy, ON_NONFINITE_CHOICES)

    # ------------------------------------------------------------------ set-up
    def setup(self, module: nn.Module, comm: Communicator, optimizers: Sequence[Optimizer] = ()) -> None:
        """Bind to this rank's replica: re-home its trainable parameters and start every rank from rank 0's model."""
        self._module = module
        self._comm = comm
        self.step = 0  # a new run; resuming restores the count through `load_state_dict`
        trainable = [p for p in module.parameters() if p.requires_grad]
        if not trainable:
            raise ValueError(f"{self.label}: the model has no trainable parameters; there is nothing to average.")
        with failures_named(self.label, "set-up", self.timeout):
            self._check_same_model_on_every_rank(module, trainable)
            self._flat = FlatParameters(trainable, self.bucket_cap_mb)
            with torch.no_grad():
                comm.broadcast_(self._flat.buckets, src=0)
                buffers = float_buffers(module)
                comm.broadcast_(buffers, src=0)
            self.in_sync = True
            self._on_setup()
            self.register_optimizers(optimizers)
            if self.warmup_steps == 0:
                self._start_local_phase()

    def register_optimizers(self, optimizers: Sequence[Optimizer]) -> None:
        """Tell the algorithm which optimizers exist, in a fixed order (their index keys per-optimizer state)."""
        self._optimizers = list(optimizers)

    def _on_setup(self) -> None:
        """Allocate algorithm state once the flat parameters exist."""

    def _begin_local_phase(self) -> None:
        """The replicas are in sync and local steps are about to begin (after set-up or warm-up)."""

    def _start_local_phase(self) -> None:
        self._keep_rollback_point(self._begin_local_phase)
        self._begin_local_phase()

    def _settle_in_flight(self) -> None:
        """Finish the non-blocking collectives in flight; their results stay in the buffers they wrote."""
        for pending in self._in_flight:
            pending.wait()
        self._in_flight = []

    def _check_same_model_on_every_rank(self, module: nn.Module, trainable: list[nn.Parameter]) -> None:
        # Averaging different parameter sets on different ranks corrupts training silently (torch issue 74157).
        names = {id(p): n for n, p in module.named_parameters()}
        signature = [(names.get(id(p), "?"), tuple(p.shape), str(p.dtype)) for p in trainable]
        everyone = self.comm.all_gather_object(signature)
        for rank, other in enumerate(everyone):
            if other != signature:
                mismatch = next(
                    (f"{a} vs {b}" for a, b in zip(signature, other) if a != b),
                    f"{len(signature)} vs {len(other)} trainable tensors",
                )
                raise ValueError(
                    f"Rank {self.comm.rank} and rank {rank} hold different trainable parameters ({mismatch}). "
                    "Every rank must build the same model and freeze the same parameters before `fit`."
                )

    # ------------------------------------------------------------------ accessors
    @property
    def comm(self) -> Communicator:
        if self._comm is None:
            raise RuntimeError(f"{type(self).__name__} is not set up: call `setup(module, communicator)` first.")
        return self._comm

    @property
    def flat(self) -> FlatParameters:
        if self._flat is None:
            raise RuntimeError(f"{type(self).__name__} is not set up: call `setup(module, communicator)` first.")
        return self._flat

    @property
    def module(self) -> nn.Module:
        assert self._module is not None
        return self._module

    @property
    def is_set_up(self) -> bool:
        return self._flat is not None

    # ------------------------------------------------------------------ schedule
    def in_warmup(self) -> bool:
        """Whether the step now running is a synchronous warm-up step."""
        return self.step < self.warmup_steps

    def is_round_after(self, step: int) -> bool:
        """Whether the replicas are averaged at the end of step ``step`` (0-based, warm-up steps included)."""
        local_index = step - self.warmup_steps
        if local_index < 0:
            return False
        if self.first_period_one_step:
            return local_index % self.period == 0
        return (local_index + 1) % self.period == 0

    def step_synchronises(self) -> bool:
        """Whether the step now running ends with the ranks in sync (warm-up step or round)."""
        return self.in_warmup() or self.is_round_after(self.step)

    # ------------------------------------------------------------------ moments of a training step
    def before_optimizer_step(self, optimizer: Optimizer) -> None:
        """After backward, before ``optimizer.step()``: in warm-up, average the gradients this optimizer will use."""
        if not self.in_warmup():
            return
        params = self._managed_params_of(optimizer)
        where = f"warm-up step {self.step}"
        with failures_named(self.label, where, self.timeout):
            finite = self.gradients_may_overflow or all_finite([p.grad for p in params if p.grad is not None])
            bad = self._agree(finite, self.step, WARMUP, where)
            if bad:
                if self.on_nonfinite == "raise":
                    raise nonfinite_error(self.label, where, "gradients", bad, self.step)
                self._warn_skipped(bad, where, self.step, "its gradients were dropped on every rank")
                for p in params:
                    p.grad = None  # the optimizer skips parameters without a gradient: no update anywhere
                self._skip_step = True
                return
            average_gradients(params, self.comm)

    def after_optimizer_step(self, optimizer: Optimizer) -> None:
        """Right after ``optimizer.step()``. Local SGD does nothing here."""

    def end_step(self) -> bool:
        """Count one training step; average the replicas if the schedule says so. Returns True on a round."""
        if self._skip_step:  # non-finite warm-up gradients were dropped: no step happened
            self._skip_step = False
            return False
        step = self.step
        self.step += 1
        if step < self.warmup_steps:
            with failures_named(self.label, f"warm-up step {step}", self.timeout):
                # The gradients were averaged; bring BatchNorm statistics along, as DDP's buffer broadcast would.
                average_float_buffers(self.module, self.comm)
                self.comm.stats.rounds += 1
                self.in_sync = True
                if self.step == self.warmup_steps:
                    self._start_local_phase()
            return True
        if self.is_round_after(step):
            where = f"round {self.comm.stats.rounds + 1}"
            with failures_named(self.label, where, self.timeout):
                self.flat.ensure_views()
                # The previous round's transfer first: on a real link the flag collective below would queue
                # behind it, waiting out of sight of the wait-time metric.
                self._settle_in_flight()
                if self._check_replicas(where, step, ROUND):
                    self._rolled_back_resume()  # back at the last good round; that round's work follows
                self._keep_rollback_point(self._round)
                self._round()
            self.comm.stats.rounds += 1
            self.in_sync = self.rounds_synchronise
            return True
        self.in_sync = False
        return False

    # ------------------------------------------------------------------ non-finite values and requests
    def _agree(self, finite: bool, step: int, kind: int, where: str) -> list[int]:
        """The one flag collective of a synchronisation point: returns the ranks whose contribution is non-finite."""
        here = position(step, kind)
        verdict = agree(self.comm, finite, here, self.requests_pending, self.flat.buckets[0].device)
        if len(set(verdict.positions)) > 1:
            raise out_of_step_error(self.label, verdict.positions, where)
        self.requests_pending = set()
        self.agreed_requests |= verdict.requests
        return verdict.nonfinite_ranks

    def raise_request(self, name: str) -> None:
        """Ask every rank to act on ``name`` (one of ``guard.REQUESTS``) at the next synchronisation point.

        Safe to call from a signal handler: it only records the request."""
        self.requests_pending.add(check_choice("request", name, REQUESTS))

    def take_agreed_request(self, name: str) -> bool:
        """Whether the ranks agreed on ``name``; consumes it."""
        if name in self.agreed_requests:
            self.agreed_requests.discard(name)
            return True
        return False

    def _contribution_is_finite(self) -> bool:
        """Whether what this rank is about to average (its replica and float buffers) is finite."""
        return all_finite(self.flat.buckets) and all_finite(float_buffers(self.module))

    def _check_replicas(self, where: str, step: int, kind: int) -> bool:
        """Agree on the replicas' finiteness before averaging them. Raises, or rolls every rank back to the last
        good round (``on_nonfinite="skip_round"``) and returns True."""
        bad = self._agree(self._contribution_is_finite(), step, kind, where)
        if not bad:
            return False
        if self.on_nonfinite == "raise" or self._rollback_point is None:
            raise nonfinite_error(self.label, where, "parameters", bad, step)
        self._warn_skipped(bad, where, step, "every rank went back to its state at the last good round")
        state, optimizer_states, _ = self._rollback_point
        current_step, stats = self.step, self.comm.stats.state_dict()
        self.load_state_dict(state)
        self.step, self.in_sync = current_step, False  # the schedule goes on; only the model goes back
        self.comm.stats.load_state_dict(stats)
        for optimizer, saved in zip(self._optimizers, optimizer_states):
            optimizer.load_state_dict(copy.deepcopy(saved))  # a copy: the point may be needed again
        self.rounds_rolled_back += 1
        return True

    def _rolled_back_resume(self) -> None:
        # The point was kept just before a `_round` (which the caller is about to run) or before the local
        # phase began (run that first; a round after zero local steps changes nothing).
        assert self._rollback_point is not None
        if self._rollback_point[2] == self._begin_local_phase:
            self._begin_local_phase()

    def _keep_rollback_point(self, resume: Callable[[], None]) -> None:
        if self.on_nonfinite != "skip_round":
            return
        optimizer_states = [copy.deepcopy(optimizer.state_dict()) for optimizer in self._optimizers]
        self._rollback_point = (self.state_dict(), optimizer_states, resume)

    def _warn_skipped(self, ranks: list[int], where: str, step: int, outcome: str) -> None:
        warnings.warn(
            f"{self.label}: rank(s) {ranks} held inf/NaN values at {where} (step {step}); {outcome} "
            "(`on_nonfinite='skip_round'`).",
            RuntimeWarning,
            stacklevel=3,
        )

    def _round(self) -> None:
        """One synchronisation: x_i <- mean_j x_j for parameters and floating-point buffers."""
        self.comm.all_reduce_mean_(self.flat.buckets)
        average_float_buffers(self.module, self.comm)

    # ------------------------------------------------------------------ consensus
    @property
    def holds_consensus(self) -> bool:
        """True between :meth:`enter_consensus` and :meth:`exit_consensus` when the local model was swapped out."""
        return self._local_backup is not None

    def enter_consensus(self) -> None:
        """Make the module hold the average of the replicas, keeping this rank's own copy aside."""
        if self.in_sync or self._local_backup is not None:
            return
        where = "the consensus (evaluation or checkpoint weights)"
        with failures_named(self.label, where, self.timeout):
            self.flat.ensure_views()
            if self._check_replicas(where, self.step, CONSENSUS):
                self._redo_after_rollback()
                if self.in_sync:
                    return
            buffers = float_buffers(self.module)
            self._local_backup = ([b.clone() for b in self.flat.buckets], [b.clone() for b in buffers])
            with torch.no_grad():
                self.comm.all_reduce_mean_(self.flat.buckets)
                average_float_buffers(self.module, self.comm)

    def exit_consensus(self) -> None:
        """Give the module its local replica back (undo :meth:`enter_consensus`)."""
        if self._local_backup is None:
            return
        buckets, buffers = self._local_backup
        self._local_backup = None
        with torch.no_grad():
            for bucket, saved in zip(self.flat.buckets, buckets):
                bucket.copy_(saved)
            for buffer, saved in zip(float_buffers(self.module), buffers):
                buffer.copy_(saved)

    @contextmanager
    def consensus(self) -> Iterator[None]:
        """Context in which the module holds the average of the replicas."""
        entered = not self.holds_consensus
        self.enter_consensus()
        try:
            yield
        finally:
            if entered:
                self.exit_consensus()

    def finalize(self) -> None:
        """End of training: leave every rank holding the average of the replicas, for good."""
        where = "the final average"
        with failures_named(self.label, where, self.timeout):
            self._settle_in_flight()
            if self._local_backup is not None:
                self._local_backup = None  # the module already holds the average
            elif not self.in_sync:
                if self._check_replicas(where, self.step, FINAL):
                    self._redo_after_rollback()
                with torch.no_grad():
                    self.comm.all_reduce_mean_(self.flat.buckets)
                    average_float_buffers(self.module, self.comm)
        self.in_sync = True

    def _redo_after_rollback(self) -> None:
        """After a rollback outside a round: redo what followed the kept point, so replicas are as after that round."""
        self._rolled_back_resume()
        assert self._rollback_point is not None
        if self._rollback_point[2] == self._round:
            self._round()
            self.in_sync = self.rounds_synchronise
        else:
            self.in_sync = True  # the point was kept where the replicas agreed, before local steps began

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """This rank's state: counters, its own replica (even while the consensus is swapped in), algorithm state.

        A collective still in flight is finished first, so that its result is part of the state.
        """
        self._settle_in_flight()
        if self._local_backup is not None:
            buckets, buffers = self._local_backup
        else:
            buckets, buffers = self.flat.buckets, float_buffers(self.module)
        return {
            "algorithm": type(self).__name__,
            "step": self.step,
            "in_sync": self.in_sync,
            "param_buckets": [b.detach().clone() for b in buckets],
            "float_buffers": [b.detach().clone() for b in buffers],
            "comm_stats": self.comm.stats.state_dict(),
            **self._extra_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("algorithm") != type(self).__name__:
            raise ValueError(
                f"This state was saved by {state.get('algorithm')!r}, not {type(self).__name__!r}: "
                "resume with the same strategy that wrote the checkpoint."
            )
        self.exit_consensus()
        self._settle_in_flight()  # e.g. a transfer started at set-up: every rank started it, every rank ends it
        self.flat.ensure_views()
        _copy_checked("parameter bucket", self.flat.buckets, state["param_buckets"])
        _copy_checked("floating-point buffer", float_buffers(self.module), state["float_buffers"])
        self.step = int(state["step"])
        self.in_sync = bool(state["in_sync"])
        self.comm.stats.load_state_dict(state["comm_stats"])
        self._load_extra_state(state)

    def _extra_state(self) -> dict[str, Any]:
        return {}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        pass

    # ------------------------------------------------------------------ helpers
    def _optimizer_index(self, optimizer: Optimizer) -> int:
        for index, known in enumerate(self._optimizers):
            if known is optimizer:
                return index
        self._optimizers.append(optimizer)
        return len(self._optimizers) - 1

    def _params_by_lr(self) -> list[tuple[float, list[int]]]:
        """Managed parameters grouped by their current learning rate: [(lr, indices into flat.params)].

        Parameters that no registered optimizer steps are grouped under lr 0.
        """
        position = self.flat.index_of
        lr_of: dict[int, float] = {}
        for optimizer in self._optimizers:
            for group in optimizer.param_groups:
                for p in group["params"]:
                    if id(p) in position:
                        lr_of[position[id(p)]] = float(group["lr"])
        groups: dict[float, list[int]] = {}
        for i in range(len(self.flat.params)):
            groups.setdefault(lr_of.get(i, 0.0), []).append(i)
        return list(groups.items())

    def _managed_params_of(self, optimizer: Optimizer) -> list[nn.Parameter]:
        managed = self.flat.index_of
        return [p for group in optimizer.param_groups for p in group["params"] if id(p) in managed]


def _copy_checked(what: str, targets: Sequence[Tensor], sources: Sequence[Tensor]) -> None:
    if len(targets) != len(sources) or any(t.shape != s.shape for t, s in zip(targets, sources)):
        raise ValueError(
            f"The saved {what}s ({[tuple(s.shape) for s in sources]}) do not fit this model's "
            f"({[tuple(t.shape) for t in targets]}): the checkpoint comes from a different model."
        )
    with torch.no_grad():
        for target, source in zip(targets, sources):
            target.copy_(source)
