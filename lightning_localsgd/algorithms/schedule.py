"""When the replicas synchronise: warm-up steps, then a round every ``period`` local steps.

Post-local SGD ("Don't Use Large Mini-Batches, Use Local SGD", Lin et al., arXiv 1808.07217): the first
``warmup_steps`` steps are synchronous data-parallel SGD; after that the replicas step locally and meet every
``period`` steps. The schedule is an object with its own state so that schedules whose period changes (STL-SGD's
stages) can replace it without touching the algorithms.

Two counters are kept apart: ``step`` (training steps completed, warm-up included) and ``rounds`` (rounds of
the local phase held so far). Warm-up steps synchronise too, but they are not rounds: a checkpoint "every 10
rounds" must not fire every 10 warm-up steps.
"""

from __future__ import annotations

import math
from typing import Any

from lightning_localsgd._validation import check_bool, check_int


class PeriodicSchedule:
    """A round every ``period`` optimizer steps after ``warmup_steps`` synchronous ones.

    Args:
        period: optimizer steps between two rounds (H, k or tau in the papers).
        warmup_steps: initial optimizer steps run as synchronous SGD (gradients averaged every step).
        first_period_one_step: if True, the first round comes right after the first local step and then every
            ``period`` steps (rounds at local steps 1, H+1, 2H+1, ...), the phase of torch's
            ``PeriodicModelAverager``; if False, rounds come after local steps H, 2H, ...
    """

    def __init__(self, period: int, warmup_steps: int = 0, first_period_one_step: bool = False) -> None:
        self.period = check_int("period", period, 1)
        self.warmup_steps = check_int("warmup_steps", warmup_steps, 0)
        self.first_period_one_step = check_bool("first_period_one_step", first_period_one_step)
        self.step = 0  # training steps completed (a step = one batch in which an optimizer stepped)
        self.rounds = 0  # rounds of the local phase completed (warm-up steps are not rounds)

    def in_warmup(self, step: int | None = None) -> bool:
        """Whether step ``step`` (default: the step now running) is a synchronous warm-up step."""
        return (self.step if step is None else step) < self.warmup_steps

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

    def reset(self) -> None:
        """A new run: no step taken, no round held."""
        self.step = self.rounds = 0

    def round_held(self) -> bool:
        """Count the round just held (after ``step`` was advanced past it). Returns True if a new stage begins."""
        self.rounds += 1
        return False

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "rounds": self.rounds}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
        self.rounds = int(state.get("rounds", 0))


class StagewiseSchedule(PeriodicSchedule):
    """STL-SGD's stages: stage s (0-based) lasts about ``first_stage_steps * 2**s`` local steps with period
    ``round(first_period * period_growth**s)``; a stage ends at a round (its length is rounded up to whole periods),
    so a stage boundary is always a synchronisation point.

    Args:
        first_stage_steps: local steps of the first stage (T_1).
        first_period: period of the first stage (k_1).
        period_growth: factor of the period from one stage to the next (2 for identical data, sqrt(2) otherwise).
        warmup_steps: synchronous steps before the first stage.
    """

    def __init__(self, first_stage_steps: int, first_period: int, period_growth: float, warmup_steps: int = 0) -> None:
        super().__init__(first_period, warmup_steps, False)
        self.first_stage_steps = check_int("first_stage_steps", first_stage_steps, 1)
        self.first_period = self.period
        if not isinstance(period_growth, (int, float)) or isinstance(period_growth, bool) or not period_growth >= 1:
            raise ValueError(f"`period_growth` must be a number of at least 1, got {period_growth!r}.")
        self.period_growth = float(period_growth)
        self.reset()

    def period_of(self, stage: int) -> int:
        """``round(first_period * period_growth**stage)``: from the first period each time, so rounding never
        compounds; the nearest integer, an exact half to the even neighbour (Python's ``round``)."""
        return max(1, round(self.first_period * self.period_growth**stage))

    def rounds_in(self, stage: int) -> int:
        """Rounds of stage ``stage``: its 2**stage * T_1 steps in whole periods."""
        return max(1, math.ceil(self.first_stage_steps * 2**stage / self.period_of(stage)))

    def reset(self) -> None:
        super().reset()
        self.stage = 0
        self.stage_rounds = 0  # rounds held in the current stage
        self.last_round_end = self.warmup_steps  # steps completed when the last round (or warm-up) ended
        self.period = self.period_of(0)

    def is_round_after(self, step: int) -> bool:
        if step < self.warmup_steps:
            return False
        return step + 1 - self.last_round_end == self.period

    def round_held(self) -> bool:
        super().round_held()
        self.last_round_end = self.step
        self.stage_rounds += 1
        if self.stage_rounds < self.rounds_in(self.stage):
            return False
        self.stage += 1
        self.stage_rounds = 0
        self.period = self.period_of(self.stage)
        return True

    def state_dict(self) -> dict[str, Any]:
        return {
            **super().state_dict(),
            "stage": self.stage,
            "stage_rounds": self.stage_rounds,
            "last_round_end": self.last_round_end,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.stage = int(state.get("stage", 0))
        self.stage_rounds = int(state.get("stage_rounds", 0))
        self.last_round_end = int(state.get("last_round_end", self.warmup_steps))
        self.period = self.period_of(self.stage)
