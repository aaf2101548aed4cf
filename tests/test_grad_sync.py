"""GradientAverager: the mean gradient, bucket by bucket, launched in bucket order during backward."""

from __future__ import annotations

import copy
import hashlib
from typing import Any

import pytest
import torch
import torch.distributed as dist
from dist_utils import run_processes
from torch import nn

from lightning_localsgd.comm import (
    Communicator,
    GradientAverager,
    ProcessGroupCommunicator,
    average_gradients,
    run_simulated,
)

WORLD = 3
TINY_BUCKET_MB = 0.0002  # 209 bytes: the test model spans 8 buckets, some of one parameter, some of several


class Mixed(nn.Module):
    """Two dtypes, a branch only some ranks use, a layer no rank uses; registered so that reverse parameter
    order is not the order backward produces gradients in."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(5, 8)
        self.fc2 = nn.Linear(8, 8).double()
        self.fc3 = nn.Linear(8, 6)
        self.fc4 = nn.Linear(6, 1).double()
        self.branch = nn.Linear(8, 8)  # used on rank 0 only
        self.unused = nn.Linear(2, 2)  # used by no rank
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.5)

    def forward(self, x: torch.Tensor, rank: int) -> torch.Tensor:
        h = torch.tanh(self.fc1(x))
        if rank == 0:
            h = h + torch.tanh(self.branch(h))
        h = torch.tanh(self.fc2(h.double()))
        h = torch.tanh(self.fc3(h.float()))
        return self.fc4(h.double())


class HeadFirst(nn.Module):
    """The head is registered first, so its bucket comes last, yet backward produces its gradients first."""

    def __init__(self, extra_on_rank: int = -1) -> None:
        super().__init__()
        self.head = nn.Linear(16, 1)
        self.mid = nn.Linear(16, 16)
        self.body = nn.Linear(5, 16)
        self.extra = nn.Linear(16, 1)  # bucket 0; used on `extra_on_rank` only (-1: on every rank)
        self.extra_on_rank = extra_on_rank
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)

    def forward(self, x: torch.Tensor, rank: int) -> torch.Tensor:
        h = torch.tanh(self.mid(torch.tanh(self.body(x))))
        out = self.head(h)
        if self.extra_on_rank in (-1, rank):
            out = out + self.extra(h)
        return out


def loss_on(model: nn.Module, rank: int, step: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(100 * rank + step)
    x = torch.randn(12, 5, generator=g) + rank
    y = torch.sin(x.sum(dim=1, keepdim=True) * (rank + 1))
    return nn.functional.mse_loss(model(x, rank).float(), y)


def grads(model: nn.Module) -> list[torch.Tensor | None]:
    return [None if p.grad is None else p.grad.detach().clone() for p in model.parameters()]


def assert_grads_equal(got: list, expected: list) -> None:
    assert len(got) == len(expected)
    for i, (a, b) in enumerate(zip(got, expected)):
        assert (a is None) == (b is None), f"parameter {i}: {a is None=} {b is None=}"
        if a is not None:
            assert a.dtype == b.dtype and torch.equal(a, b), f"parameter {i}"


def averaged_both_ways(rank: int, comm: Communicator, make=Mixed, armed: bool = True):
    """(GradientAverager's result, average_gradients's result, local gradients, the averager) on this rank."""
    model = make()
    reference = copy.deepcopy(model)
    averager = GradientAverager(list(model.parameters()), comm, TINY_BUCKET_MB)
    if armed:
        averager.arm()
    loss_on(model, rank).backward()
    local = grads(model)
    launched_in_backward = averager.launched_buckets
    averager.finish()
    loss_on(reference, rank).backward()
    average_gradients(list(reference.parameters()), comm)
    return grads(model), grads(reference), local, launched_in_backward, averager.num_buckets


def test_simulated_ranks_get_exactly_the_mean_gradient_and_average_gradients_result():
    results = run_simulated(WORLD, averaged_both_ways, timeout=30)
    ours0 = results[0][0]
    for ours, reference, _, _, buckets in results:
        assert buckets >= 3
        assert_grads_equal(ours, reference)  # bitwise, in both dtypes
        assert_grads_equal(ours, ours0)  # identical on every rank
    for i, g in enumerate(ours0):
        if g is None:
            continue
        locals_ = [r[2][i] if r[2][i] is not None else torch.zeros_like(g) for r in results]
        torch.testing.assert_close(g, sum(locals_) / WORLD, rtol=0, atol=1e-15 if g.dtype == torch.float64 else 1e-7)
    assert {g.dtype for g in ours0 if g is not None} == {torch.float32, torch.float64}


def test_a_parameter_no_rank_touched_keeps_none_and_one_some_rank_touched_gets_a_gradient_everywhere():
    results = run_simulated(WORLD, averaged_both_ways, timeout=30)
    names = [n for n, _ in Mixed().named_parameters()]
    branch_w, unused_w = names.index("branch.weight"), names.index("unused.weight")
    rank0_local = results[0][2][branch_w]
    assert rank0_local is not None and results[1][2][branch_w] is None  # only rank 0 used the branch
    for ours, _, local, _, _ in results:
        assert local[unused_w] is None and ours[unused_w] is None
        assert torch.equal(ours[branch_w], rank0_local / WORLD)


def test_armed_and_unarmed_give_the_same_result_and_unarmed_launches_at_finish():
    def worker(rank, comm):
        armed = averaged_both_ways(rank, comm, HeadFirst, armed=True)
        unarmed = averaged_both_ways(rank, comm, HeadFirst, armed=False)
        return armed, unarmed

    for armed, unarmed in run_simulated(WORLD, worker, timeout=30):
        assert_grads_equal(armed[0], unarmed[0])
        assert_grads_equal(unarmed[0], unarmed[1])
        assert armed[3] == armed[4] >= 3  # every bucket launched during backward
        assert unarmed[3] == 0  # nothing before finish()


def test_buckets_launch_in_bucket_order_even_when_gradients_are_ready_out_of_order():
    def worker(rank, comm):
        model = HeadFirst()
        averager = GradientAverager(list(model.parameters()), comm, TINY_BUCKET_MB)
        bucket_of = {i: b for b, members in enumerate(averager.bucket_members) for i in members}
        sizes = [sum(averager.params[i].numel() + 1 for i in members) for members in averager.bucket_members]
        assert len(set(sizes)) == len(sizes)  # a launched tensor's size names its bucket
        launches, ready = [], []
        start = comm.start_all_reduce_mean_

        def recording_start(tensor):
            launches.append(sizes.index(tensor.numel()))
            return start(tensor)

        comm.start_all_reduce_mean_ = recording_start  # records the calls; the transfer is the real one
        remaining = {b: len(members) for b, members in enumerate(averager.bucket_members)}

        def note_ready(index):
            def hook(_):
                remaining[bucket_of[index]] -= 1
                if remaining[bucket_of[index]] == 0:
                    ready.append(bucket_of[index])

            return hook

        for i, p in enumerate(averager.params):
            p.register_post_accumulate_grad_hook(note_ready(i))
        averager.arm()
        loss_on(model, rank).backward()
        launched_in_backward = averager.launched_buckets
        averager.finish()
        return ready, launches, launched_in_backward, averager.num_buckets

    for ready, launches, launched_in_backward, buckets in run_simulated(WORLD, worker, timeout=30):
        assert buckets >= 3
        assert sorted(ready) == list(range(buckets)) and ready != sorted(ready)  # really out of order
        assert launches == list(range(buckets))
        assert launched_in_backward == buckets


def test_under_gradient_accumulation_only_the_armed_backward_launches():
    def worker(rank, comm):
        model = HeadFirst()
        reference = copy.deepcopy(model)
        averager = GradientAverager(list(model.parameters()), comm, TINY_BUCKET_MB)
        loss_on(model, rank, step=0).backward()  # an accumulation micro-batch: unarmed
        quiet = (averager.launched_buckets, comm.stats.collectives)
        averager.arm()
        loss_on(model, rank, step=1).backward()
        launched = averager.launched_buckets
        averager.finish()
        for step in (0, 1):
            loss_on(reference, rank, step).backward()
        accumulated = grads(reference)  # this rank's sum over both micro-batches
        average_gradients(list(reference.parameters()), comm)
        return quiet, launched, grads(model), grads(reference), accumulated

    results = run_simulated(WORLD, worker, timeout=30)
    for quiet, launched, ours, reference, _ in results:
        assert quiet == (0, 0)
        assert launched >= 3
        assert_grads_equal(ours, reference)
        for i, g in enumerate(ours):  # the mean over ranks of each rank's accumulated gradient, both micro-batches
            mean = sum(r[4][i] for r in results) / WORLD
            torch.testing.assert_close(g, mean, rtol=0, atol=1e-7)


def test_discard_keeps_local_gradients_and_the_next_exchange_stays_paired():
    def worker(rank, comm):
        model = HeadFirst(extra_on_rank=1)  # bucket 0 is ready during backward on rank 1 only
        reference = copy.deepcopy(model)  # before the averager hooks the parameters
        averager = GradientAverager(list(model.parameters()), comm, TINY_BUCKET_MB)
        averager.arm()
        loss_on(model, rank, step=0).backward()
        launched = averager.launched_buckets
        local = grads(model)
        averager.discard()
        kept = grads(model)
        model.zero_grad()
        averaged = averaged_step(rank, comm, model, averager)
        loss_on(reference, rank, step=1).backward()
        average_gradients(list(reference.parameters()), comm)
        return launched, local, kept, averaged, grads(reference), averager.num_buckets

    results = run_simulated(WORLD, worker, timeout=30)
    assert results[0][0] == 0 and results[1][0] == results[1][5]  # the ranks launched different numbers
    for _, local, kept, averaged, reference, _ in results:
        assert_grads_equal(kept, local)
        assert_grads_equal(averaged, reference)


def averaged_step(rank: int, comm: Communicator, model: nn.Module, averager: GradientAverager) -> list:
    averager.arm()
    loss_on(model, rank, step=1).backward()
    averager.finish()
    return grads(model)


def test_misuse_is_reported():
    def worker(rank, comm):
        model = HeadFirst()
        averager = GradientAverager(list(model.parameters()), comm, TINY_BUCKET_MB)
        averager.arm()
        loss_on(model, rank).backward()
        with pytest.raises(RuntimeError, match=r"call finish\(\)"):
            averager.arm()  # the previous exchange is still in flight
        with pytest.raises(RuntimeError, match="accumulated again after its bucket"):
            loss_on(model, rank).backward()  # a second backward while armed
        averager.discard()
        return True

    assert run_simulated(2, worker, timeout=30) == [True, True]


def test_close_removes_the_hooks():
    def worker(rank, comm):
        model = HeadFirst()
        averager = GradientAverager(list(model.parameters()), comm, TINY_BUCKET_MB)
        averager.close()
        averager.arm()
        loss_on(model, rank).backward()
        return averager.launched_buckets, comm.stats.collectives

    assert run_simulated(2, worker, timeout=30) == [(0, 0), (0, 0)]


def test_a_single_rank_keeps_its_gradients():
    (ours, reference, local, _, _), *_ = run_simulated(1, averaged_both_ways, timeout=30)
    assert_grads_equal(ours, local)
    assert_grads_equal(reference, local)


def test_bad_arguments():
    def worker(rank, comm):
        model = HeadFirst()
        with pytest.raises(ValueError, match="no parameters"):
            GradientAverager([], comm, 1.0)
        with pytest.raises(ValueError, match=r"`bucket_cap_mb` must be a positive finite number, got 0"):
            GradientAverager(list(model.parameters()), comm, 0)
        model.body.weight.requires_grad_(False)
        with pytest.raises(ValueError, match=r"Parameters \[4\] do not require a gradient"):
            GradientAverager(list(model.parameters()), comm, 1.0)
        return True

    assert run_simulated(1, worker) == [True]


# ---------------------------------------------------------------------- 2 real gloo processes
class Uneven(nn.Module):
    """Buckets of very different sizes (one large layer, several small ones)."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(5, 64)
        self.big = nn.Linear(64, 64)
        self.small = nn.Linear(64, 3)
        self.out = nn.Linear(3, 1)
        g = torch.Generator().manual_seed(2)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)

    def forward(self, x: torch.Tensor, rank: int) -> torch.Tensor:
        return self.out(torch.tanh(self.small(torch.tanh(self.big(torch.tanh(self.inp(x)))))))


def digest(tensors: list[torch.Tensor]) -> str:
    return hashlib.sha256(b"".join(t.numpy().tobytes() for t in tensors)).hexdigest()


def gloo_worker(rank: int) -> tuple[list[dict], list[int], int]:
    """Per step, small facts only (the result pipe of run_processes is small): what was launched when, and how
    the averaged gradients compare with the mean of both ranks' local ones and with average_gradients."""
    comm = ProcessGroupCommunicator()
    model = Uneven()
    reference = copy.deepcopy(model)
    averager = GradientAverager(list(model.parameters()), comm, bucket_cap_mb=0.001)  # 1 KiB
    sizes = [sum(averager.params[i].numel() for i in members) for members in averager.bucket_members]
    # Backward reaches the first layer last: what was launched before it computes that layer's gradients (when
    # the gradient of the layer's output arrives) overlapped with backward.
    launched_before_first_layer: list[int] = []

    def watch_output(_module: nn.Module, _inputs: Any, out: torch.Tensor) -> None:
        out.register_hook(lambda _: launched_before_first_layer.append(averager.launched_buckets))

    model.inp.register_forward_hook(watch_output)
    steps = []
    for step in range(3):
        model.zero_grad()
        averager.arm()
        loss_on(model, rank, step).backward()
        launched = (launched_before_first_layer[-1], averager.launched_buckets)
        local = grads(model)
        averager.finish()
        averaged = grads(model)
        reference.zero_grad()
        loss_on(reference, rank, step).backward()
        average_gradients(list(reference.parameters()), comm)
        everyone = [None, None]
        dist.all_gather_object(everyone, local)  # both ranks' local gradients, through another path
        mean = [(a + b) / 2 for a, b in zip(*everyone)]
        steps.append(
            {
                "launched": launched,
                "error_vs_mean": max((a - m).abs().max().item() for a, m in zip(averaged, mean)),
                "equals_average_gradients": all(torch.equal(a, r) for a, r in zip(averaged, grads(reference))),
                "digest": digest(averaged),
            }
        )
    dist.barrier()
    return steps, sizes, comm.stats.collectives


def test_two_gloo_processes_launch_during_backward_and_get_the_mean():
    (steps0, sizes, collectives0), (steps1, _, collectives1) = run_processes(2, gloo_worker)
    assert len(sizes) >= 3 and max(sizes) > 10 * min(sizes)  # uneven buckets
    # 3 steps: one collective per bucket each, plus average_gradients's one per dtype.
    assert collectives0 == collectives1 == 3 * (len(sizes) + 1)
    for step, (r0, r1) in enumerate(zip(steps0, steps1)):
        # Every bucket but the first layer's two is sent before backward reaches that layer; all before finish().
        assert r0["launched"] == r1["launched"] == (len(sizes) - 2, len(sizes)), f"step {step}"
        assert r0["error_vs_mean"] < 1e-7 and r1["error_vs_mean"] < 1e-7
        assert r0["equals_average_gradients"] and r1["equals_average_gradients"]
        assert r0["digest"] == r1["digest"]  # identical on both ranks
