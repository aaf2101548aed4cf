"""The lab's arithmetic: the bound for peers that wait for their bytes, time to target, and bad lab settings."""

from __future__ import annotations

import pytest

from benchmarks import report
from benchmarks.netlab import NetLab


def test_the_wait_for_every_byte_bound_adds_the_bytes_time_to_the_compute_time():
    # 100 steps/s is 10 ms a step; 0.125 MB at 100 Mbit/s is another 10 ms: 50 steps/s
    assert report.blocking_bound(100.0, 0.125, 100e6) == pytest.approx(50.0)
    assert report.blocking_bound(100.0, 0.0, 100e6) == pytest.approx(100.0)


def row(label, steps_per_s, mb, points):
    ranks = [{"steps_per_s": steps_per_s, "wire_bytes_per_step": mb * 1e6, "modelled_bytes_per_step": mb * 1e6}]
    return report.row(label, ranks, points, target=0.5, target_acc=0.9)


def test_times_to_target_and_the_bound_column_in_the_table():
    points = [
        {"step": 0, "seconds": 0.0, "loss": 2.0, "acc": 0.1},
        {"step": 8, "seconds": 1.0, "loss": 0.4, "acc": 0.8},
        {"step": 16, "seconds": 2.0, "loss": 0.3, "acc": 0.95},
    ]
    rows = [row("compute limit", 100.0, 0.0, points), row("ours", 40.0, 0.125, points)]
    assert rows[1]["time_to_target"] == 1.0 and rows[1]["time_to_acc"] == 2.0
    table = report.markdown(rows, 0.5, 0.9, link_bits=100e6)
    assert "time to accuracy >= 90 % (s)" in table
    assert "| ours | 40.0 | 40.0 % | 80 % of 50.0 |" in table
    assert "wait-for-every-byte" not in report.markdown(rows, 0.5)  # loopback: no link rate, no bound


@pytest.mark.parametrize("mtu", [100, 65535])
def test_the_lab_refuses_an_mtu_it_cannot_carry(mtu):
    with pytest.raises(ValueError, match="`--mtu`"):
        NetLab(2, "200mbit", mtu=mtu)


def synthetic_clock(schedule, steps: int, first_count: int, round_cost: float, in_flight: int, slowdown: float):
    """Steps cost 1 s; a round costs ``round_cost`` more and slows the next ``in_flight`` steps by ``slowdown``."""
    clock, ends, left = 0.0, [], 0
    for step in range(steps):
        clock += 1 + (slowdown if left > 0 else 0)
        left -= 1
        if schedule.is_round_after(step):
            clock += round_cost
            left = in_flight
        if step + 1 >= first_count:
            ends.append(clock)  # ends[j]: end of training step first_count + j (1-based)
    return ends


@pytest.mark.parametrize("period, warmup_steps", [(64, 0), (32, 0), (16, 5)])
def test_alternating_blocks_recover_the_cost_of_a_round_from_one_run(period, warmup_steps):
    from benchmarks.alternating import AlternatingRounds, block_rates, job_ratios
    from lightning_localsgd.algorithms.schedule import PeriodicSchedule

    schedule = AlternatingRounds(PeriodicSchedule(period, warmup_steps), blocks=4)
    rounds = [s - warmup_steps for s in range(warmup_steps + 16 * period) if schedule.is_round_after(s)]
    every = [p * period - 1 for p in range(1, 17)]
    assert rounds == [r for r in every if (r // (4 * period)) % 2 == 0]  # on, off, on, off blocks of 4 periods
    ends = synthetic_clock(schedule, warmup_steps + 32 + 16 * period * 4, 32, 5.0, period // 2, 0.5)
    rates = block_rates(ends, 32, warmup_steps, period, blocks=4)
    slower = [(on / 2, off / 2) for on, off in rates]  # a second rank at half the speed sets the job's pace
    ratios = job_ratios([rates, slower])
    steady = period / (period + 5.0 + 0.5 * period // 2)  # what a round every period leaves of the round-free speed
    assert len(ratios) >= 3 and ratios == pytest.approx([steady] * len(ratios))


def test_the_lab_installs_alternating_rounds_only_when_asked():
    from benchmarks.alternating import AlternatingRounds
    from benchmarks.lightning_run import ALTERNATE, build_strategy
    from benchmarks.peers import Peer

    plain = build_strategy(Peer("x", "lightning", "cocod_sgd", {"period": 8}, True))
    assert type(plain.algorithm.schedule) is not AlternatingRounds
    strategy = build_strategy(Peer("x", "lightning", "cocod_sgd", {"period": 8, ALTERNATE: 2}, True))
    schedule = strategy.algorithm.schedule
    assert isinstance(schedule, AlternatingRounds) and schedule.period == 8 and schedule.block == 16
    assert [s for s in range(64) if schedule.is_round_after(s)] == [7, 15, 39, 47]
