"""The machinery every "local steps, then synchronise" algorithm shares: its moments in a training step.

An algorithm instance belongs to one rank. It owns that rank's replica bookkeeping and talks to the
other ranks only through a :class:`~lightning_localsgd.comm.Communicator`. The training loop (Lightning,
Fabric, plain PyTorch or simulated workers) drives it through these moments:

0. :meth:`before_backward` before the backward whose gradients an optimizer will step on (lets a synchronous
   step average gradients bucket by bucket while backward runs);
1. :meth:`before_optimizer_step` after backward, before each optimizer's ``step``;
2. :meth:`after_optimizer_step` right after each optimizer's ``step`` (also when a grad scaler skipped it);
3. :meth:`end_step` once per training step in which any optimizer stepped (never per micro-batch,
   never once per optimizer): counts the step and synchronises when the schedule says so;
4. :meth:`enter_consensus` / :meth:`exit_consensus` around evaluation and checkpoint weights, and
   :meth:`finalize` at the end of training.

Concerns live in their own modules: the schedule (``schedule.py``), which buffers are averaged
(``buffers.py``), averaging itself (``averaging.py``), optimizer groups (``param_groups.py``), the guard at
every synchronisation point (``sync_guard.py``), per-rank state and checkpoints (``rank_state.py``), the
per-step gradient exchange (``gradient_exchange.py``) and the managed parameter set (``managed_set.py``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import timedelta
from typing import Optional

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from lightning_localsgd._validation import check_positive_float
from lightning_localsgd.algorithms.averaging import (
    average_module_,
    average_replica_,
    broadcast_module_state_,
    mean_packed_,
)
from lightning_localsgd.algorithms.buffers import BufferSelection, averaged_buffers, check_buffer_selection
from lightning_localsgd.algorithms.gradient_exchange import GradientExchange
from lightning_localsgd.algorithms.guard import (
    CONSENSUS,
    FINAL,
    ROUND,
    Finite,
    failures_named,
    finite_flag,
)
from lightning_localsgd.algorithms.late_buffers import LateBufferAverage
from lightning_localsgd.algorithms.managed_set import ManagedSet
from lightning_localsgd.algorithms.param_groups import ParamGroupMap
from lightning_localsgd.algorithms.profiling import phase
from lightning_localsgd.algorithms.rank_state import RankState
from lightning_localsgd.algorithms.schedule import PeriodicSchedule
from lightning_localsgd.algorithms.sync_guard import SyncGuard
from lightning_localsgd.comm import Communicator, FlatParameters
from lightning_localsgd.comm.communicator import PendingAllGather, PendingAllReduce
from lightning_localsgd.comm.flat import DEFAULT_BUCKET_CAP_MB
from lightning_localsgd.comm.layout import WorldLayout
from lightning_localsgd.comm.local_shards import LocalShards


class PeriodicAlgorithm(GradientExchange, ManagedSet, SyncGuard, RankState):
    """Local steps with a parameter average every ``period`` optimizer steps (Local SGD's skeleton).

    Subclasses change what a round does (:meth:`_round`), may start work when local steps begin
    (:meth:`_begin_local_phase`), declare their per-rank buffers (:meth:`_declare_state_buffers`) and declare
    with :attr:`rounds_synchronise` whether replicas agree after a round. Non-blocking work in flight is
    settled by :meth:`_settle_in_flight` before state is read.

    Args:
        period: optimizer steps between two rounds (H, k or tau in the papers).
        warmup_steps: initial optimizer steps run as synchronous SGD (gradients averaged every step).
        first_period_one_step: see :class:`~lightning_localsgd.algorithms.schedule.PeriodicSchedule`.
        bucket_cap_mb: size of the flat buckets parameters are stored in; one collective per bucket.
        buffers: which buffers are averaged with the replicas: ``"norm"`` (default: normalisation running
            statistics), ``"all"`` floating-point buffers, ``"none"``, a regular expression on the buffer's
            qualified name, or a predicate ``(name, buffer) -> bool``. The others stay each rank's own.
    """

    rounds_synchronise: bool = True  # after a round every replica holds the same model
    # True: a round's result is applied one round late (Overlap Local-SGD, CoCoD-SGD, DiLoCo's delayed outer step),
    # so its guard can travel with its transfer instead of meeting the other ranks before the round.
    applies_rounds_late: bool = False
    # Keys of ``state_dict`` that hold the same bits on every rank (DiLoCo's global model and outer optimizer): a
    # checkpoint stores them once, in rank 0's shard, and every rank reads them from there.
    shared_state_keys: tuple[str, ...] = ()
    # Steps before a round at which that round's transfer starts (Streaming DiLoCo's sync delay): at the end of
    # step ``s`` with a round after step ``s + round_lead_steps``, :meth:`_start_round_ahead` runs. 0: none.
    round_lead_steps: int = 0
    # Why the algorithm cannot run on the local shards of an FSDP2 module (``shard_size > 1``); None: it can, as a
    # round only averages each shard over the ranks that hold the same shard, and a local step needs nothing more.
    sharding_refused_because: Optional[str] = None

    def __init__(
        self,
        period: int,
        warmup_steps: int = 0,
        first_period_one_step: bool = False,
        bucket_cap_mb: float = DEFAULT_BUCKET_CAP_MB,
        buffers: BufferSelection = None,
    ) -> None:
        self.schedule = PeriodicSchedule(period, warmup_steps, first_period_one_step)
        self.bucket_cap_mb = check_positive_float("bucket_cap_mb", bucket_cap_mb)
        self.buffers = check_buffer_selection(buffers)
        self.in_sync = True  # every replica holds the same model
        self._module: Optional[nn.Module] = None
        self._comm: Optional[Communicator] = None
        self._flat: Optional[FlatParameters] = None
        self._optimizers: list[Optimizer] = []
        self._groups = ParamGroupMap()
        self._local_backup: Optional[tuple[list[Tensor], list[Tensor]]] = None
        self._in_flight: list[PendingAllReduce | PendingAllGather] = []  # non-blocking transfers started by a round
        self._late_buffers = LateBufferAverage()  # averaged buffers travelling with those transfers
        self._withholding = False  # this round's replica is non-finite: its transfers send zeros (see _start_transfers)
        # Copies of the model that others keep and update from this rank's replica (EMA / SWA callbacks): each
        # is averaged before it is used, which for these linear averages equals averaging the consensus.
        self.shadow_modules: list[nn.Module] = []
        self._shadows_stale = False
        self.label = type(self).__name__  # names the run in error messages
        self.timeout: Optional[timedelta] = None  # the collectives' timeout, quoted in error messages
        self._skip_step = False  # this step's gradients were non-finite and were dropped on every rank
        self._init_gradient_exchange()
        self._init_guard()
        self._init_rank_state()

    # ------------------------------------------------------------------ the schedule, as attributes
    @property
    def period(self) -> int:
        return self.schedule.period

    @property
    def warmup_steps(self) -> int:
        return self.schedule.warmup_steps

    @property
    def first_period_one_step(self) -> bool:
        return self.schedule.first_period_one_step

    @property
    def step(self) -> int:
        """Training steps completed (warm-up included)."""
        return self.schedule.step

    @property
    def rounds(self) -> int:
        """Rounds of the local phase completed (warm-up steps are not rounds)."""
        return self.schedule.rounds

    def in_warmup(self) -> bool:
        return self.schedule.in_warmup()

    def is_round_after(self, step: int) -> bool:
        return self.schedule.is_round_after(step)

    def step_synchronises(self) -> bool:
        return self.schedule.step_synchronises()

    # ------------------------------------------------------------------ set-up
    def setup(self, module: nn.Module, comm: Communicator, optimizers: Sequence[Optimizer] = ()) -> None:
        """Bind to this rank's replica: start every rank from rank 0's model and re-home the trainable parameters.

        Called again with the same module (a second ``fit``), it continues from the state the first left:
        schedule, replicas, algorithm state and communicator stay; only the optimizers are registered anew.
        """
        if self._flat is not None and module is self._module:
            self.flat.ensure_views()
            self.register_optimizers(optimizers)
            return
        self._module = module
        self._comm = comm
        self.schedule.reset()  # a new run; resuming restores the schedule via `load_state_dict`
        trainable = self._trainable()
        if not trainable:
            raise ValueError(f"{self.label}: the model has no trainable parameters; there is nothing to average.")
        with failures_named(self.label, "set-up", self.timeout):
            self._check_same_model_on_every_rank(module, trainable)
            broadcast_module_state_(module, comm, src=0)
            self._flat = self._build_flat(trainable)
            self.in_sync = True
            self._allocate_state()
            self._on_setup()
            self.register_optimizers(optimizers)
            if self.warmup_steps == 0:
                self._start_local_phase()

    def create_groups(self, layout: WorldLayout, timeout: timedelta) -> None:
        """Collective, once, after the process group started and before :meth:`setup`: create the process groups
        the algorithm needs beyond its communicator's (none here; hierarchical Local SGD's per-node groups)."""

    def register_optimizers(self, optimizers: Sequence[Optimizer]) -> None:
        """Tell the algorithm which optimizers exist, in a fixed order (their index keys per-optimizer state)."""
        self._optimizers = list(optimizers)

    def _build_flat(self, params: list[nn.Parameter]) -> FlatParameters:
        """The managed parameters' buckets: re-homed into flat storage, or left in place where the module is this
        rank's shards of an FSDP2 module (FSDP2 owns that memory; see ``comm/local_shards.py``)."""
        shards = self.module if isinstance(self.module, LocalShards) else None
        return FlatParameters(
            params,
            self.bucket_cap_mb,
            self._fragment_of(params),
            in_place=shards is not None,
            aliases=shards.aliases if shards is not None else None,
        )

    def _fragment_of(self, params: list[nn.Parameter]) -> Optional[dict[int, int]]:
        """``id(parameter) -> fragment`` for algorithms that synchronise parts of the model at different rounds
        (no bucket then spans two fragments; ``FlatParameters.bucket_fragments``); None: the model is one."""
        return None

    def _on_setup(self) -> None:
        """Set up algorithm state beyond the declared buffers, once the flat parameters exist."""

    def _begin_local_phase(self) -> None:
        """The replicas are in sync and local steps are about to begin (after set-up or warm-up)."""

    def _begin_stage(self) -> None:
        """A stage of a stagewise schedule (STL-SGD) ended with the round just held; the next begins."""

    def _start_local_phase(self) -> None:
        self._close_gradient_averagers()  # no per-step gradient exchange from now on: no hooks left behind
        self._keep_rollback_point("local_phase")
        self._begin_local_phase()

    def _start_transfers(self, tensors: Sequence[Tensor]) -> None:
        """Start averaging ``tensors`` in place in the background; read them only after :meth:`_settle_in_flight`.

        For the algorithms that apply a round one round late. The averaged buffers travel with ``tensors`` instead of
        meeting the other ranks in a blocking collective: the average that came with the previous transfer (settled
        by now) is applied first, then this rank's buffers are sent (``late_buffers.py``).

        A rank whose replica a deferred check is about to report as non-finite sends zeros instead of its payload:
        no inf/NaN crosses the wire, and every rank stops before reading what arrived (the flags are judged first).
        """
        assert not self._in_flight, "settle the previous transfer before starting the next"
        buffers = self.averaged_buffers()
        self._late_buffers.land_(buffers)
        tensors = [*tensors, *self._late_buffers.start(buffers)]
        if self._withholding:
            for tensor in tensors:
                tensor.zero_()
        self._in_flight = [self.comm.start_all_reduce_mean_(tensor) for tensor in tensors]

    def _settle_in_flight(self) -> None:
        """Finish the non-blocking collectives in flight; their results stay in the buffers they wrote. The flags
        of a deferred check are judged first: nothing a bad round sent is read."""
        self._judge_deferred_check()
        for pending in self._in_flight:
            pending.wait()
        self._in_flight = []

    def _trainable(self) -> list[nn.Parameter]:
        return list(dict.fromkeys(p for p in self.module.parameters() if p.requires_grad))

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

    def averaged_buffers(self) -> list[Tensor]:
        """The buffers averaged with the replicas (see ``buffers=``), in a deterministic order."""
        return [b for _, b in averaged_buffers(self.module, self.buffers)]

    # ------------------------------------------------------------------ moments of a training step
    def after_optimizer_step(self, optimizer: Optimizer) -> None:
        """Right after ``optimizer.step()``, also when a grad scaler skipped it. Local SGD does nothing here."""

    def end_step(self) -> bool:
        """Count one training step; average the replicas if the schedule says so. Returns True on a round."""
        if self._skip_step:  # non-finite warm-up gradients were dropped: no step happened
            self._skip_step = False
            return False
        step = self.step
        self.schedule.step += 1
        self._shadows_stale = True
        if step < self.warmup_steps:
            with failures_named(self.label, f"warm-up step {step}", self.timeout), phase("warmup/buffers"):
                # The gradients were averaged; bring BatchNorm statistics along, as DDP's buffer broadcast would.
                mean_packed_(self.averaged_buffers(), self.comm)
                self.comm.stats.rounds += 1
                self.in_sync = True
                if self.step == self.warmup_steps:
                    self._start_local_phase()
            return True
        if self.is_round_after(step):
            where = f"round {self.rounds + 1}"
            with failures_named(self.label, where, self.timeout):
                self.flat.ensure_views()
                # The previous round's transfer first: on a real link the flag collective below would queue
                # behind it, waiting out of sight of the wait-time metric.
                with phase("round/settle"):
                    self._settle_in_flight()  # judges the previous round's deferred check, if any
                if self._defers_round_check():
                    self._with_deferred_check(where, step, self._round, "round/update")
                else:
                    with phase("round/guard"):
                        if self._check_replicas(where, step, ROUND):
                            self._rolled_back_resume()  # back at the last good round; that round's work follows
                        self._follow_managed_set()
                    with phase("round/rollback_point"):
                        self._keep_rollback_point("round")
                    with phase("round/update"):
                        self._round()
            new_stage = self.schedule.round_held()
            self.comm.stats.rounds += 1
            if new_stage:
                self._begin_stage()
            self.in_sync = self.rounds_synchronise
            return True
        if self.round_lead_steps and self.is_round_after(step + self.round_lead_steps):
            self._round_ahead(step)
        self.in_sync = False
        return False

    def _round_ahead(self, step: int) -> None:
        """The next round's transfer, started ``round_lead_steps`` steps early. Its guard travels with it: the
        flags (finiteness of this replica, position, fingerprint) are summed in the background and judged when the
        round settles the transfer, before anything it brought is read; a non-finite rank sends zeros."""
        where = f"round {self.rounds + 1} (its transfer, started {self.round_lead_steps} step(s) early)"
        with failures_named(self.label, where, self.timeout):
            self.flat.ensure_views()
            with phase("round/settle"):
                self._settle_in_flight()
            self._with_deferred_check(where, step, self._start_round_ahead, "round/start")

    def _with_deferred_check(self, where: str, step: int, start: Callable[[], None], label: str) -> None:
        """Run ``start`` (which starts a transfer) with this replica's flags summed in the background: started first,
        so they complete first; a non-finite rank's transfer sends zeros; judged by the next settle, before anything
        the transfer brought is read."""
        with phase("round/guard"):
            check = self._start_deferred_check(where, step)
        with phase(label):
            self._withholding = not check.finite
            try:
                start()
            finally:
                self._withholding = False
        self._deferred_check = check

    def _start_round_ahead(self) -> None:
        """Start the next round's transfer (see :attr:`round_lead_steps`); the round itself reads what it brought."""

    def _defers_round_check(self) -> bool:
        """Whether this round's guard travels with its transfer (checked one round later) instead of blocking.

        Only for rounds applied one round late, and not under ``on_nonfinite="skip_round"`` (its rollback points
        assume the check came before the round), nor when the trainable set changed (re-bucketing is collective:
        the ranks must agree first; a rank taking the blocking check pairs with the others' deferred flags).
        """
        return self.applies_rounds_late and self.on_nonfinite == "raise" and not self._managed_set_changed()

    def _round(self) -> None:
        """One synchronisation: x_i <- mean_j x_j for parameters and averaged buffers."""
        average_replica_(self.flat.buckets, self.averaged_buffers(), self.comm)

    def _contribution_is_finite(self) -> bool:
        """Whether what this rank is about to average (its replica and averaged buffers) is finite."""
        return bool(self._contribution_finite_flag())

    def _contribution_finite_flag(self) -> Finite:
        """:meth:`_contribution_is_finite`, left on the device for the flag collective (no host sync of its own)."""
        return finite_flag(self.flat.buckets) & finite_flag(self.averaged_buffers())

    # ------------------------------------------------------------------ consensus
    @property
    def holds_consensus(self) -> bool:
        """True between :meth:`enter_consensus` and :meth:`exit_consensus` when the local model was swapped out."""
        return self._local_backup is not None

    def enter_consensus(self) -> None:
        """Make the module hold the average of the replicas, keeping this rank's own copy aside."""
        if self._local_backup is not None:
            return
        where = "the consensus (evaluation or checkpoint weights)"
        with failures_named(self.label, where, self.timeout), phase("consensus"):
            self._judge_deferred_check()  # a bad round is reported as such, before the consensus's own check
            self._average_shadows()
            if self.in_sync:
                self._follow_managed_set()  # in sync: nothing differs, so nothing to average
                return
            self.flat.ensure_views()
            if self._check_replicas(where, self.step, CONSENSUS):
                self._redo_after_rollback()
                if self.in_sync:
                    return
            self._follow_managed_set()
            buffers = self.averaged_buffers()
            self._local_backup = ([b.clone() for b in self.flat.buckets], [b.clone() for b in buffers])
            average_replica_(self.flat.buckets, buffers, self.comm)

    def consensus_state(self) -> dict[int, Tensor]:
        """The consensus of the managed parameters and averaged buffers, without touching the replica, for a
        checkpoint written at once: by ``id`` of the module's tensor, a fresh tensor holding the average of the
        replicas (one copy of the model, none kept of the replica, which stays as it is). Empty where the module's
        own tensors are the consensus already (in sync, or inside :meth:`enter_consensus`): no copy at all.
        Collective: every rank calls it, with the same checks as :meth:`enter_consensus`."""
        if self._local_backup is not None:
            return {}
        where = "the consensus (checkpoint weights)"
        with failures_named(self.label, where, self.timeout), phase("consensus"):
            self._judge_deferred_check()
            self._average_shadows()
            if self.in_sync:
                self._follow_managed_set()
                return {}
            self.flat.ensure_views()
            if self._check_replicas(where, self.step, CONSENSUS):
                self._redo_after_rollback()
                if self.in_sync:
                    return {}
            self._follow_managed_set()
            buckets = [b.detach().clone() for b in self.flat.buckets]
            buffers = self.averaged_buffers()
            averaged = [b.detach().clone() for b in buffers]
            average_replica_(buckets, averaged, self.comm)
            values = {id(p): view for p, view in zip(self.flat.params, self.flat.views_of(buckets))}
            values.update((id(b), a) for b, a in zip(buffers, averaged))
            return values

    def exit_consensus(self) -> None:
        """Give the module its local replica back (undo :meth:`enter_consensus`)."""
        if self._local_backup is None:
            return
        buckets, buffers = self._local_backup
        self._local_backup = None
        with torch.no_grad():
            for bucket, saved in zip(self.flat.buckets, buckets):
                bucket.copy_(saved)
            for buffer, saved in zip(self.averaged_buffers(), buffers):
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
        """End of training: leave every rank holding the average of the replicas, for good.

        Always averages, even right after a round: callbacks may have written the weights since (an EMA or SWA
        copy swapped in at the end of ``fit``), and the model after ``fit`` must be the same on every rank.
        """
        where = "the final average"
        with failures_named(self.label, where, self.timeout), phase("final"):
            self._settle_in_flight()
            self.flat.ensure_views()
            if self._local_backup is not None:
                self._local_backup = None  # the module already holds the average
            else:
                if self._check_replicas(where, self.step, FINAL):
                    self._redo_after_rollback()
                self._follow_managed_set()
                average_replica_(self.flat.buckets, self.averaged_buffers(), self.comm)
            self._late_buffers.clear()  # every rank holds the average: pending corrections (summing to 0) are moot
            self._average_shadows()
        self.in_sync = True

    def _average_shadows(self) -> None:
        if self._shadows_stale and self.shadow_modules:
            for shadow in self.shadow_modules:
                average_module_(shadow, self.comm)
        self._shadows_stale = False

    def metrics(self) -> dict[str, float]:
        """Algorithm-specific values to log beside the communication counters (none here)."""
        return {}

    # ------------------------------------------------------------------ helpers
    def _optimizer_index(self, optimizer: Optimizer) -> int:
        for index, known in enumerate(self._optimizers):
            if known is optimizer:
                return index
        self._optimizers.append(optimizer)
        return len(self._optimizers) - 1

    def _managed_params_of(self, optimizer: Optimizer) -> list[nn.Parameter]:
        # The managed objects themselves: where the optimizer holds stand-ins (FSDP2's DTensors for local shards),
        # the algorithm works on the parameters it manages.
        managed, params = self.flat.index_of, self.flat.params
        return [params[managed[id(p)]] for group in optimizer.param_groups for p in group["params"] if id(p) in managed]
