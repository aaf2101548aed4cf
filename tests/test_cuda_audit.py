"""What only a GPU would show, checked on the CPU (docs/cuda_audit.md): host syncs per step, and devices followed.

On CUDA every host read of a device tensor (``.tolist()``, ``.item()``, ``bool(t)``, a 0-dim tensor used as an index)
stalls the host until the stream drains, and a tensor built on the host from a Python list (``torch.tensor``) is a
blocking copy to the device. Here each of those, made by library code in a worker's own thread, is counted while
simulated workers train; the bounds are the design's: a local step reads nothing, a synchronisation point reads its
one flag collective.
"""

from __future__ import annotations

import sys
import threading
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from dist_utils import run_processes
from sim_utils import SMALL_BUCKET_MB, loss_of, make_layered_model

import lightning_localsgd
from lightning_localsgd import algorithms as algos
from lightning_localsgd.algorithms import gossip_native
from lightning_localsgd.algorithms.guard import finite_flag, flag_vector
from lightning_localsgd.comm import ProcessGroupCommunicator, run_simulated
from lightning_localsgd.comm.grad_sync import gradient_flags
from lightning_localsgd.comm.simulated import SimulatedCommunicator, run_simulated_nodes
from lightning_localsgd.compression import packing, sign_format
from lightning_localsgd.compression.compressors import QSGD, ScaledSign, TopK, _Blocks

LIBRARY = str(Path(lightning_localsgd.__file__).parent) + "/"
SIMULATED = LIBRARY + "comm/simulated.py"  # the simulated network's own bookkeeping is no part of a GPU run
READS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__")

_tls = threading.local()


def _record(kind: str) -> None:
    log = getattr(_tls, "log", None)
    if log is None:
        return
    caller = sys._getframe(2).f_code.co_filename
    if caller.startswith(LIBRARY) and caller != SIMULATED:
        log.append((kind, f"{caller[len(LIBRARY) :]}:{sys._getframe(2).f_lineno}"))


def _counting(kind: str, original: Callable[..., Any]) -> Callable[..., Any]:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        _record(kind)
        return original(*args, **kwargs)

    return wrapper


def _syncing_index(index: Any) -> bool:
    """A 0-dim integer tensor (read with ``item``) or a boolean mask (``nonzero``) as an index: a host sync on CUDA."""
    parts = index if isinstance(index, tuple) else (index,)
    return any(
        isinstance(p, torch.Tensor) and (p.dtype == torch.bool or (p.dim() == 0 and not p.is_floating_point()))
        for p in parts
    )


@pytest.fixture
def host_syncs(monkeypatch):
    """Count, per worker thread, what would stall a GPU: ``with host_syncs() as log`` collects them in ``log``."""
    # The scaled sign's and the gossip's CPU accelerations (the C kernels, NumPy's sign packing and lane sums) read
    # host memory by design and never run on CUDA: off here, so that these CPU runs take the code a CUDA run takes.
    monkeypatch.setattr(sign_format, "kernels", lambda: None)
    monkeypatch.setattr(gossip_native, "gossip_kernels", lambda: None)
    monkeypatch.setattr(sign_format, "_numpy", None)
    monkeypatch.setattr(packing, "_numpy", None)
    for name in READS:
        monkeypatch.setattr(torch.Tensor, name, _counting(name, getattr(torch.Tensor, name)))
    for name in ("tensor", "as_tensor", "equal"):
        monkeypatch.setattr(torch, name, _counting(f"torch.{name}", getattr(torch, name)))
    for name in ("__getitem__", "__setitem__"):
        original = getattr(torch.Tensor, name)

        def indexing(self, index, *rest, _original=original, _name=name):
            if _syncing_index(index):
                _record(f"{_name} with a tensor index")
            return _original(self, index, *rest)

        monkeypatch.setattr(torch.Tensor, name, indexing)

    def counted(exchange):
        def counted_exchange(self, *args, **kwargs):
            log = getattr(_tls, "log", None)
            if log is not None:
                log.append(("exchange", ""))  # not a read: gossip's bound is per exchange
            return exchange(self, *args, **kwargs)

        return counted_exchange

    for name in ("neighbour_exchange_", "start_neighbour_exchange_"):  # blocking, and the pipelined gossip's
        monkeypatch.setattr(SimulatedCommunicator, name, counted(getattr(SimulatedCommunicator, name)))

    class Scope:
        def __init__(self) -> None:
            self.log: list[tuple[str, str]] = []

        def __enter__(self) -> list[tuple[str, str]]:
            _tls.log = self.log
            return self.log

        def __exit__(self, *exc: Any) -> None:
            _tls.log = None

    return Scope


def _reads(log: list[tuple[str, str]]) -> list[tuple[str, str]]:
    return [entry for entry in log if entry[0] != "exchange"]


def _train(make: Callable[[], Any], host_syncs, steps: int = 12, nodes: int = 0, dtype=torch.float32):
    """Rank 0's per-step ``(round held, log)`` of 4 simulated workers driven through every moment of a step."""

    def worker(rank, comm, intra=None, cross=None):
        model = make_layered_model(dtype)
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        algorithm = make()
        if intra is not None:
            algorithm.set_node_groups(intra, cross)
        algorithm.setup(model, comm, [opt])
        history = []
        for step in range(steps):
            scope = host_syncs()
            with scope if rank == 0 else _Quiet():
                opt.zero_grad()
                algorithm.before_backward(opt)
                loss_of(model, rank, step).backward()
                algorithm.before_optimizer_step(opt)
                opt.step()
                algorithm.after_optimizer_step(opt)
                held = algorithm.end_step()
            history.append((held, scope.log))
        return history

    if nodes:
        return run_simulated_nodes(nodes, 4 // nodes, worker)[0]
    return run_simulated(4, lambda rank, comm: worker(rank, comm))[0]


class _Quiet:
    def __enter__(self) -> None:
        _tls.log = None

    def __exit__(self, *exc: Any) -> None:
        _tls.log = None


CAP = {"bucket_cap_mb": SMALL_BUCKET_MB}  # several buckets: a per-bucket read would show
PERIODIC = {
    "local_sgd": lambda: algos.LocalSGD(period=4, **CAP),
    "vrl_sgd": lambda: algos.VRLSGD(period=4, **CAP),
    "overlap_local_sgd": lambda: algos.OverlapLocalSGD(period=4, **CAP),
    "cocod_sgd": lambda: algos.CoCoDSGD(period=4, **CAP),
    "diloco": lambda: algos.DiLoCo(period=4, **CAP),
    "diloco_overlap": lambda: algos.DiLoCo(period=4, overlap=True, **CAP),
    "stl_sgd": lambda: algos.STLSGD(first_stage_steps=8, first_period=2, **CAP),
    "hierarchical_local_sgd": lambda: algos.HierarchicalLocalSGD(2, 4, **CAP),
}


@pytest.mark.parametrize("name", list(PERIODIC))
def test_local_steps_read_nothing_and_a_round_reads_its_flags(name, host_syncs):
    history = _train(PERIODIC[name], host_syncs, nodes=2 if name.startswith("hier") else 0)
    assert any(held for held, _ in history) and not all(held for held, _ in history)
    for step, (held, log) in enumerate(history):
        reads = _reads(log)
        if not held:
            assert reads == [], f"step {step}: a local step read {reads}"
        else:
            # The round's flag collective; a round applied late also decides on its own replica's finiteness
            # before its transfer (a non-finite replica sends zeros).
            assert len(reads) <= (2 if "overlap" in name or "cocod" in name else 1), f"step {step}: {reads}"


EXCHANGING = {
    # The default 5 MiB block: one block, a multiple of 8, over 129 elements (the decoder's tail ends inside a byte).
    "ef_sign": lambda: algos.ErrorFeedbackSGD(period=4, **CAP),
    "ef_sign_small_blocks": lambda: algos.ErrorFeedbackSGD(ScaledSign(0.0001), period=4, **CAP),
    "ef_topk": lambda: algos.ErrorFeedbackSGD(TopK(0.1), period=4, **CAP),
    "ef_qsgd": lambda: algos.ErrorFeedbackSGD(QSGD(block_size_mb=0.0001), period=4, **CAP),
    "liec_sgd": lambda: algos.LIECSGD(full_sync_period=4, block_size_mb=0.0001, **CAP),
}


@pytest.mark.parametrize("name", list(EXCHANGING))
def test_a_gradient_exchange_reads_only_its_flag_collective(name, host_syncs):
    for step, (held, log) in enumerate(_train(EXCHANGING[name], host_syncs)):
        reads = _reads(log)
        # One read per synchronisation point: the step's exchange, and the round's when one is held.
        assert len(reads) == (2 if held else 1), f"step {step}: {reads}"
        assert all(kind == "tolist" for kind, _ in reads), reads


def test_a_warmup_step_reads_its_flags_and_the_buckets_gradient_flags_once(host_syncs):
    history = _train(lambda: algos.LocalSGD(period=4, warmup_steps=8, **CAP), host_syncs)
    for step, (_, log) in enumerate(history[:8]):
        reads = _reads(log)
        assert len(reads) <= 2, f"warm-up step {step}: {reads}"  # the flag collective; all buckets' flags at once


@pytest.mark.parametrize(
    "make",
    [
        lambda: algos.DPSGD(check_every=4, **CAP),
        lambda: algos.DeTAG(check_every=4, gossip_rounds=2, **CAP),
    ],
    ids=["dpsgd", "detag"],
)
def test_gossip_reads_twice_per_exchange(make, host_syncs):
    """Before sending, whether the chunk is finite (a non-finite one is announced, not sent); after, every
    neighbour's header at once. Plus the step's gradients and whole message, and a check's flags."""
    for step, (held, log) in enumerate(_train(make, host_syncs)):
        exchanges = sum(kind == "exchange" for kind, _ in log)
        reads = _reads(log)
        assert exchanges > 1
        assert len(reads) <= 2 + 2 * exchanges + (1 if held else 0), f"step {step}: {exchanges} exchanges, {reads}"
        assert not any(kind.startswith("torch.") for kind, _ in reads), reads


def test_sign_decoding_a_tail_inside_a_byte_reads_nothing(host_syncs):
    compressor = ScaledSign()  # blocks of 5 MiB: a multiple of 8 elements
    vector = torch.randn(1001, generator=torch.Generator().manual_seed(0))
    payload = compressor.encode(vector)
    with host_syncs() as log:
        decoded = compressor.decode(payload, vector.numel())
    assert _reads(log) == []
    scale = vector.abs().mean()
    torch.testing.assert_close(decoded, torch.where(vector < 0, -scale, scale))


# ---------------------------------------------------------------------- devices followed, on the meta device
META = torch.device("meta")  # a stand-in for "not the CPU": mixing it with a CPU tensor raises


class _MetaComm:
    rank, world_size = 1, 3


def test_the_guard_flags_stay_on_the_tensors_device():
    flag = finite_flag([torch.empty(5, device=META), torch.empty(3, device=META)])
    assert isinstance(flag, torch.Tensor) and flag.device == META
    flags = flag_vector(_MetaComm(), flag, 7, {"stop"}, META, (0.5, 2.0))
    assert flags.device == META and flags.dtype == torch.float64


def test_gradient_flags_and_block_lengths_are_built_on_the_device():
    params = [torch.nn.Parameter(torch.empty(3, device=META)) for _ in range(2)]
    assert gradient_flags(params, torch.float32, META).device == META
    blocks = _Blocks(1001, 256)
    assert blocks.lengths(META).device == META
    lengths = blocks.lengths(torch.device("cpu"), torch.float64)
    assert lengths.tolist() == [256.0, 256.0, 256.0, 233.0]


@pytest.mark.parametrize(
    "compressor", [ScaledSign(), ScaledSign(0.0001), TopK(0.1)], ids=["sign", "sign_small", "topk"]
)
def test_compressors_follow_the_tensors_device(compressor):
    vector = torch.empty(1001, device=META)
    payload = compressor.encode(vector)
    assert payload.device == META
    assert compressor.decode(payload, vector.numel()).device == META


# ---------------------------------------------------------------------- gloo with device tensors: through the host
def _staged_collectives(rank: int) -> list[list[torch.Tensor]]:
    comm = ProcessGroupCommunicator()
    staged = []

    def stage(self, tensor):  # as for a CUDA tensor on gloo; on the CPU `.cpu()` is the tensor itself
        staged.append(tensor.shape)
        return True

    comm._stages_through_host = stage.__get__(comm)
    mine = torch.arange(4.0) + 10 * rank
    gathered = [t.clone() for t in comm.all_gather_(mine)]
    pieces = [t.clone() for t in comm.all_to_all_(mine, [2, 2])]
    out = {1 - rank: torch.full((4,), -1.0)}
    comm.neighbour_exchange_(mine, [(1 - rank, 1 - rank)], out=out)
    assert len(staged) == 3
    return [gathered, pieces, [out[1 - rank]]]


def test_gloo_collectives_staged_through_the_host_deliver_the_same():
    for rank, (gathered, pieces, received) in enumerate(run_processes(2, _staged_collectives)):
        sent = [torch.arange(4.0) + 10 * r for r in range(2)]
        assert all(torch.equal(a, b) for a, b in zip(gathered, sent))
        assert all(torch.equal(a, s[2 * rank : 2 * rank + 2]) for a, s in zip(pieces, sent))
        assert torch.equal(received[0], sent[1 - rank])
