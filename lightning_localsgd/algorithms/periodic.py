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

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Optional

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from lightning_localsgd._validation import check_bool, check_int, check_positive_float
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

    # ------------------------------------------------------------------ set-up
    def setup(self, module: nn.Module, comm: Communicator, optimizers: Sequence[Optimizer] = ()) -> None:
        """Bind to this rank's replica: re-home its trainable parameters and start every rank from rank 0's model."""
        self._module = module
        self._comm = comm
        self.step = 0  # a new run; resuming restores the count through `load_state_dict`
        trainable = [p for p in module.parameters() if p.requires_grad]
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
            self._begin_local_phase()

    def register_optimizers(self, optimizers: Sequence[Optimizer]) -> None:
        """Tell the algorithm which optimizers exist, in a fixed order (their index keys per-optimizer state)."""
        self._optimizers = list(optimizers)

    def _on_setup(self) -> None:
        """Allocate algorithm state once the flat parameters exist."""

    def _begin_local_phase(self) -> None:
        """The replicas are in sync and local steps are about to begin (after set-up or warm-up)."""

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
        if self.in_warmup():
            average_gradients(self._managed_params_of(optimizer), self.comm)

    def after_optimizer_step(self, optimizer: Optimizer) -> None:
        """Right after ``optimizer.step()``. Local SGD does nothing here."""

    def end_step(self) -> bool:
        """Count one training step; average the replicas if the schedule says so. Returns True on a round."""
        step = self.step
        self.step += 1
        if step < self.warmup_steps:
            # The gradients were averaged; bring BatchNorm statistics along, as DDP's buffer broadcast would.
            average_float_buffers(self.module, self.comm)
            self.comm.stats.rounds += 1
            self.in_sync = True
            if self.step == self.warmup_steps:
                self._begin_local_phase()
            return True
        if self.is_round_after(step):
            self.flat.ensure_views()
            self._round()
            self.comm.stats.rounds += 1
            self.in_sync = self.rounds_synchronise
            return True
        self.in_sync = False
        return False

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
        self.flat.ensure_views()
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
        self._settle_in_flight()
        if self._local_backup is not None:
            self._local_backup = None  # the module already holds the average
        elif not self.in_sync:
            with torch.no_grad():
                self.comm.all_reduce_mean_(self.flat.buckets)
                average_float_buffers(self.module, self.comm)
        self.in_sync = True

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
