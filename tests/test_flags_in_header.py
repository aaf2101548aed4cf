"""A compressed step's flags travel with its first payload: one all-gather of fixed-size frames, no flag all-reduce.

ef_sign and LIEC-SGD (replicated server) send every synchronisation point's flags in a frame of one size, the first
chunk's payload in its tail where the step has one. These tests count the collectives a step issues, and check that
what the flags decide still holds: a rank out of step or with another trainable set is named instead of pairing
frames of different sizes, a non-finite rank is named and nothing reaches an error buffer, and a step whose first
chunk was prepared and then dropped leaves a random compressor's draws as if it had never been prepared.
"""

from __future__ import annotations

import math

import pytest
import torch
from sim_utils import SMALL_BUCKET_MB, flat_params, loss_of, make_layered_model

from lightning_localsgd.algorithms import LIECSGD, ErrorFeedbackSGD
from lightning_localsgd.comm import run_simulated
from lightning_localsgd.compression import QSGD, ScaledSign
from lightning_localsgd.errors import NonFiniteError, OutOfStepError, RanksDisagreeError

BLOCK = 16  # elements per scaled-sign block: the small bucket cap is below one, so every chunk is one block
BLOCK_MB = BLOCK * 4 / 2**20
COLLECTIVES = ("all_reduce_sum_", "all_gather_", "start_all_gather_", "all_to_all_", "broadcast_")


def make(name: str, compressor=None):
    """``ef_sign``, ``liec_sgd`` (replicated server) or ``liec_sharded``, with one-block chunks."""
    compressor = compressor or ScaledSign(BLOCK_MB)
    if name == "ef_sign":
        return ErrorFeedbackSGD(compressor, period=100, bucket_cap_mb=SMALL_BUCKET_MB)
    server = "sharded" if name == "liec_sharded" else "replicated"
    return LIECSGD(4, bucket_cap_mb=SMALL_BUCKET_MB, compressor=compressor, server=server)


def set_up(name: str, comm, compressor=None, policy: str = "raise"):
    """This rank's model, plain SGD and the algorithm ``name`` set up over ``comm``."""
    model = make_layered_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    algorithm = make(name, compressor)
    algorithm.set_nonfinite_policy(policy)
    algorithm.setup(model, comm, [opt])
    return model, opt, algorithm


def sign_payload(numel: int) -> int:
    """Bytes of a scaled-sign payload: a float32 scale per block, then one bit per element."""
    return 4 * math.ceil(numel / BLOCK) + math.ceil(numel / 8)


def record_collectives(comm, calls: list) -> None:
    """Note every collective this rank's communicator issues: its name and the tensor's bytes."""
    for name in COLLECTIVES:
        original = getattr(comm, name)

        def recorded(*args, _name=name, _original=original, **kwargs):
            tensors = args[0] if isinstance(args[0], (list, tuple)) else [args[0]]
            calls.append((_name, sum(t.numel() * t.element_size() for t in tensors)))
            return _original(*args, **kwargs)

        setattr(comm, name, recorded)


def chunks_of(numel: int, chunk: int) -> list[int]:
    """Chunk lengths: every ``chunk`` elements, a last one shorter than half a chunk joining the one before."""
    lengths = [min(chunk, numel - start) for start in range(0, numel, chunk)]
    return [*lengths[:-2], lengths[-2] + lengths[-1]] if len(lengths) > 1 and lengths[-1] < chunk // 2 else lengths


def shards_of(numel: int, world: int) -> list[int]:
    """The sharded server's layout of a chunk: whole blocks, as evenly as they go, lower ranks taking the extra."""
    blocks = [min(BLOCK, numel - start) for start in range(0, numel, BLOCK)]
    counts = [len(blocks) // world + (k < len(blocks) % world) for k in range(world)]
    starts = [sum(counts[:k]) for k in range(world)]
    return [sum(blocks[starts[k] : starts[k] + counts[k]]) for k in range(world)]


def flag_bytes(name: str, world: int) -> int:
    """The flag vector: finiteness, position and 2 fingerprint slots (3 for LIEC-SGD) per rank, and 3 request
    slots, in float64."""
    slots = 2 if name == "ef_sign" else 3
    return 8 * ((2 + slots) * world + 3)


def run_recording_collectives(name: str, world: int, steps: int):
    """Per rank: the collectives of each step's exchange, the model's size and the communicator's stats."""

    def worker(rank, comm):
        model, opt, algorithm = set_up(name, comm)
        per_step = []
        for step in range(steps):
            opt.zero_grad()
            loss_of(model, rank, step).backward()
            calls: list = []
            record_collectives(comm, calls)
            algorithm.before_optimizer_step(opt)
            per_step.append(calls)
            for collective in COLLECTIVES:  # back to the originals
                del comm.__dict__[collective]
            opt.step()
            algorithm.after_optimizer_step(opt)
            algorithm.end_step()
        numel = sum(p.numel() for p in model.parameters())
        return per_step, numel, algorithm.comm.stats

    return run_simulated(world, worker)


@pytest.mark.parametrize("world", [2, 3, 4])
@pytest.mark.parametrize("name", ["ef_sign", "liec_sgd"])
def test_a_compressed_step_is_one_all_gather_per_chunk_and_its_flags_ride_in_the_first(name, world):
    # One block per chunk (the bucket cap is below one block), and no other collective: no flag all-reduce.
    # LIEC-SGD: steps 0 to 2 compressed, step 3 full precision
    for per_step, numel, stats in run_recording_collectives(name, world, steps=4):
        payloads = [sign_payload(n) for n in chunks_of(numel, BLOCK)]  # a block a chunk, the 1-element tail joined
        frame = flag_bytes(name, world) + payloads[0]  # room for the model's first payload: here one block's
        compressed = per_step if name == "ef_sign" else per_step[:3]
        for calls in compressed:
            # The later chunks' all-gathers travel in the background while the next chunk is prepared.
            assert calls == [("all_gather_", frame)] + [("start_all_gather_", b) for b in payloads[1:]]
        if name == "liec_sgd":  # the full-precision step: its flags in a frame of the same size, then all-reduces
            assert per_step[3][0] == ("all_gather_", frame)
            assert {c for c, _ in per_step[3][1:]} == {"all_reduce_sum_"}
        # The frame's payload area counts with the exchange's bytes, its flags do not.
        assert stats.exchange_bytes_sent == len(compressed) * (world - 1) * sum(payloads)


@pytest.mark.parametrize("world", [2, 3, 4])
def test_a_sharded_server_step_sends_its_flags_in_every_piece_of_its_first_all_to_all(world):
    """Sharded, a chunk is one block per rank (the last one joined by a short tail): an all-to-all of shard payloads,
    then an all-gather of the server's packed results (padded to the longest). The first all-to-all's pieces each
    carry the whole flag vector."""
    flags = flag_bytes("liec_sharded", world)
    runs = run_recording_collectives("liec_sharded", world, steps=4)
    for rank, (per_step, numel, stats) in enumerate(runs):
        shards = [shards_of(length, world) for length in chunks_of(numel, BLOCK * world)]
        expected = []
        for number, lengths in enumerate(shards):
            pieces = [sign_payload(n) for n in lengths]
            head = flags * world if number == 0 else 0
            expected += [("all_to_all_", head + sum(pieces)), ("all_gather_", max(pieces))]
        for calls in per_step[:3]:
            assert calls == expected
        assert per_step[3][0] == ("all_to_all_", flags * world + sum(sign_payload(n) for n in shards[0]))
        assert {c for c, _ in per_step[3][1:]} == {"all_reduce_sum_"}
        sent = sum(
            sum(sign_payload(n) for k, n in enumerate(lengths) if k != rank)
            + (world - 1) * max(map(sign_payload, lengths))
            for lengths in shards
        )
        assert stats.exchange_bytes_sent == 3 * sent


@pytest.mark.parametrize("name", ["ef_sign", "liec_sgd", "liec_sharded"])
def test_a_rank_at_its_final_average_while_the_others_exchange_is_named_on_every_rank(name):
    """Rank 1's data ran out after 2 steps: its final average's flags meet rank 0's third exchange."""

    def worker(rank, comm):
        model, opt, algorithm = set_up(name, comm)
        try:
            for step in range(3 if rank == 0 else 2):
                opt.zero_grad()
                loss_of(model, rank, step).backward()
                algorithm.before_optimizer_step(opt)
                opt.step()
                algorithm.end_step()
            before = flat_params(model).clone()
            algorithm.finalize()
        except OutOfStepError as error:
            if rank == 1:
                assert torch.equal(flat_params(model), before)  # nothing averaged
            return str(error)
        return None

    for message in run_simulated(2, worker):
        assert message is not None
        assert "rank 0: gradient exchange at step 2" in message and "rank 1: final average at step 2" in message


@pytest.mark.parametrize("name", ["ef_sign", "liec_sgd", "liec_sharded"])
def test_a_rank_that_froze_a_layer_alone_is_named_although_its_first_payload_is_shorter(name):
    def worker(rank, comm):
        model, opt, algorithm = set_up(name, comm)
        for step in range(3):
            if step == 1 and rank == 1:
                for p in model[0].parameters():  # 48 of the 129 elements: the first chunks are other elements
                    p.requires_grad_(False)
            opt.zero_grad()
            loss_of(model, rank, step).backward()
            try:
                algorithm.before_optimizer_step(opt)
            except RanksDisagreeError as error:
                return step, str(error)
            opt.step()
            algorithm.end_step()
        return None

    for result in run_simulated(2, worker):
        assert result is not None
        step, message = result
        assert step == 1 and "trainable parameters" in message and "ranks [1] differ from rank 0" in message


@pytest.mark.parametrize("name", ["ef_sign", "liec_sgd", "liec_sharded"])
def test_a_nan_on_one_rank_is_named_and_its_first_payload_reaches_no_error_buffer(name):
    error_name = "error" if name == "ef_sign" else "server_error"

    def worker(rank, comm, policy):
        model, opt, algorithm = set_up(name, comm, policy=policy)
        errors = []
        for step in range(3):
            opt.zero_grad()
            loss_of(model, rank, step).backward()
            if step == 1 and rank == 0:
                next(model.parameters()).grad.view(-1)[0] = math.nan  # in the first chunk
            before = torch.cat([e.clone() for e in algorithm.state_buckets(error_name)])
            try:
                algorithm.before_optimizer_step(opt)
            except NonFiniteError as error:
                after = torch.cat(list(algorithm.state_buckets(error_name)))
                return str(error), torch.equal(before, after)
            after = torch.cat(list(algorithm.state_buckets(error_name)))
            errors.append((before, after))
            opt.step()
            algorithm.end_step()
        return errors, flat_params(model)

    for message, untouched in run_simulated(2, lambda rank, comm: worker(rank, comm, "raise")):
        assert "rank 0 held inf/NaN gradients at the gradient exchange of step 1" in message
        assert untouched
    with pytest.warns(RuntimeWarning, match="dropped on every rank"):
        runs = run_simulated(2, lambda rank, comm: worker(rank, comm, "skip_round"))
    for errors, params in runs:
        before, after = errors[1]
        assert torch.equal(before, after)  # the dropped step left the error as it was
        assert not torch.equal(errors[2][0], errors[2][1])  # the next step moved it again
        assert all(torch.isfinite(e).all() for pair in errors for e in pair) and torch.isfinite(params).all()


def test_a_dropped_first_chunk_leaves_a_random_compressor_as_if_it_had_never_drawn():
    """QSGD draws its rounding from a per-rank generator. Step 1 is dropped on every rank (NaN on rank 0): the first
    chunk each rank prepared before the verdict must not have used up draws the next step's exchange needs."""

    def worker(rank, comm):
        model, opt, algorithm = set_up("ef_sign", comm, QSGD(levels=7, block_size_mb=BLOCK_MB), "skip_round")
        states = []
        for step in range(3):
            opt.zero_grad()
            loss_of(model, rank, step).backward()
            if step == 1 and rank == 0:
                next(model.parameters()).grad.view(-1)[0] = math.nan
            before = algorithm.compressor.state_dict()["generator"]  # None until the first draw
            algorithm.before_optimizer_step(opt)
            states.append((before, algorithm.compressor.state_dict()["generator"]))
            opt.step()
            algorithm.end_step()
        return states

    with pytest.warns(RuntimeWarning, match="dropped on every rank"):
        runs = run_simulated(2, worker)
    for states in runs:
        assert states[0][0] is None and states[0][1] is not None  # a kept step draws
        assert torch.equal(*states[1])  # the dropped one does not
        assert not torch.equal(*states[2])


def test_a_first_chunk_longer_than_the_models_goes_after_the_flags_not_in_their_frame():
    """The frames are sized by the whole model's first chunk (one block here). An exchange of 17 elements is one
    chunk (its 1-element tail joins it), one element longer: its payload does not fit, so the frame goes padded
    and the chunk follows in an all-gather of its own; the step is still taken, the same on both ranks."""

    def worker(rank, comm):
        model = make_layered_model()
        for p in model.parameters():
            p.requires_grad_(False)
        chosen = [model[2].bias, *model[-1].parameters()]  # 8 + 8 + 1 elements
        for p in chosen:
            p.requires_grad_(True)
        opt = torch.optim.SGD(chosen, lr=0.05)
        algorithm = make("ef_sign")
        algorithm.setup(model, comm, [opt])
        opt.zero_grad()
        loss_of(model, rank, 0).backward()
        calls: list = []
        record_collectives(comm, calls)
        before = flat_params(model).clone()
        algorithm.before_optimizer_step(opt)
        opt.step()
        return calls, before, flat_params(model)

    runs = run_simulated(2, worker)
    frame = flag_bytes("ef_sign", 2) + sign_payload(BLOCK)
    for calls, before, after in runs:
        assert calls == [("all_gather_", frame), ("start_all_gather_", sign_payload(17))]
        assert not torch.equal(before, after)
    assert torch.equal(runs[0][2], runs[1][2])
