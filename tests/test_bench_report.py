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
