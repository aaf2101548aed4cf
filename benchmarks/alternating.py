"""Rounds on and off within one run: the cost of a round measured against the same strategy's own local steps
seconds apart, not in another run minutes apart.

On a shared VM the speed of the machine drifts by 10-20 % between runs a minute apart, which swamps what a hidden
round costs (a few per cent). Here one run alternates blocks of ``blocks * period`` local steps: rounds every
``period`` steps in the even blocks ("on"), none in the odd ones ("off"). Each on block is paired with the off
block right after it, a few seconds later:

- on window: the on block shifted to start at the step of its first round, so it holds exactly ``blocks`` rounds
  and the transfers they start (the last one's tail runs into the off block's first steps, which the window
  covers);
- off window: the second half of the off block, far from any transfer in flight.

Nothing couples the ranks in an off block, so the lab's runner makes them meet (a barrier) right before each on
block, in a step neither window measures: a rank's lead from the off block is not waited out in the on window.

ratio = (steps/s in the on window) / (steps/s in the off window), each the slowest rank's (the job's speed): the
fraction of the strategy's no-round speed that a round every ``period`` steps leaves. The model is not the
strategy's (a round's result lands a block late after each off block), so only the speed of such a run is
reported, never its loss.
"""

from __future__ import annotations

from collections.abc import Sequence

from lightning_localsgd.algorithms.schedule import PeriodicSchedule


class AlternatingRounds(PeriodicSchedule):
    """``schedule``'s rounds, held only in the even blocks of ``blocks * period`` local steps."""

    def __init__(self, schedule: PeriodicSchedule, blocks: int) -> None:
        if type(schedule) is not PeriodicSchedule:
            raise ValueError(f"alternating blocks need a fixed period, not a {type(schedule).__name__}")
        super().__init__(schedule.period, schedule.warmup_steps, schedule.first_period_one_step)
        self.block = blocks * self.period

    def is_round_after(self, step: int) -> bool:
        local_index = step - self.warmup_steps
        return super().is_round_after(step) and (local_index // self.block) % 2 == 0


def block_rates(
    step_ends: Sequence[float], first_count: int, warmup_steps: int, period: int, blocks: int
) -> list[tuple[float, float]]:
    """One rank's (on-window steps/s, off-window steps/s) for every pair of blocks inside its clock.

    ``step_ends[j]`` is the clock when training step ``first_count + j`` (1-based) ended; local step ``i`` (0-based,
    after ``warmup_steps``) is training step ``warmup_steps + i + 1``.
    """
    block = blocks * period
    # The on window starts with the step that holds the block's first round and runs period - 1 steps past its
    # last: every round of the block and (while a transfer takes less than a period) every transfer fall inside.
    lead = period - 1

    def seconds(start: int, stop: int) -> float:  # local steps start .. stop - 1
        first, last = warmup_steps + start - first_count, warmup_steps + stop - first_count
        return step_ends[last] - step_ends[first]

    rates = []
    for k in range(len(step_ends) // (2 * block) + 1):
        on = (2 * k * block + lead, (2 * k + 1) * block + lead)
        off = ((2 * k + 1) * block + block // 2, (2 * k + 2) * block)
        if warmup_steps + on[0] < first_count:
            continue  # before the throughput window
        if warmup_steps + off[1] - first_count >= len(step_ends):
            break
        rates.append(((on[1] - on[0]) / seconds(*on), (off[1] - off[0]) / seconds(*off)))
    return rates


def job_ratios(rates_of_ranks: Sequence[Sequence[tuple[float, float]]]) -> list[float]:
    """Per pair of blocks, the job's on speed over its off speed; a job runs at its slowest rank's speed.

    Taking each rank's own ratio instead would charge a rank that got ahead in an off block (the ranks do not meet
    there) with the wait for the others at the next on block, and credit the slow rank with it.
    """
    return [min(on for on, _ in pair) / min(off for _, off in pair) for pair in zip(*rates_of_ranks)]
