"""What every entry point (Lightning's Trainer, Fabric, a plain PyTorch loop) does around the algorithm's moments.

The algorithm (:class:`~lightning_localsgd.algorithms.periodic.PeriodicAlgorithm`) is the same object whichever
loop drives it; these helpers are the few steps of glue that would otherwise be written once per entry point: an
optimizer step under an optional fp16 grad scaler, the per-rank state a checkpoint holds, the metrics to log.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Callable, Optional, TypeVar

import torch
from torch.optim import Optimizer

from lightning_localsgd.algorithms.gossip import GossipAlgorithm
from lightning_localsgd.algorithms.periodic import PeriodicAlgorithm
from lightning_localsgd.strategies.checkpointing import (
    restore_rng_states,
    to_device,
    without_replica_if_in_sync,
    without_shared_state,
)

T = TypeVar("T")


def step_and_follow(
    algorithm: PeriodicAlgorithm, optimizer: Optimizer, run_step: Callable[[], T], scaler: Optional[Any]
) -> tuple[T, bool]:
    """Run ``run_step`` (which steps ``optimizer``, through ``scaler`` if given) and the algorithm's after-step moment.

    Returns the step's output and whether the step counts towards the algorithm's schedule. An fp16 grad scaler that
    found inf gradients skips ``optimizer.step()`` and lowers its scale. In warm-up (gradients averaged, so every
    rank skips alike) such a step does not count. In the local phase it still counts, because the round schedule must
    stay identical on every rank, and the algorithm's own part still runs as for a zero direction (VRL-SGD's
    correction and learning-rate sum, which every rank must share for sum_i Delta_i = 0).
    """
    scale_before = scaler.get_scale() if scaler is not None else None
    output = run_step()
    skipped = scaler is not None and scale_before is not None and scaler.get_scale() < scale_before
    if skipped and algorithm.in_warmup():
        return output, False
    algorithm.after_optimizer_step(optimizer)
    return output, True


def exchanges_every_step(algorithm: PeriodicAlgorithm) -> bool:
    """Whether the replicas exchange something at every local step (gossip, compressed gradients), rounds or not."""
    return algorithm.exchanges_every_step or isinstance(algorithm, GossipAlgorithm)


def comm_metrics(algorithm: PeriodicAlgorithm) -> dict[str, float]:
    """What a logger gets: ``comm/rounds``, ``comm/mb_sent``, ``comm/seconds``, ... and the algorithm's own values
    (the per-step exchange counters only for algorithms that exchange at every step: for the others they stay 0)."""
    if not algorithm.is_set_up:
        return {}
    return {**algorithm.comm.stats.as_metrics(exchanges=exchanges_every_step(algorithm)), **algorithm.metrics()}


def rank_payload(
    algorithm: PeriodicAlgorithm,
    optimizers: Sequence[Optimizer],
    scaler: Optional[Any],
    drop_replica: bool,
    copy: bool = True,
    optimizers_in_main_file: bool = False,
    shared_in_rank_0: bool = False,
) -> dict[str, Any]:
    """This rank's own state for a checkpoint: algorithm (with its replica unless ``drop_replica`` and in sync, when
    the checkpoint's weights are that replica), every optimizer's state and the grad scaler's.

    ``copy=False``: the live tensors, for a payload written before training goes on (a checkpoint shard): no copy
    of the model or its state. ``optimizers_in_main_file``: the optimizer states are left out (``None``), because
    the checkpoint's main file holds this very rank's (rank 0 of a Lightning checkpoint): not written twice.
    ``shared_in_rank_0``: the algorithm's state that every rank holds alike is left to rank 0's shard (a rank other
    than 0 of a sharded checkpoint)."""
    state = algorithm.state_dict(copy=copy)
    if drop_replica:
        state = without_replica_if_in_sync(state)
    if shared_in_rank_0:
        state = without_shared_state(state, algorithm.shared_state_keys)
    return {
        "algorithm": state,
        "optimizer_states": None if optimizers_in_main_file else [optimizer.state_dict() for optimizer in optimizers],
        "grad_scaler": scaler.state_dict() if scaler is not None else None,
    }


def restore_rank_payload(
    state: dict[str, Any],
    algorithm: PeriodicAlgorithm,
    optimizers: Sequence[Optimizer],
    scaler: Optional[Any],
    device: torch.device,
) -> None:
    """Undo :func:`rank_payload` on this rank (and restore the random generators if the payload holds them). Where
    the payload holds no optimizer states, the optimizers keep what they were given from the main file."""
    saved = state["optimizer_states"]
    if saved is not None and len(saved) != len(optimizers):
        raise ValueError(
            f"The checkpoint holds the state of {len(saved)} optimizer(s); this run set up {len(optimizers)}. Resume "
            "with the same optimizers, set up in the same order."
        )
    for optimizer, optimizer_state in zip(optimizers, saved or []):
        optimizer.load_state_dict(optimizer_state)  # this rank's own momentum, not rank 0's
    algorithm.load_state_dict(to_device(state["algorithm"], device))
    if scaler is not None and state.get("grad_scaler"):
        scaler.load_state_dict(state["grad_scaler"])  # this rank's own scale: its overflows were its own
    if state.get("rng") is not None:
        restore_rng_states(state["rng"])
