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

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "rounds": self.rounds}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
        self.rounds = int(state.get("rounds", 0))
