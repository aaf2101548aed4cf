"""Flat parameter buckets and packed collectives, with simulated workers."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lightning_localsgd.algorithms import VRLSGD, OverlapLocalSGD
from lightning_localsgd.comm import FlatParameters, average_float_buffers, average_gradients, run_simulated
from lightning_localsgd.comm.flat import mean_packed_


def test_parameters_become_views_of_buckets_and_averaging_a_bucket_averages_them():
    def worker(rank, comm):
        model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
        with torch.no_grad():
            for p in model.parameters():
                p.fill_(float(rank))
        flat = FlatParameters(model.parameters())
        comm.all_reduce_mean_(flat.buckets)
        return [p.detach().clone() for p in model.parameters()], comm.stats

    results = run_simulated(3, worker)
    for params, stats in results:
        assert all(torch.equal(p, torch.full_like(p, 1.0)) for p in params)
        assert stats.collectives == 1  # one bucket, one collective, however many tensors
        assert stats.bytes_sent == 2 * 2 * 26 * 4 // 3


def test_buckets_split_by_dtype_and_cap_and_tied_parameters_count_once():
    shared = nn.Parameter(torch.zeros(10))
    params = [shared, nn.Parameter(torch.zeros(300_000)), shared, nn.Parameter(torch.zeros(5, dtype=torch.float64))]
    flat = FlatParameters(params, bucket_cap_mb=1.0)
    assert len(flat.params) == 3
    assert sorted(b.numel() for b in flat.buckets) == [5, 10, 300_000]


def test_replaced_storage_is_re_homed_with_its_current_value():
    layer = nn.Linear(2, 2)
    flat = FlatParameters(layer.parameters())
    layer.weight.data = torch.full((2, 2), 7.0)  # e.g. a user's load with assign=True
    assert flat.ensure_views()
    assert torch.equal(flat.buckets[0][:4], torch.full((4,), 7.0))
    assert not flat.ensure_views()


def test_gradient_average_treats_a_missing_gradient_as_zero_and_keeps_untouched_ones_none():
    def worker(rank, comm):
        a, b, c = (nn.Parameter(torch.zeros(2)) for _ in range(3))
        a.grad = torch.full((2,), float(rank + 1))
        if rank == 0:
            b.grad = torch.full((2,), 4.0)  # only rank 0 touched b
        average_gradients([a, b, c], comm)
        return a.grad.clone(), b.grad.clone(), c.grad

    for a, b, c in run_simulated(2, worker):
        assert torch.equal(a, torch.full((2,), 1.5))
        assert torch.equal(b, torch.full((2,), 2.0))
        assert c is None


def test_only_floating_point_buffers_are_averaged():
    def worker(rank, comm):
        bn = nn.BatchNorm1d(3)
        bn.running_mean.fill_(float(rank))
        bn.running_var.fill_(2.0 + 4 * rank)
        bn.num_batches_tracked.fill_(rank + 10)
        average_float_buffers(bn, comm)
        return bn.running_mean.clone(), bn.running_var.clone(), int(bn.num_batches_tracked)

    results = run_simulated(2, worker)
    for mean, var, _ in results:
        assert torch.equal(mean, torch.full((3,), 0.5)) and torch.equal(var, torch.full((3,), 4.0))
    assert [n for _, _, n in results] == [10, 11]


def test_a_packed_mean_gives_each_tensor_its_own_mean_with_one_collective_per_dtype():
    # Interleaved dtypes and sizes: each tensor must get back its own slice of the packed mean.
    shapes = [((3,), torch.float32), ((2, 2), torch.float64), ((1,), torch.float32), ((5,), torch.float64)]

    def values(rank: int) -> list[torch.Tensor]:
        return [torch.arange(math.prod(s), dtype=d).reshape(s) * (rank + 1) + 10 * i for i, (s, d) in enumerate(shapes)]

    def worker(rank, comm):
        tensors = values(rank)
        mean_packed_(tensors, comm)
        return tensors, comm.stats.collectives

    for tensors, collectives in run_simulated(3, worker):
        assert collectives == 2
        for got, a, b, c in zip(tensors, values(0), values(1), values(2)):
            assert got.dtype == a.dtype and torch.equal(got, (a + b + c) / 3)


def test_channels_last_parameters_stay_channels_last_with_their_values_and_state_views_match_them():
    conv = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 4, 2)).to(memory_format=torch.channels_last)
    weights = [m.weight for m in conv]
    assert all(w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous() for w in weights)
    before = [p.detach().clone() for p in conv.parameters()]
    strides = [p.stride() for p in conv.parameters()]
    flat = FlatParameters(conv.parameters())
    assert all(w.is_contiguous(memory_format=torch.channels_last) for w in weights)
    assert [p.stride() for p in conv.parameters()] == strides
    assert all(torch.equal(p, b) for p, b in zip(conv.parameters(), before))
    state = flat.zeros_like_buckets()
    views = flat.views_of(state)
    assert [v.stride() for v in views] == strides
    # Elementwise work on the flat state lands on the same elements as on the parameters' views.
    torch._foreach_add_(views, list(conv.parameters()))
    assert all(torch.equal(s, b) for s, b in zip(state, flat.buckets))
    # The buckets hold the memory order, so averaging a bucket still averages each parameter element by element.
    for p, view in zip(conv.parameters(), flat.views_of(flat.buckets)):
        assert p.data_ptr() == view.data_ptr() and torch.equal(p, view)


def test_a_replaced_channels_last_parameter_is_re_homed_in_its_original_layout_with_the_new_values():
    conv = nn.Conv2d(2, 3, 3).to(memory_format=torch.channels_last)
    flat = FlatParameters(conv.parameters())
    new = torch.randn(3, 2, 3, 3)  # contiguous, e.g. loaded from a checkpoint
    conv.weight.data = new.clone()
    assert flat.ensure_views()
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(conv.weight, new)


def test_transposed_and_permuted_dense_parameters_keep_their_strides():
    params = [
        nn.Parameter(torch.randn(4, 6).t()),
        nn.Parameter(torch.randn(2, 3, 5).permute(2, 0, 1)),
        nn.Parameter(torch.randn(())),
    ]
    before = [(p.detach().clone(), p.stride()) for p in params]
    FlatParameters(params)
    for p, (value, stride) in zip(params, before):
        assert p.stride() == stride and torch.equal(p, value)


@pytest.mark.parametrize("make", [lambda: VRLSGD(period=3), lambda: OverlapLocalSGD(period=2)], ids=["vrl", "overlap"])
def test_algorithm_state_lines_up_with_channels_last_parameters_element_by_element(make):
    # VRL-SGD's correction and Overlap's anchor are per-parameter views of state buckets, combined elementwise with
    # the parameters: a view in another layout than its parameter would mix elements and change the result.
    def train(memory_format: torch.memory_format) -> list[torch.Tensor]:
        def worker(rank, comm):
            g = torch.Generator().manual_seed(0)
            model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.Tanh(), nn.Conv2d(4, 3, 2)).double()
            with torch.no_grad():
                for p in model.parameters():
                    p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.5)
            model = model.to(memory_format=memory_format)
            opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
            algo = make()
            algo.setup(model, comm, [opt])
            data = torch.Generator().manual_seed(rank)
            for _ in range(6):
                x = torch.randn(4, 2, 6, 6, generator=data, dtype=torch.float64) + rank
                opt.zero_grad()
                model(x.to(memory_format=memory_format)).square().mean().backward()
                algo.before_optimizer_step(opt)
                opt.step()
                algo.after_optimizer_step(opt)
                algo.end_step()
            weights = [model[0].weight, model[2].weight]
            assert all(w.is_contiguous(memory_format=memory_format) for w in weights)
            return [p.detach().clone() for p in model.parameters()]

        return [p for params in run_simulated(2, worker) for p in params]

    for got, want in zip(train(torch.channels_last), train(torch.contiguous_format)):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


def test_buckets_never_span_two_fragments_and_say_whose_they_are():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 2))
    params = list(model.parameters())
    fragment_of = {id(p): (0 if i < 2 else 1) for i, p in enumerate(params)}  # layer 0 | layers 1 and 2
    flat = FlatParameters(params, bucket_cap_mb=1.0, fragment_of=fragment_of)  # the cap alone would make one bucket
    assert flat.bucket_fragments == [0, 1]
    assert [b.numel() for b in flat.buckets] == [20, 20 + 10]
    whole = FlatParameters([p.detach().clone().requires_grad_() for p in params], bucket_cap_mb=1.0)
    assert whole.bucket_fragments == [0] and [b.numel() for b in whole.buckets] == [50]
