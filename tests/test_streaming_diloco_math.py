"""Streaming DiLoCo (fragments, sync delay, merge) and compressed pseudo-gradients against an independent reference
of the paper's algorithm ("Streaming DiLoCo with overlapping communication", Douillard et al., arXiv 2501.18512;
ALGORITHMS.md section 8), written here in plain torch with the workers as a list, and with simulated workers for the
strategy's algorithm."""

from __future__ import annotations

import math

import pytest
import torch
from sim_utils import flat_params, loss_of, make_layered_model, train_workers

from lightning_localsgd.algorithms import DiLoCo
from lightning_localsgd.comm import run_simulated
from lightning_localsgd.errors import NonFiniteError

LR, MOMENTUM = 0.05, 0.9
OUTER_LR, OUTER_MOMENTUM = 0.7, 0.9
# make_layered_model: Linear(5, 8), Tanh, Linear(8, 8), Tanh, Linear(8, 1): three layers of 48, 72 and 9 elements.
LAYER_SIZES = (48, 72, 9)
# Fragments of whole layers, by hand: with 2, the share is 64.5 elements; the second layer would overshoot it by 55.5
# where the first falls short by 16.5, so the first layer is a fragment alone; with 3, a layer each.
FRAGMENT_LAYERS = {1: [[0, 1, 2]], 2: [[0], [1, 2]], 3: [[0], [1], [2]]}


def layer_slices() -> list[slice]:
    starts = [sum(LAYER_SIZES[:i]) for i in range(len(LAYER_SIZES) + 1)]
    return [slice(a, b) for a, b in zip(starts, starts[1:])]


def fragment_index(fragments: int) -> list[torch.Tensor]:
    """The flat positions (in parameter order) of each fragment's elements."""
    slices = layer_slices()
    return [torch.cat([torch.arange(slices[i].start, slices[i].stop) for i in f]) for f in FRAGMENT_LAYERS[fragments]]


def scaled_sign(v: torch.Tensor) -> torch.Tensor:
    """ScaledSign with one block: mean |v| times the sign, zero counted as positive."""
    return v.abs().mean() * torch.where(v < 0, -1.0, 1.0).to(v.dtype)


def int4(v: torch.Tensor) -> torch.Tensor:
    """One block (the fragments here are far below 4096 elements): codes round(v / s) in [-7, 7], s = max |v| / 7."""
    v32 = v.float()
    scale = v32.abs().max() / 7
    return (torch.round(v32 / scale).clamp(-7, 7) * scale).to(v.dtype)


def sparse_top8_2bit(v: torch.Tensor) -> torch.Tensor:
    """One chunk: the 8 largest |v|, each replaced by the nearest of the 2-bit levels -m, -m/3, m/3, m (m: their
    largest magnitude), zero elsewhere."""
    v32 = v.float()
    picked = v32.abs().topk(8).indices
    m = v32[picked].abs().max()
    levels = torch.tensor([-1.0, -1 / 3, 1 / 3, 1.0]) * m
    nearest = levels[(v32[picked].unsqueeze(1) - levels).abs().argmin(dim=1)]
    out = torch.zeros_like(v32)
    out[picked] = nearest
    return out.to(v.dtype)


def reference(world, steps, period, fragments, delay, alpha, compress=None, error_decay=None):
    """Every worker's flat parameters after each step, by the paper's algorithm.

    Per worker: SGD with momentum on its own batches. Rounds every ``period / fragments`` steps, fragment ``(r - 1) %
    fragments`` at round r. ``delay`` steps before a round each worker snapshots that fragment; at the round the
    outer Nesterov SGD steps on theta_f with the mean pseudo-gradient theta_f - snapshot_i (or, with ``compress``, the
    mean of compress(e_i) with e_i <- decay e_i + delta_i, e_i <- e_i - compress(e_i)), and x_f <- (1 - alpha) theta_f
    + alpha x_f.
    """
    models = [make_layered_model(torch.float64) for _ in range(world)]
    opts = [torch.optim.SGD(m.parameters(), lr=LR, momentum=MOMENTUM) for m in models]
    theta = flat_params(models[0]).clone()
    velocity = torch.zeros_like(theta)
    errors = [torch.zeros_like(theta) for _ in range(world)]
    index = fragment_index(fragments)
    spacing = period // fragments
    snapshots: dict[int, list[torch.Tensor]] = {}
    history: list[list[torch.Tensor]] = [[] for _ in range(world)]

    def write(model, values):
        offset = 0
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(values[offset : offset + p.numel()].view_as(p))
                offset += p.numel()

    for step in range(steps):
        for rank, (model, opt) in enumerate(zip(models, opts)):
            opt.zero_grad()
            loss_of(model, rank, step).backward()
            opt.step()
        done = step + 1
        if (done + delay) % spacing == 0:  # a round comes `delay` steps from now (or now): snapshot its fragment
            f = ((done + delay) // spacing - 1) % fragments
            snapshots[f] = [flat_params(m)[index[f]].clone() for m in models]
        if done % spacing == 0:
            f = (done // spacing - 1) % fragments
            idx = index[f]
            deltas = [theta[idx] - s for s in snapshots.pop(f)]
            if compress is not None:
                sent = []
                for rank, delta in enumerate(deltas):
                    e = errors[rank][idx]
                    if error_decay is not None:
                        e = error_decay * e + delta
                        c = compress(e)
                        errors[rank][idx] = e - c
                    else:
                        c = compress(delta)
                    sent.append(c)
                deltas = sent
            delta = sum(deltas) / world
            v = OUTER_MOMENTUM * velocity[idx] + delta
            velocity[idx] = v
            theta[idx] = theta[idx] - OUTER_LR * (delta + OUTER_MOMENTUM * v)  # torch's Nesterov SGD
            for model in models:
                x = flat_params(model)
                x[idx] = (1 - alpha) * theta[idx] + alpha * x[idx]
                write(model, x)
        for rank, model in enumerate(models):
            history[rank].append(flat_params(model).clone())
    return history


def ours(world, steps, cut=None, **options):
    runs = train_workers(lambda: DiLoCo(**options), world, steps, dtype=torch.float64, cut=cut)
    return [[entry["params"] for entry in history] for history, _ in runs], [algorithm for _, algorithm in runs]


@pytest.mark.parametrize(
    ("fragments", "delay", "alpha"),
    [(1, 0, 0.3), (1, 2, 0.0), (2, 0, 0.0), (2, 1, 0.0), (2, 2, 0.6), (3, 1, 0.25), (3, 0, 0.0)],
)
def test_streaming_diloco_is_the_papers_algorithm_step_by_step(fragments, delay, alpha):
    period, world, steps = 6, 3, 20
    want = reference(world, steps, period, fragments, delay, alpha)
    got, algorithms = ours(
        world, steps, period=period, fragments=fragments, sync_delay=delay, merge_alpha=alpha, bucket_cap_mb=25
    )
    for rank in range(world):
        for step, (a, b) in enumerate(zip(got[rank], want[rank], strict=True)):
            torch.testing.assert_close(a, b, atol=1e-12, rtol=0, msg=lambda m, s=step: f"step {s}: {m}")
    # the fragments the algorithm cut are the layers above, one bucket each here
    assert algorithms[0].flat.bucket_fragments == list(range(fragments))
    assert (got[0][-1] - got[1][-1]).abs().max() > 1e-4  # the replicas do differ between rounds


def test_one_fragment_without_delay_or_merge_is_todays_diloco_bit_for_bit():
    plain, _ = ours(3, 13, period=4, bucket_cap_mb=0.0001)
    streaming, algorithms = ours(3, 13, period=4, fragments=1, sync_delay=0, merge_alpha=0.0, bucket_cap_mb=0.0001)
    assert len(algorithms[0].flat.buckets) > 1
    for a, b in zip(plain, streaming):
        for x, y in zip(a, b, strict=True):
            assert torch.equal(x, y)


def test_fragments_without_delay_average_in_place_like_the_reference_and_send_a_fragment_per_round():
    period, world = 6, 2
    want = reference(world, 12, period, 3, 0, 0.0)
    got, algorithms = ours(world, 12, period=period, fragments=3, bucket_cap_mb=25)
    torch.testing.assert_close(got[0][-1], want[0][-1], atol=1e-12, rtol=0)
    stats = algorithms[0].comm.stats
    assert stats.rounds == 6
    # the same number of rounds of the whole model, every 2 steps, costs the same flags and set-up: what differs is
    # that every round of ours all-reduces one layer (a ring all-reduce of 2 ranks sends the tensor once)
    _, whole = ours(world, 12, period=2, bucket_cap_mb=25)
    assert whole[0].comm.stats.rounds == 6
    sizes = [LAYER_SIZES[r % 3] for r in range(6)]
    assert whole[0].comm.stats.bytes_sent - stats.bytes_sent == 8 * (6 * sum(LAYER_SIZES) - sum(sizes))


@pytest.mark.parametrize("world", [2, 3])
def test_a_lossless_compressor_equals_no_compression(world):
    """``none`` sends float32: with a float64 model it rounds, so the check runs on float32-exact data."""
    plain, _ = ours(world, 14, period=4, fragments=2, sync_delay=1, bucket_cap_mb=25)
    none, _ = ours(world, 14, period=4, fragments=2, sync_delay=1, compressor="none", bucket_cap_mb=25)
    for a, b in zip(plain, none):
        # mean_i(theta - x_i) vs theta - mean_i(x_i), x_i rounded to float32 on the wire: equal to float32 rounding
        torch.testing.assert_close(a[-1], b[-1], atol=1e-6, rtol=0)
        assert not torch.equal(a[-1], a[0])


@pytest.mark.parametrize(("decay", "delay", "period"), [(None, 0, 4), (1.0, 2, 8), (0.9, 1, 4)])
def test_compressed_pseudo_gradients_with_error_feedback_follow_the_reference(decay, delay, period):
    world, steps = 3, 21
    want = reference(world, steps, period, 2, delay, 0.0, compress=scaled_sign, error_decay=decay)
    options = {"error_feedback": decay is not None}
    if decay is not None:
        options["error_decay"] = decay
    got, _ = ours(
        world,
        steps,
        period=period,
        fragments=2,
        sync_delay=delay,
        compressor="sign",
        bucket_cap_mb=25,
        **options,
    )
    for rank in range(world):
        # the payload carries float32 scales and the model is float64: equal to float32 rounding of the scale
        torch.testing.assert_close(got[rank][-1], want[rank][-1], atol=1e-6, rtol=1e-6)
    # and the compression mattered: without error feedback the result is not the one with it
    if decay == 1.0:
        other = reference(world, steps, period, 2, delay, 0.0, compress=scaled_sign, error_decay=None)
        assert (other[0][-1] - want[0][-1]).abs().max() > 1e-3


@pytest.mark.parametrize(
    "options",
    [
        {"fragments": 2, "sync_delay": 2},
        {"fragments": 3, "sync_delay": 1, "merge_alpha": 0.3},
        {"fragments": 2, "sync_delay": 1, "compressor": "sign", "error_feedback": True, "error_decay": 0.9},
        {"fragments": 2, "compressor": "sign", "error_feedback": True},
    ],
)
@pytest.mark.parametrize("cut", [4, 5, 6])
def test_resuming_with_a_fragment_in_flight_matches_the_uninterrupted_run(options, cut):
    """period 6 and 2 fragments: rounds after steps 3, 6, 9...; with delay 2 the transfer of the round after step 6
    starts after step 4: cutting before steps 4, 5 and 6 saves before it started, in flight, and landed."""
    straight, _ = ours(3, 14, period=6, bucket_cap_mb=25, **options)
    resumed, _ = ours(3, 14, cut=cut, period=6, bucket_cap_mb=25, **options)
    for a, b in zip(straight, resumed):
        for x, y in zip(a, b, strict=True):
            assert torch.equal(x, y)


def test_a_non_finite_replica_is_named_when_its_early_transfer_lands_and_nothing_it_sent_is_read():
    thetas = {}

    def worker(rank, comm):
        model = make_layered_model(torch.float64)
        opt = torch.optim.SGD(model.parameters(), lr=LR)
        algorithm = DiLoCo(period=4, fragments=2, sync_delay=1, compressor="sign")
        algorithm.setup(model, comm, [opt])
        try:
            for step in range(8):
                opt.zero_grad()
                loss_of(model, rank, step).backward()
                opt.step()
                if rank == 1 and step == 0:
                    with torch.no_grad():
                        next(model.parameters()).view(-1)[0] = math.nan
                algorithm.end_step()
        finally:
            thetas[rank] = torch.cat([t.reshape(-1) for t in algorithm.global_params])

    with pytest.raises(NonFiniteError, match=r"rank 1 held inf/NaN parameters at round 1 \(its transfer"):
        run_simulated(2, worker)
    assert all(torch.isfinite(theta).all() for theta in thetas.values())


def test_bytes_sent_are_the_compressed_payloads():
    world = 3
    _, compressed = ours(world, 8, period=4, fragments=2, sync_delay=1, compressor="sign", bucket_cap_mb=25)
    _, plain = ours(world, 8, period=4, fragments=2, sync_delay=1, bucket_cap_mb=25)  # same rounds and flags
    assert compressed[0].comm.stats.rounds == plain[0].comm.stats.rounds == 4
    # 4 rounds, fragments of 48 and 81 elements: all-gathered payloads of one float32 scale and the packed signs,
    # sent to the 2 other ranks, instead of a float64 ring all-reduce (2 (N - 1) / N of the bytes per rank)
    payloads = [4 + math.ceil(48 / 8), 4 + math.ceil(81 / 8)]
    ring = [2 * (world - 1) * 8 * n // world for n in (48, 81)]
    difference = plain[0].comm.stats.bytes_sent - compressed[0].comm.stats.bytes_sent
    assert difference == 2 * (sum(ring) - (world - 1) * sum(payloads))


def test_bad_streaming_arguments_are_refused_up_front():
    with pytest.raises(ValueError, match="multiple of `fragments=4`"):
        DiLoCo(period=6, fragments=4)
    with pytest.raises(ValueError, match="`sync_delay=3` must be less than"):
        DiLoCo(period=6, fragments=2, sync_delay=3)
    with pytest.raises(ValueError, match="`merge_alpha`"):
        DiLoCo(merge_alpha=1.0)
    with pytest.raises(ValueError, match="does not combine"):
        DiLoCo(overlap=True, fragments=2, period=4)
    with pytest.raises(ValueError, match="need a `compressor`"):
        DiLoCo(error_feedback=True)
    with pytest.raises(ValueError, match="deterministic"):
        DiLoCo(compressor="qsgd")
    with pytest.raises(ValueError, match="`error_decay`"):
        DiLoCo(compressor="sign", error_feedback=True, error_decay=0.0)
    with pytest.raises(ValueError, match="skip_round"):
        DiLoCo(period=4, fragments=2).set_nonfinite_policy("skip_round")

    def worker(rank, comm):
        model = make_layered_model(torch.float64)
        DiLoCo(period=8, fragments=4).setup(model, comm, [])

    with pytest.raises(ValueError, match="more than the 3 layer"):
        run_simulated(1, worker)


def test_a_bfloat16_model_keeps_theta_and_the_error_in_float32_and_resumes_exactly():
    options = {"period": 4, "fragments": 2, "sync_delay": 1, "compressor": "sign", "error_feedback": True}

    def run_bf16(cut=None):
        return train_workers(lambda: DiLoCo(**options), 2, 10, dtype=torch.bfloat16, cut=cut)

    straight, resumed = run_bf16(), run_bf16(cut=5)
    for (a, algorithm), (b, _) in zip(straight, resumed):
        assert all(t.dtype == torch.float32 for t in algorithm.global_params)
        assert all(e.dtype == torch.float32 for e in algorithm.state_buckets("pseudo_gradient_error"))
        assert torch.isfinite(a[-1]["params"]).all()
        for x, y in zip(a, b, strict=True):
            assert torch.equal(x["params"], y["params"])


@pytest.mark.parametrize(
    ("compressor", "options", "compress", "decay"),
    [
        ("int4", {}, int4, None),
        ("int8", {}, None, None),
        ("sparse_topk", {"k": 8}, sparse_top8_2bit, 0.95),
    ],
)
def test_quantised_and_sparse_pseudo_gradients_follow_the_reference(compressor, options, compress, decay):
    period, world, steps = 4, 3, 21
    extra = {"error_decay": decay} if decay is not None else {}
    got, _ = ours(
        world,
        steps,
        period=period,
        fragments=2,
        sync_delay=1,
        compressor=compressor,
        compressor_options=options,
        bucket_cap_mb=25,
        **extra,
    )
    if compress is None:  # int8: within its quantisation error of full precision, and not equal to it
        plain = reference(world, steps, period, 2, 1, 0.0)
        gap = (got[0][-1] - plain[0][-1]).abs().max()
        assert 0 < gap < 1e-2
        return
    want = reference(world, steps, period, 2, 1, 0.0, compress=compress, error_decay=decay)
    for rank in range(world):
        torch.testing.assert_close(got[rank][-1], want[rank][-1], atol=1e-6, rtol=1e-6)
