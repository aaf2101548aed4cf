"""What every synchronisation point does before anything is averaged: agree, then raise or roll back.

The one small flag collective of a synchronisation point (see ``guard.agree``) tells every rank whether some
rank's contribution is non-finite, whether all ranks are at the same point, which signal requests were raised,
and whether the values that must be identical on every rank are (learning rates, the trainable set). With
``on_nonfinite="skip_round"`` a :class:`RollbackPoint` is kept at every good round; a bad round sends every rank
back to it.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Literal, Optional

from torch import Tensor

from lightning_localsgd._validation import check_choice
from lightning_localsgd.algorithms.frames import HeaderCapacity, HeaderPayload, agree_in_frames
from lightning_localsgd.algorithms.guard import (
    ON_NONFINITE_CHOICES,
    REQUESTS,
    ROUND,
    SYNC_POINT_KINDS,
    Finite,
    Verdict,
    agree,
    flag_vector,
    nonfinite_error,
    out_of_step_error,
    position,
    read_verdict,
)
from lightning_localsgd.errors import RanksDisagreeError

if TYPE_CHECKING:
    from lightning_localsgd.algorithms.periodic import PeriodicAlgorithm
    from lightning_localsgd.comm import Communicator

ResumeWith = Literal["round", "local_phase"]


@dataclass
class RollbackPoint:
    """Every rank's state at the last good round, and what the algorithm did right after it was kept."""

    state: dict[str, Any]  # the algorithm's state_dict
    optimizer_states: list[dict[str, Any]]
    resume_with: ResumeWith  # "round": a round followed; "local_phase": the local phase began


@dataclass
class DeferredCheck:
    """A round's flag vector being summed in the background, and what to name in an error."""

    flags: Tensor
    wait: Callable[[], None]
    where: str
    step: int
    width: int  # fingerprint slots
    finite: bool  # this rank's own flag


FINGERPRINT_NAMES = ("learning rates", "trainable parameters", "server error")  # slot 2: LIEC-SGD only


def disagreement_error(label: str, where: str, fingerprints: list[tuple[float, ...]]) -> RanksDisagreeError:
    width = min(len(FINGERPRINT_NAMES), *(len(f) for f in fingerprints))
    slot = next(s for s in range(width) if len({f[s] for f in fingerprints}) > 1)
    what = FINGERPRINT_NAMES[slot]
    groups: dict[float, list[int]] = {}
    for rank, f in enumerate(fingerprints):
        groups.setdefault(f[slot], []).append(rank)
    # The ranks that differ from rank 0's value, named, so the odd one out is found without reading checksums.
    odd = [rank for rank, f in enumerate(fingerprints) if f[slot] != fingerprints[0][slot]]
    advice = {
        "learning rates": "a scheduler stepped on some ranks only, or `ReduceLROnPlateau` monitors a metric logged "
        "without `sync_dist=True` (each rank then decides alone). Log the monitored metric with `sync_dist=True`",
        "trainable parameters": "a layer was frozen or unfrozen on some ranks only. Change `requires_grad` on every "
        "rank at the same step (e.g. in a callback hook that every rank runs)",
        "server error": "every rank computes LIEC-SGD's server step itself and must get the same bits; a rank whose "
        "server error differs ran different code or libraries, a non-deterministic compressor or kernel, or "
        "loaded another checkpoint. Run the same versions everywhere and resume every rank from the same checkpoint",
    }[what]
    return RanksDisagreeError(
        f"{label}: the ranks disagree on their {what} at {where}: ranks {odd} differ from rank 0 (ranks with equal "
        f"values: {list(groups.values())}): {advice}. Nothing was averaged. Fingerprints by rank: "
        f"{[f[slot] for f in fingerprints]}."
    )


class SyncGuard:
    """The guard's half of :class:`~lightning_localsgd.algorithms.periodic.PeriodicAlgorithm` (a mixin)."""

    def _init_guard(self) -> None:
        self.on_nonfinite = "raise"
        self.gradients_may_overflow = False  # a grad scaler handles inf gradients itself (fp16 AMP)
        self.requests_pending: set[str] = set()  # raised here (e.g. by a signal), sent at the next sync point
        self.agreed_requests: set[str] = set()  # raised by some rank: every rank acts on them at the same step
        self.rounds_rolled_back = 0
        self._rollback_point: Optional[RollbackPoint] = None
        self._deferred_check: Optional[DeferredCheck] = None  # a round's flags in flight (see _start_deferred_check)
        self._guard_comm: Optional[Communicator] = None
        # The payload room in every flag collective's frames (``frames.HeaderCapacity``; 0: the flags go alone, in an
        # all-reduce). An algorithm that sends a step's first payload with its flags sets it once, alike everywhere.
        self.header_capacity: HeaderCapacity = 0

    @property
    def guard_comm(self: PeriodicAlgorithm) -> Communicator:
        """Whom the flags of a synchronisation point go to: the algorithm's ranks, or every rank of the world where
        the algorithm runs over some of them (replica groups: each shard's ranks average alone, but a non-finite
        shard, a stop request or a rank out of step must stop every rank of every group alike)."""
        return self._guard_comm if self._guard_comm is not None else self.comm

    def set_guard_communicator(self, comm: Optional[Communicator]) -> None:
        """Agree at synchronisation points over ``comm`` (a superset of the algorithm's ranks; None: its own)."""
        self._guard_comm = comm

    def set_nonfinite_policy(self, policy: str) -> None:
        """``"raise"``: stop with :class:`~lightning_localsgd.errors.NonFiniteError` naming the rank and step.
        ``"skip_round"``: every rank returns to its state at the last good round (replica, optimizer and
        algorithm state; one extra copy of each is kept) and training goes on; a warm-up step whose gradients
        are non-finite is dropped on every rank."""
        self.on_nonfinite = check_choice("on_nonfinite", policy, ON_NONFINITE_CHOICES)

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

    def _agree(self: PeriodicAlgorithm, finite: Finite, step: int, kind: int, where: str) -> list[int]:
        """The one flag collective of a synchronisation point: returns the ranks whose contribution is non-finite.
        ``finite`` may still be on the device: the verdict's read is then the point's only host sync."""
        return self._agree_carrying(finite, step, kind, where, None)[0]

    def _agree_carrying(
        self: PeriodicAlgorithm, finite: Finite, step: int, kind: int, where: str, payload: HeaderPayload
    ) -> tuple[list[int], list[Tensor]]:
        """:meth:`_agree`, with ``payload`` (uint8: one for every rank, one per rank, or None) carried in the same
        collective where the algorithm sends frames (``header_capacity``, see ``frames.agree_in_frames``): returns
        the non-finite ranks and the payload areas received (empty without frames). Read them only once the verdict
        is known."""
        comm, device, fingerprint = self.guard_comm, self.flat.buckets[0].device, self._fingerprint()
        if self.header_capacity == 0:
            verdict = agree(comm, finite, position(step, kind), self.requests_pending, device, fingerprint)
            areas: list[Tensor] = []
        else:
            flags = flag_vector(comm, finite, position(step, kind), self.requests_pending, device, fingerprint)
            summed, areas = agree_in_frames(comm, flags, payload, self.header_capacity)
            verdict = read_verdict(summed, comm.world_size, len(fingerprint))
        self.requests_pending = set()
        return self._accept(verdict, where), areas

    def _accept(self, verdict: Verdict, where: str) -> list[int]:
        """Raise if the ranks are out of step or disagree; take the agreed requests; return the non-finite ranks."""
        label = getattr(self, "label", type(self).__name__)
        if len(set(verdict.positions)) > 1:
            raise out_of_step_error(label, verdict.positions, where)
        if len(set(verdict.fingerprints)) > 1:
            raise disagreement_error(label, where, verdict.fingerprints)
        self.agreed_requests |= verdict.requests
        return verdict.nonfinite_ranks

    # ------------------------------------------------------------------ the check carried by a round's transfer
    def _start_deferred_check(self: PeriodicAlgorithm, where: str, step: int) -> DeferredCheck:
        """A round whose result is applied one round late: its flags (finiteness of this replica, position,
        fingerprint, requests) are summed in the background, started before the round's transfer, and judged by
        :meth:`_judge_deferred_check` before anything the transfer brought is used. Wire-compatible with
        :meth:`_agree`: a rank at a blocking check at that point pairs with it and sees these flags. The caller
        keeps the returned check pending once the round's own work (which settles earlier transfers) is done."""
        assert self.header_capacity == 0, "a deferred check sums its flags in an all-reduce, not in frames"
        fingerprint = self._fingerprint()
        finite = self._contribution_is_finite()
        flags = flag_vector(
            self.guard_comm,
            finite,
            position(step, ROUND),
            self.requests_pending,
            self.flat.buckets[0].device,
            fingerprint,
        )
        self.requests_pending = set()  # on their way: agreed when the flags are judged
        wait = self.guard_comm.start_all_reduce_sum_in_order_(flags)
        return DeferredCheck(flags, wait, where, step, len(fingerprint), finite)

    def _judge_deferred_check(self: PeriodicAlgorithm) -> None:
        """Wait for the pending round's flags and act on them: raise (naming that round) if a rank was non-finite,
        out of step or disagreeing; take the requests raised anywhere, for every rank to act on now."""
        check, self._deferred_check = self._deferred_check, None
        if check is None:
            return
        check.wait()
        bad = self._accept(read_verdict(check.flags, self.guard_comm.world_size, check.width), check.where)
        if bad:
            raise nonfinite_error(self.label, check.where, "parameters", bad, check.step)

    def _check_replicas(self: PeriodicAlgorithm, where: str, step: int, kind: int) -> bool:
        """Agree on the replicas' finiteness before averaging them. Raises, or rolls every rank back to the last
        good round (``on_nonfinite="skip_round"``) and returns True."""
        bad = self._agree(self._contribution_finite_flag(), step, kind, where)
        if not bad:
            return False
        point = self._rollback_point
        if self.on_nonfinite == "raise" or point is None:
            raise nonfinite_error(self.label, where, "parameters", bad, step)
        self._warn_skipped(bad, where, step, "every rank went back to its state at the last good round")
        schedule, stats = self.schedule.state_dict(), self.comm.stats.state_dict()
        self.load_state_dict(point.state)
        self.schedule.load_state_dict(schedule)  # the schedule goes on; only the model goes back
        self.in_sync = False
        self.comm.stats.load_state_dict(stats)
        for optimizer, saved in zip(self._optimizers, point.optimizer_states):
            optimizer.load_state_dict(copy.deepcopy(saved))  # a copy: the point may be needed again
        self.rounds_rolled_back += 1
        return True

    def _keep_rollback_point(self: PeriodicAlgorithm, resume_with: ResumeWith) -> None:
        if self.on_nonfinite != "skip_round":
            return
        optimizer_states = [copy.deepcopy(optimizer.state_dict()) for optimizer in self._optimizers]
        self._rollback_point = RollbackPoint(self.state_dict(), optimizer_states, resume_with)

    def _rolled_back_resume(self: PeriodicAlgorithm) -> None:
        # The point was kept just before a round (which the caller is about to run) or before the local phase
        # began (run that first; a round after zero local steps changes nothing).
        assert self._rollback_point is not None
        if self._rollback_point.resume_with == "local_phase":
            self._begin_local_phase()

    def _redo_after_rollback(self: PeriodicAlgorithm) -> None:
        """After a rollback outside a round: redo what followed the kept point, so replicas are as after that round."""
        self._rolled_back_resume()
        assert self._rollback_point is not None
        if self._rollback_point.resume_with == "round":
            self._round()
            self.in_sync = self.rounds_synchronise
        else:
            self.in_sync = True  # the point was kept where the replicas agreed, before local steps began

    def _warn_skipped(self, ranks: list[int], where: str, step: int, outcome: str) -> None:
        label = getattr(self, "label", type(self).__name__)
        warnings.warn(
            f"{label}: rank(s) {ranks} held inf/NaN values at {where} (step {step}); {outcome} "
            "(`on_nonfinite='skip_round'`).",
            RuntimeWarning,
            stacklevel=3,
        )


__all__ = ["FINGERPRINT_NAMES", "SYNC_POINT_KINDS", "RollbackPoint", "SyncGuard", "disagreement_error"]
