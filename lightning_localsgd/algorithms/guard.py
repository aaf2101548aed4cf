"""What every synchronisation point checks before anything is averaged, and how failures are named.

One tiny collective per synchronisation point (a round, a warm-up step, a consensus) carries, for every
rank, "my contribution holds inf/NaN" and where it stands, plus one slot per request that all ranks must
act on at the same step ("requeue": checkpoint and requeue, "stop": SIGTERM; raised by a signal on some
ranks, at different moments; "gradients_missing": a rank lacks a parameter's gradient at a gradient exchange).
A non-finite contribution is found *before* it is averaged into every replica, so the other ranks' models and
all algorithm state stay clean. (The compressed strategies send the same flags in frames that also carry a step's
first payload: ``frames.py``.)
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Optional, Union

import torch
import torch.distributed as dist
from torch import Tensor

from lightning_localsgd.comm.communicator import Communicator
from lightning_localsgd.comm.simulated import SimulatedAbortError, SimulatedTimeoutError
from lightning_localsgd.errors import NonFiniteError, OutOfStepError, PeerFailureError

ON_NONFINITE_CHOICES = ("raise", "skip_round")
# "gradients_missing" is the gradient exchange's own: some rank lacks a gradient for a parameter it exchanges, so
# every rank then agrees on the per-parameter flags (gradient_exchange.py); a step without it costs nothing more.
GRADIENTS_MISSING = "gradients_missing"
REQUESTS = ("requeue", "stop", GRADIENTS_MISSING)
# Kinds of synchronisation point; a rank's position is its step and the kind of point it is at.
SYNC_POINT_KINDS = ("round", "warm-up step", "consensus", "final average", "gradient exchange")
ROUND, WARMUP, CONSENSUS, FINAL, EXCHANGE = range(len(SYNC_POINT_KINDS))


def position(step: int, kind: int) -> int:
    return step * len(SYNC_POINT_KINDS) + kind


def out_of_step_error(label: str, positions: list[int], where: str) -> OutOfStepError:
    kinds = len(SYNC_POINT_KINDS)
    described = [f"rank {rank}: {SYNC_POINT_KINDS[p % kinds]} at step {p // kinds}" for rank, p in enumerate(positions)]
    return OutOfStepError(
        f"{label}: the ranks reached different synchronisation points ({'; '.join(described)}), seen at this "
        f"rank's {where}. Their data or control flow differ: give every rank the same number of batches (the "
        "strategy agrees on it for sized data loaders) and take optimizer steps on all ranks alike. Nothing was "
        "averaged."
    )


# A finiteness flag: a host bool, or a 0-dim bool tensor still on the device (read only with the flag collective).
Finite = Union[bool, Tensor]


def finite_flag(tensors: Sequence[Tensor]) -> Finite:
    """Whether every element is finite, as a 0-dim bool tensor on the tensors' device: one read of each tensor and no
    host sync. It travels in the flag collective (:func:`flag_vector`), whose one read tells every rank; on CUDA a
    host read here would stall the stream once more per synchronisation point. ``True`` where nothing is checked.

    A sum is non-finite iff an element is, or the sum overflows float32, which only a diverged model does.
    """
    tensors = [t for t in tensors if t.numel() > 0]
    if not tensors:
        return True
    sums = torch.stack([t.detach().sum(dtype=torch.float32) for t in tensors])
    return torch.isfinite(sums).all()


def all_finite(tensors: Sequence[Tensor]) -> bool:
    """:func:`finite_flag` read on the host (one host sync): for the callers that must decide before any collective."""
    return bool(finite_flag(tensors))


@dataclass
class Verdict:
    """What the ranks agreed on at one synchronisation point."""

    nonfinite_ranks: list[int]
    positions: list[int]  # each rank's synchronisation point, as encoded by the caller
    requests: set[str]  # raised on at least one rank
    fingerprints: list[tuple[float, ...]]  # per rank: values every rank must share (learning rates, trainable set)


def agree(
    comm: Communicator,
    finite: Finite,
    position: int,
    requests: set[str],
    device: torch.device,
    fingerprint: Sequence[float] = (),
) -> Verdict:
    """Every rank's finiteness flag, position and fingerprint, and the requests raised anywhere: one small all-reduce.

    The positions let a rank that reached a different synchronisation point (e.g. its data ran out, so it is
    at the final average while the others are at a round) be found here instead of pairing its collectives
    with the wrong ones, which would average unrelated tensors or hang. The fingerprint carries values that must
    be identical on every rank (e.g. the learning rates summed over the period, the set of trainable parameters):
    a ``ReduceLROnPlateau`` fed an unsynchronised metric, or a layer unfrozen on one rank only, shows up here.
    """
    flags = flag_vector(comm, finite, position, requests, device, fingerprint)
    comm.all_reduce_sum_([flags])
    return read_verdict(flags, comm.world_size, len(fingerprint))


def flag_vector(
    comm: Communicator,
    finite: Finite,
    position: int,
    requests: set[str],
    device: torch.device,
    fingerprint: Sequence[float] = (),
) -> Tensor:
    """This rank's part of the flag all-reduce (its own slots set, the others zero): summed over the ranks, it holds
    every rank's flags. Float64 holds positions and fingerprints exactly (integers below 2**53). The same layout
    whether it is summed blocking (:func:`agree`) or in the background (a deferred check), so the two pair up."""
    world, width = comm.world_size, len(fingerprint)
    flags = torch.zeros((2 + width) * world + len(REQUESTS), dtype=torch.float64, device=device)
    if isinstance(finite, Tensor):
        flags[comm.rank] = ~finite  # written on the device: the flag is read with the others, once
    elif not finite:
        flags[comm.rank] = 1
    flags[world + comm.rank] = position
    for slot, value in enumerate(fingerprint):
        if value:  # the vector starts at zero; each slot written is a kernel launch on a GPU
            flags[(2 + slot) * world + comm.rank] = value
    base = (2 + width) * world
    for slot, name in enumerate(REQUESTS):
        if name in requests:
            flags[base + slot] = 1
    return flags


def read_verdict(flags: Tensor, world: int, width: int) -> Verdict:
    """The verdict in a flag vector summed over the ranks."""
    values = flags.tolist()
    base = (2 + width) * world
    raised = {name for slot, name in enumerate(REQUESTS) if values[base + slot] > 0}
    fingerprints = [tuple(values[(2 + slot) * world + r] for slot in range(width)) for r in range(world)]
    positions = [int(v) for v in values[world : 2 * world]]
    return Verdict([r for r in range(world) if values[r] > 0], positions, raised, fingerprints)


def nonfinite_error(label: str, where: str, what: str, ranks: list[int], step: int) -> NonFiniteError:
    who = f"rank {ranks[0]}" if len(ranks) == 1 else f"ranks {ranks}"
    return NonFiniteError(
        f"{label}: {who} held inf/NaN {what} at {where} (step {step}). Nothing was averaged: the other ranks' "
        "models and the algorithm's state are as they were after the last good round, and so is the last "
        "checkpoint. Lower the learning rate, clip gradients, check that rank's data, or pass "
        "`on_nonfinite='skip_round'` to roll back to the last good round and go on.",
        ranks,
        step,
    )


# What a failed or timed-out collective raises: torch's distributed errors (DistError: the base of DistBackendError,
# e.g. NCCL's watchdog timeout, DistNetworkError and DistStoreError), and the simulated communicator's own (a peer
# failed, or did not arrive in time; its shape-mismatch error is a bug and stays as it is).
_PEER_FAILURE_TYPES = (dist.DistError, SimulatedAbortError, SimulatedTimeoutError)
# gloo reports a dead peer ("Connection reset by peer") or a timeout ("Timed out waiting 15000ms for recv") as a
# plain RuntimeError: only the message tells it from a bug, an out-of-memory or a size mismatch (which gloo also
# reports from its transport code, so the source path alone proves nothing).
_PEER_FAILURE_MESSAGE = re.compile(
    r"connection (reset|closed|refused|aborted)|closed by peer|broken pipe|\btimed? ?out\b|\bsocket", re.IGNORECASE
)


def _is_peer_failure(error: BaseException) -> bool:
    """Whether ``error`` says a collective failed because of another rank or the link (not a bug on this rank)."""
    if isinstance(error, _PEER_FAILURE_TYPES):
        return True
    # Exactly RuntimeError: subclasses (torch.OutOfMemoryError, this package's own errors, ...) are not a peer's doing
    # or are named already.
    return type(error) is RuntimeError and _PEER_FAILURE_MESSAGE.search(str(error)) is not None


@contextmanager
def failures_named(label: str, where: str, timeout: Optional[timedelta]) -> Iterator[None]:
    """Turn a failed or timed-out collective into a :class:`PeerFailureError` that says where it happened.

    Any other error (out of memory, a shape mismatch, a bug) propagates unchanged: calling it a dead peer would
    send the user looking at the wrong rank.
    """
    start = time.monotonic()
    try:
        yield
    except Exception as error:
        if not _is_peer_failure(error):
            raise
        waited = time.monotonic() - start
        limit = f"{timeout.total_seconds():g} s" if timeout is not None else "the process group's timeout"
        raise PeerFailureError(
            f"{label}: a collective at {where} failed after {waited:.1f} s ({error}). A peer rank died, is stuck, "
            f"or the link between ranks broke; collectives wait at most {limit} (the strategy's `collective_timeout` "
            "argument). Restart from the last complete checkpoint (RoundCheckpoint finds it with "
            "`ckpt_path='last'`)."
        ) from error
