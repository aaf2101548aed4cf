"""The simulated communicator pairs collectives as a process group does, even with several in flight at once."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from lightning_localsgd.comm import run_simulated
from lightning_localsgd.comm.simulated import SimulatedAbortError, SimulatedGroup, SimulatedTimeoutError

# (shape, dtype) of the non-blocking all-reduces each rank has in flight at once: what a round with several
# buckets of two dtypes starts.
LAYOUTS = [((40,), torch.float32), ((3, 5), torch.float64), ((1,), torch.float32), ((7, 2), torch.float64)]


def contribution(rank: int, index: int, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """Rank- and index-dependent values whose float sums round, so the summation order shows in the bits."""
    g = torch.Generator().manual_seed(97 * rank + index)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * 10 ** (rank + index % 3)).to(dtype)


def rank_order_mean(world: int, index: int, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    total = contribution(0, index, shape, dtype).clone()
    for rank in range(1, world):
        total.add_(contribution(rank, index, shape, dtype))
    return total.div_(world)


@pytest.mark.parametrize("world", [3, 4])
def test_several_non_blocking_all_reduces_in_flight_give_exact_results(world):
    def worker(rank, comm):
        tensors = [contribution(rank, i, shape, dtype) for i, (shape, dtype) in enumerate(LAYOUTS)]
        time.sleep(0.002 * rank)  # the ranks start their transfers at different moments
        pending = [comm.start_all_reduce_mean_(t) for t in tensors]
        return [p.wait().clone() for p in reversed(pending)][::-1]  # waited in reverse: order must not matter

    for _ in range(3):  # the old single-slot exchange failed nearly every time; repeat to leave it no luck
        results = run_simulated(world, worker, timeout=10)
        for i, (shape, dtype) in enumerate(LAYOUTS):
            expected = rank_order_mean(world, i, shape, dtype)
            for rank in range(world):
                assert results[rank][i].dtype == dtype
                assert torch.equal(results[rank][i], expected), f"rank {rank}, transfer {i}"


@pytest.mark.parametrize("world", [3, 4])
def test_blocking_and_non_blocking_collectives_mixed(world):
    def worker(rank, comm):
        first = [comm.start_all_reduce_mean_(contribution(rank, i, s, d)) for i, (s, d) in enumerate(LAYOUTS[:2])]
        blocking = contribution(rank, 10, (6,), torch.float64)
        comm.all_reduce_sum_([blocking])
        gathered = comm.all_gather_object(("rank", rank))
        second = [comm.start_all_reduce_mean_(contribution(rank, i + 2, s, d)) for i, (s, d) in enumerate(LAYOUTS[2:])]
        broadcast = torch.full((2,), float(rank))
        comm.broadcast_([broadcast], src=world - 1)
        return [p.wait().clone() for p in first + second], blocking, gathered, broadcast

    results = run_simulated(world, worker, timeout=10)
    blocking_sum = contribution(0, 10, (6,), torch.float64).clone()
    for rank in range(1, world):
        blocking_sum.add_(contribution(rank, 10, (6,), torch.float64))
    for transfers, blocking, gathered, broadcast in results:
        for i, (shape, dtype) in enumerate(LAYOUTS):
            assert torch.equal(transfers[i], rank_order_mean(world, i, shape, dtype))
        assert torch.equal(blocking, blocking_sum)
        assert gathered == [("rank", r) for r in range(world)]
        assert torch.equal(broadcast, torch.full((2,), float(world - 1)))


def test_non_blocking_transfers_run_in_the_background_and_complete_in_issue_order():
    world = 3

    def worker(rank, comm):
        completed: list[int] = []
        joins = [
            comm._start_all_reduce_sum_(contribution(rank, i, s, d), lambda i=i: completed.append(i))
            for i, (s, d) in enumerate(LAYOUTS)
        ]
        for join in joins:
            join()
        return completed

    for completed in run_simulated(world, worker, timeout=10):
        assert completed == list(range(len(LAYOUTS)))


def test_a_failing_worker_releases_the_others_and_its_error_is_raised():
    world = 4

    def worker(rank, comm):
        if rank == 2:
            time.sleep(0.05)  # the others are waiting by now: in a blocking collective and on transfers
            raise ValueError("rank 2 broke")
        pending = comm.start_all_reduce_mean_(torch.ones(3))
        if rank == 0:
            pending.wait()
        else:
            comm.all_reduce_sum_([torch.ones(2)])
        return rank

    start = time.monotonic()
    with pytest.raises(ValueError, match="rank 2 broke"):
        run_simulated(world, worker, timeout=30)
    assert time.monotonic() - start < 5  # released at once, not by the timeout


def test_the_others_see_a_clear_abort_error():
    group = SimulatedGroup(2, timeout=30)
    seen: list[BaseException] = []

    def waiter():
        try:
            group.exchange(0, "x")
        except SimulatedAbortError as error:
            seen.append(error)

    thread = threading.Thread(target=waiter)
    thread.start()
    time.sleep(0.05)
    group.abort("rank 1 failed with ValueError")
    thread.join(5)
    assert not thread.is_alive()
    assert len(seen) == 1 and "rank 1 failed with ValueError" in str(seen[0]) and "rank 0" in str(seen[0])
    with pytest.raises(SimulatedAbortError):  # later operations fail at once too
        group.exchange(0, "y")


def test_a_worker_that_never_arrives_times_out_with_a_clear_error():
    def worker(rank, comm):
        if rank == 0:
            comm.all_reduce_sum_([torch.ones(2)])  # rank 1 returns without joining this collective
        return rank

    start = time.monotonic()
    with pytest.raises(SimulatedTimeoutError, match=r"rank 0 waited 0.3 s at operation 0 for rank\(s\) \[1\]"):
        run_simulated(2, worker, timeout=0.3)
    assert time.monotonic() - start < 5


def test_collectives_that_do_not_pair_up_are_reported():
    def worker(rank, comm):
        comm.all_reduce_sum_([torch.ones(2 + rank)])  # each rank sends a different shape

    with pytest.raises(RuntimeError, match="different shapes/dtypes"):
        run_simulated(2, worker, timeout=10)
