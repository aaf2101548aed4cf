"""Flat parameter buckets and packed collectives, with simulated workers."""

from __future__ import annotations

import torch
from torch import nn

from lightning_localsgd.comm import FlatParameters, average_float_buffers, average_gradients, run_simulated


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
        bn.num_batches_tracked.fill_(rank + 10)
        average_float_buffers(bn, comm)
        return bn.running_mean.clone(), int(bn.num_batches_tracked)

    (m0, n0), (m1, n1) = run_simulated(2, worker)
    assert torch.equal(m0, torch.full((3,), 0.5)) and torch.equal(m1, m0)
    assert (n0, n1) == (10, 11)
