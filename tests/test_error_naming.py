"""Which errors inside a synchronisation point are named a peer failure, and which pass through unchanged."""

from __future__ import annotations

import re
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

from lightning_localsgd.algorithms.guard import failures_named
from lightning_localsgd.comm import run_simulated
from lightning_localsgd.errors import NonFiniteError, OutOfStepError, PeerFailureError

LABEL = "LocalSGDStrategy (LocalSGD)"
TIMEOUT = timedelta(seconds=15)


def raised_inside(error: BaseException) -> BaseException:
    """The exception that leaves ``failures_named`` when ``error`` is raised inside it."""
    with pytest.raises(BaseException) as caught, failures_named(LABEL, "round 3", TIMEOUT):
        raise error
    return caught.value


@pytest.mark.parametrize(
    "error",
    [
        RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 15.78 GiB total capacity)"),
        torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB"),
        RuntimeError("mat1 and mat2 shapes cannot be multiplied (8x6 and 5x16)"),
        TypeError("unsupported operand type(s) for +: 'Tensor' and 'NoneType'"),
        ValueError("bad value"),
        NonFiniteError("rank 1 held inf/NaN", [1], 6),
        OutOfStepError("the ranks reached different synchronisation points"),
        PeerFailureError("inner: a collective at round 3 failed; the strategy's `collective_timeout` argument"),
    ],
    ids=["oom-message", "oom-type", "shapes", "type", "value", "nonfinite", "out-of-step", "already-named"],
)
def test_errors_that_are_not_a_peer_failure_pass_through_as_the_same_object(error):
    assert raised_inside(error) is error


def test_a_shape_mismatch_inside_a_collective_is_not_blamed_on_a_peer():
    def worker(rank, comm):
        with failures_named(LABEL, "round 1", TIMEOUT):
            comm.all_reduce_sum_([torch.ones(3 + rank)])  # a bug: the ranks pass different shapes

    with pytest.raises(RuntimeError, match=r"(?i)shape") as caught:
        run_simulated(2, worker)
    assert not isinstance(caught.value, PeerFailureError)


@pytest.mark.parametrize(
    "error",
    [
        dist.DistBackendError("Watchdog caught collective operation timeout: WorkNCCL(SeqNum=12, OpType=ALLREDUCE)"),
        dist.DistNetworkError("failed to recv, got 0 bytes"),
        dist.DistStoreError("wait timeout after 30000ms, keys: /default_pg/0//cuda//0"),
        RuntimeError(
            "[/pytorch/third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 15000ms for recv "
            "operation to complete"
        ),
        RuntimeError(
            "[/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:537] Read error [127.0.0.1]:21414: "
            "Connection reset by peer."
        ),
        RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:598] Connection closed by peer [10.0.0.2]:4891"),
        RuntimeError("Socket Timeout"),
    ],
    ids=["nccl-timeout", "network", "store", "gloo-timeout", "gloo-reset", "gloo-closed", "socket"],
)
def test_distributed_errors_and_gloo_timeouts_become_a_peer_failure_naming_the_place(error):
    named = raised_inside(error)
    assert isinstance(named, PeerFailureError)
    assert named.__cause__ is error
    assert str(named).startswith(f"{LABEL}: a collective at round 3 failed after ")
    assert "A peer rank died, is stuck" in str(named) and "collectives wait at most 15 s" in str(named)


def test_a_simulated_peer_that_never_arrives_is_named_a_peer_failure_after_the_timeout():
    def worker(rank, comm):
        if rank == 1:
            return  # never reaches the collective
        with failures_named(LABEL, "warm-up step 2", timedelta(seconds=0.2)):
            comm.all_reduce_sum_([torch.ones(2)])

    with pytest.raises(PeerFailureError, match=re.escape(f"{LABEL}: a collective at warm-up step 2 failed")):
        run_simulated(2, worker, timeout=0.2)
