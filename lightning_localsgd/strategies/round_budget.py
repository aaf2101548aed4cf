"""Warn when a fit averages the replicas in no round: the ranks then train independent models.

A ``period`` longer than the fit (``period=1000`` over 40 steps, DiLoCo's 100 over a short demo) or one process
(``devices=1``) gives no error and no visible sign: the loss goes down on every rank, and only the final average
at the end of ``fit`` ever combines the replicas. Checked once at the start of training, when Lightning knows the
step budget (``trainer.estimated_stepping_batches``), and, if that could not tell (an unknown budget, a run stopped
early), once more at the end of ``fit`` from what happened.

Algorithms that combine replicas at every step (gossip, the compressed per-step exchanges) are never warned about.
"""

from __future__ import annotations

import math
from typing import Optional

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_warn

from lightning_localsgd.algorithms.periodic import PeriodicAlgorithm
from lightning_localsgd.driving import exchanges_every_step


def world_period(algorithm: PeriodicAlgorithm) -> tuple[str, int]:
    """The argument that sets the steps between averages over every rank, and its value."""
    inter = getattr(algorithm, "inter_period", None)
    if inter is not None:
        return "inter_period", int(inter)  # node averages alone leave the nodes apart
    if hasattr(algorithm.schedule, "first_stage_steps"):
        return "first_period", algorithm.period  # STL-SGD: the current stage's period
    return "period", getattr(algorithm, "outer_period", algorithm.period)  # Streaming DiLoCo: H, not H / fragments


def world_round_after(algorithm: PeriodicAlgorithm, step: int) -> bool:
    """Whether step ``step`` (0-based) ends with a round that averages over every rank."""
    if not algorithm.is_round_after(step):
        return False
    inter = getattr(algorithm, "inter_period", None)
    return inter is None or (step + 1 - algorithm.warmup_steps) % inter == 0


def first_world_round(algorithm: PeriodicAlgorithm, start: int, stop: int) -> Optional[int]:
    """The first step in ``[start, stop)`` that ends with a world round, or None.

    The first round after ``start`` comes within one world period of the local phase (of the current stage, for
    STL-SGD, whose schedule is exact up to its next round), so no more than that is scanned.
    """
    first_local = max(start, algorithm.warmup_steps)
    for step in range(first_local, min(stop, first_local + world_period(algorithm)[1] + 1)):
        if world_round_after(algorithm, step):
            return step
    return None


class RoundBudgetCheck:
    """Warns once per fit, at the start of training or else at its end, if no round averages the replicas."""

    def __init__(self, algorithm: PeriodicAlgorithm, strategy: str) -> None:
        self.algorithm = algorithm
        self.strategy = strategy
        self.start_step = self.start_rounds = 0
        self.warned = False

    def at_start(self, trainer: pl.Trainer) -> None:
        algorithm = self.algorithm
        self.start_step, self.start_rounds, self.warned = algorithm.step, algorithm.rounds, False
        world = trainer.world_size
        if world == 1:
            self.warned = True
            rank_zero_warn(
                f"{self.strategy} runs in one process (`Trainer(devices=1, num_nodes=1)`): there is no other replica "
                "to average, so its rounds change nothing and this fit is plain single-process training with the "
                "strategy's bookkeeping on top. Start two or more processes (`devices=2` or more; on CPU, "
                "`accelerator='cpu', devices=N` runs N processes), or drop the strategy."
            )
            return
        budget = trainer.estimated_stepping_batches
        if exchanges_every_step(algorithm) or not math.isfinite(budget) or budget <= 0:
            return  # unknown budget: the end of the fit tells
        stop = self.start_step + max(0, int(budget) - trainer.global_step)
        local = max(0, stop - max(self.start_step, algorithm.warmup_steps))
        if local == 0 or first_world_round(algorithm, self.start_step, stop) is not None:
            return
        self.warned = True
        rank_zero_warn(
            f"{self.strategy}: this fit has {stop - self.start_step} training step(s) left "
            f"(`trainer.estimated_stepping_batches`), {local} of them local, and no round among them: "
            + self._consequences(world, local)
        )

    def at_end(self, trainer: pl.Trainer) -> None:
        algorithm = self.algorithm
        if self.warned or exchanges_every_step(algorithm) or trainer.world_size == 1:
            return
        local = max(0, algorithm.step - max(self.start_step, algorithm.warmup_steps))
        if hasattr(algorithm, "inter_period"):
            averaged = first_world_round(algorithm, self.start_step, algorithm.step) is not None
        else:
            averaged = algorithm.rounds > self.start_rounds
        if local == 0 or averaged:
            return
        self.warned = True
        rank_zero_warn(
            f"{self.strategy}: this fit ended after {algorithm.step - self.start_step} step(s), {local} of them "
            "local, and no round averaged the replicas: " + self._consequences(trainer.world_size, local)
        )

    def _consequences(self, world: int, local: int) -> str:
        name, value = world_period(self.algorithm)
        who = f"the {world} ranks train"
        if name == "inter_period":  # node averages keep the ranks of a node together, never the nodes
            who = "the nodes (each averaging its own ranks) train"
        return (
            f"{who} {local} local steps each on their own data, as independent models. The model "
            "after `fit` (as at every validation and checkpoint) is then the plain average of those independent "
            "replicas, taken once, which for a neural network can be worse than any one of them. To train one model "
            f"together: lower `{name}` (now {value}) well below {local}, or train for longer (`max_steps`, "
            "`max_epochs`)."
        )
