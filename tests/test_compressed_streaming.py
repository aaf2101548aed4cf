"""The compressed exchanges stream chunk by chunk: the same bits as one whole vector, memory bounded by the chunks.

Invariance: a run whose chunks cut through parameters (and blocks that do not end on a byte) gives bit-identical
parameters and error state to the same run with the whole model as one chunk, at 2, 3 and 4 ranks, in float32 and
bf16, with two optimizers and parameters that some or all ranks leave without a gradient. The update rules
themselves are checked against the spec in ``test_liec_ef_math.py`` (with chunks cutting through parameters too).
Memory: the resident-set high-water mark of a process running one exchange of a 32 MB model with 1 MB chunks.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

from lightning_localsgd.algorithms import LIECSGD, ErrorFeedbackSGD
from lightning_localsgd.algorithms.chunks import ChunkPlan, ChunkWriter, gather_chunk
from lightning_localsgd.comm import run_simulated
from lightning_localsgd.compression import QSGD, NoCompression, ScaledSign

WHOLE_MB = 1024.0  # larger than the model: one chunk
SMALL_MB = 0.0001  # 26 float32 elements: chunks of one 16-element block, cutting through every parameter


def model_of(dtype: torch.dtype) -> nn.Sequential:
    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(7, 33), nn.Tanh(), nn.Linear(33, 19), nn.Tanh(), nn.Linear(19, 3), nn.Linear(3, 3))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return model.to(dtype)


def run(make_algorithm, world: int, dtype: torch.dtype, steps: int = 7):
    """Per rank: the parameters after every step and the algorithm's error state at the end. Two optimizers (SGD
    with momentum and weight decay, Adam); at every third step the last layer gets no gradient anywhere, and at the
    step after that none on rank 0."""

    def worker(rank, comm):
        model = model_of(dtype)
        params = list(model.parameters())
        opts = [
            torch.optim.SGD(params[:4], lr=0.05, momentum=0.9, weight_decay=1e-3),
            torch.optim.Adam(params[4:], lr=0.01),
        ]
        algorithm = make_algorithm()
        algorithm.setup(model, comm, opts)
        history = []
        for step in range(steps):
            for opt in opts:
                opt.zero_grad(set_to_none=True)
            g = torch.Generator().manual_seed(1000 * rank + step)
            x, y = torch.randn(16, 7, generator=g) + rank, torch.randn(16, 3, generator=g)
            skip_last = step % 3 == 1 or (step % 3 == 2 and rank == 0)
            out = model[:5](x.to(dtype)) if skip_last else model(x.to(dtype))
            ((out - y.to(dtype)) ** 2).mean().backward()
            for opt in opts:
                algorithm.before_optimizer_step(opt)
                opt.step()
                algorithm.after_optimizer_step(opt)
            algorithm.end_step()
            history.append([p.detach().clone() for p in params])
        state = algorithm.state_dict()
        errors = {k: [t.clone() for t in state[k]] for k in ("error", "server_error", "delta") if k in state}
        return history, errors

    return run_simulated(world, worker)


def assert_bit_identical(streamed, whole) -> None:
    for (history, errors), (ref_history, ref_errors) in zip(streamed, whole):
        for step, (params, ref_params) in enumerate(zip(history, ref_history)):
            for p, q in zip(params, ref_params):
                assert torch.equal(p, q), f"parameters differ after step {step}"
        assert errors.keys() == ref_errors.keys()
        for name in errors:  # the bucket layouts differ with the bucket cap: compare the concatenations
            assert torch.equal(torch.cat(errors[name]), torch.cat(ref_errors[name])), name


ALGORITHMS = {
    "ef_sign": lambda cap, block: ErrorFeedbackSGD(ScaledSign(block), period=4, bucket_cap_mb=cap),
    "ef_qsgd": lambda cap, block: ErrorFeedbackSGD(QSGD(15, block), period=4, bucket_cap_mb=cap),
    "ef_none": lambda cap, block: ErrorFeedbackSGD(NoCompression(), period=4, bucket_cap_mb=cap),
    "liec": lambda cap, block: LIECSGD(3, block_size_mb=block, bucket_cap_mb=cap, server="replicated"),
    "liec_vr": lambda cap, block: LIECSGD(
        3, block_size_mb=block, bucket_cap_mb=cap, variance_reduction=True, server="replicated"
    ),
}


@pytest.mark.parametrize("world", [2, 3, 4])
@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_chunks_that_cut_through_parameters_give_the_bits_of_one_whole_vector(name, world):
    block = 64 / 2**20  # 16-element blocks
    make = ALGORITHMS[name]
    streamed = run(lambda: make(SMALL_MB, block), world, torch.float32)
    whole = run(lambda: make(WHOLE_MB, block), world, torch.float32)
    assert_bit_identical(streamed, whole)


@pytest.mark.parametrize("name", ["ef_sign", "liec"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_half_and_double_precision_models_stream_to_the_same_bits(name, dtype):
    block = 64 / 2**20
    streamed = run(lambda: ALGORITHMS[name](SMALL_MB, block), 3, dtype)
    whole = run(lambda: ALGORITHMS[name](WHOLE_MB, block), 3, dtype)
    assert_bit_identical(streamed, whole)


@pytest.mark.parametrize("name", ["ef_sign", "liec"])
def test_blocks_that_end_inside_a_byte_stream_to_the_same_bits(name):
    block = 44 / 2**20  # 11-element blocks: chunks of 22 elements, whose sign bits do not end on a byte
    streamed = run(lambda: ALGORITHMS[name](SMALL_MB, block), 3, torch.float32)
    whole = run(lambda: ALGORITHMS[name](WHOLE_MB, block), 3, torch.float32)
    assert_bit_identical(streamed, whole)


# 66 elements cut every 1, 4, 16, 66 and 1000: with `absorb_tail`, a last chunk shorter than half a chunk (16's 2)
# joins the one before; 4's last 2 is not shorter than half of 4.
ABSORBED = {1: [1] * 66, 4: [4] * 16 + [2], 16: [16, 16, 16, 18], 66: [66], 1000: [66]}


@pytest.mark.parametrize("absorb_tail", [False, True])
def test_a_chunk_plan_covers_every_element_once_in_order_and_scatters_back(absorb_tail):
    numels = [5, 0, 17, 3, 0, 40, 1]
    tensors = [torch.arange(n, dtype=torch.float64) + 100 * i for i, n in enumerate(numels)]
    whole = torch.cat(tensors)
    for chunk_numel in (1, 4, 16, 66, 1000):
        plan = ChunkPlan(numels, chunk_numel, absorb_tail=absorb_tail)
        expected = [min(chunk_numel, whole.numel() - s) for s in range(0, 66, chunk_numel)]
        assert [c.numel for c in plan] == (ABSORBED[chunk_numel] if absorb_tail else expected)
        buffer = torch.empty(max(c.numel for c in plan), dtype=torch.float32)
        rebuilt = [torch.full_like(t, -1.0) for t in tensors]
        writer = ChunkWriter(rebuilt.__getitem__)
        for chunk in plan:
            values = gather_chunk(chunk, tensors, buffer)
            assert torch.equal(values, whole[chunk.start : chunk.start + chunk.numel].float())
            writer.write(chunk, values)
        writer.finish()
        assert all(torch.equal(a, b) for a, b in zip(rebuilt, tensors))


def test_a_strided_tensor_is_read_in_logical_order_and_written_whole_at_the_end():
    weight = torch.randn(2, 3, 4, 5).to(memory_format=torch.channels_last)  # no flat view
    tensors = [torch.randn(7), weight, None]
    plan = ChunkPlan([7, weight.numel(), 6], 50)
    target = torch.zeros_like(weight)
    writer = ChunkWriter(lambda i: target if i == 1 else None)
    for chunk in plan:
        values = gather_chunk(chunk, tensors, torch.empty(50))
        expected = torch.cat([tensors[0], weight.reshape(-1), torch.zeros(6)])[chunk.start : chunk.start + chunk.numel]
        assert torch.equal(values, expected)
        writer.write(chunk, values)
        assert bool((target == 0).all())  # staged: chunks gathered later still read what it held
    writer.finish()
    assert torch.equal(target, weight) and target.is_contiguous(memory_format=torch.channels_last)


def test_a_part_of_a_chunk_writes_only_its_elements_and_keeps_the_rest_of_a_strided_target():
    weight = torch.randn(3, 4, 5, 6).to(memory_format=torch.channels_last)
    flat = torch.randn(11)
    plan = ChunkPlan([11, weight.numel()], 64)
    originals = [flat.clone(), weight.clone()]
    targets = [flat, weight]
    writer = ChunkWriter(targets.__getitem__)
    for chunk in plan:
        part = chunk.part(5, min(20, chunk.numel - 5))  # elements [5, 25) of every chunk
        writer.write(part, torch.full((part.numel,), 7.0))
    writer.finish()
    whole_before = torch.cat([t.reshape(-1) for t in originals])
    whole_after = torch.cat([t.reshape(-1) for t in targets])
    written = torch.zeros(whole_before.numel(), dtype=torch.bool)
    for start in range(0, whole_before.numel(), 64):
        written[start + 5 : min(start + 25, whole_before.numel())] = True
    assert bool((whole_after[written] == 7.0).all())
    assert torch.equal(whole_after[~written], whole_before[~written])


@pytest.mark.parametrize("world", [2, 3, 4])
@pytest.mark.parametrize("block_bytes", [64, 44])  # blocks of 16 elements, and of 11 (bits that end inside a byte)
@pytest.mark.parametrize("variance_reduction", [False, True])
def test_the_sharded_server_gives_the_replicated_servers_bits(world, block_bytes, variance_reduction):
    """Streamed in small chunks, each split over the ranks, the sharded server steps every rank exactly as the
    replicated server does on one whole vector; its ranks' parts of ``e`` are disjoint and add up to that server's
    ``e``. With the last layer missing gradients at some steps, its shards move, and the parts are re-split."""
    block = block_bytes / 2**20

    def make(server, cap):
        return lambda: LIECSGD(
            3, block_size_mb=block, bucket_cap_mb=cap, variance_reduction=variance_reduction, server=server
        )

    sharded = run(make("sharded", SMALL_MB), world, torch.float32)
    replicated = run(make("replicated", WHOLE_MB), world, torch.float32)
    for (history, _), (ref_history, _) in zip(sharded, replicated):
        for params, ref_params in zip(history, ref_history):
            assert all(torch.equal(p, q) for p, q in zip(params, ref_params))
    parts = torch.stack([torch.cat(errors["server_error"]) for _, errors in sharded])
    assert int((parts != 0).sum(0).max()) <= 1
    assert torch.equal(parts.sum(0), torch.cat(replicated[0][1]["server_error"]))


PEAK_SCRIPT = textwrap.dedent(
    """
    import sys, threading, torch
    from torch import nn
    from lightning_localsgd.algorithms import LIECSGD, ErrorFeedbackSGD
    from lightning_localsgd.comm import run_simulated
    from lightning_localsgd.compression import ScaledSign

    def status(field):
        for line in open("/proc/self/status"):
            if line.startswith(field):
                return int(line.split()[1]) * 1024

    torch.set_num_threads(1)
    name, width, layers = sys.argv[1], 1024, 8  # 8 M float32 parameters: 32 MB
    barrier, marks = threading.Barrier(2), {}

    def worker(rank, comm):
        torch.manual_seed(0)
        model = nn.Sequential(*[nn.Linear(width, width) for _ in range(layers)])
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        algorithm = (
            ErrorFeedbackSGD(ScaledSign(0.25), period=100, bucket_cap_mb=1.0)
            if name == "ef_sign"
            else LIECSGD(100, block_size_mb=0.25, bucket_cap_mb=1.0)
        )
        algorithm.setup(model, comm, [opt])
        x = torch.randn(4, width)
        for step in range(3):
            opt.zero_grad(set_to_none=False)
            model(x + rank).pow(2).mean().backward()
            barrier.wait()
            if step == 2 and rank == 0:  # the steady state: buffers and state exist, gradients are in place
                open("/proc/self/clear_refs", "w").write("5")  # resets VmHWM to the current resident set
                marks["before"] = status("VmRSS")
            barrier.wait()
            algorithm.before_optimizer_step(opt)
            barrier.wait()
            if step == 2 and rank == 0:
                marks["peak"] = status("VmHWM")
            opt.step()
            algorithm.end_step()

    run_simulated(2, worker)
    print((marks["peak"] - marks["before"]) / (width * width * layers * 4))
    """
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status and clear_refs")
@pytest.mark.parametrize("name", ["ef_sign", "liec"])
def test_one_exchange_of_a_32_mb_model_holds_a_few_chunks_of_a_1_mb_bucket_not_copies_of_the_model(name):
    """Two ranks (threads of one process) exchange a 32 MB model with a 1 MB bucket cap (0.25 MB chunks, two on hand
    at a time): the resident set grows by a small fraction of one model copy (the whole-vector exchange grew it by
    4.5 copies for EF-SGD, 6.2 for LIEC-SGD)."""
    result = subprocess.run(
        [sys.executable, "-c", PEAK_SCRIPT, name], capture_output=True, text=True, timeout=120, check=True
    )
    copies = float(result.stdout.strip().splitlines()[-1])
    assert copies < 0.3, f"one exchange grew the resident set by {copies:.2f} copies of the model (both ranks)"
