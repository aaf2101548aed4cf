"""Peers written as plain PyTorch loops: the compute limit, torch DDP, and torch DDP + post-local SGD.

Post-local SGD needs a DDP communication hook, and Lightning registers those only on CUDA, so on CPU the
faithful way to run torch's own implementation is torch's own loop.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks.post_localSGD_hook import PostLocalSGDState, post_localSGD_hook
from torch.distributed.algorithms.model_averaging.averagers import PeriodicModelAverager
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from benchmarks.peers import Peer
from benchmarks.recorder import StepRecorder
from benchmarks.workloads import Workload


def endless(loader: DataLoader) -> Iterator[Any]:
    """Epoch after epoch, telling the sampler the epoch as Lightning does, so both see the same order."""
    epoch = 0
    while True:
        sampler = loader.sampler
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        yield from loader
        epoch += 1


def ring_payload(numel: int, world_size: int) -> int:
    """Bytes one rank sends in a ring all-reduce of ``numel`` fp32 values."""
    return int(numel * 4 * 2 * (world_size - 1) / world_size)


def run_plain(
    peer: Peer, workload: Workload, rank: int, world_size: int, recorder_args: dict[str, Any]
) -> StepRecorder:
    torch.manual_seed(0)  # the same initial weights in every peer and on every rank
    model = workload.build_model()
    payload = ring_payload(sum(p.numel() for p in model.parameters()), world_size)
    averager: Optional[PeriodicModelAverager] = None
    if peer.kind in ("torch_ddp", "torch_post_local"):
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
        model = DistributedDataParallel(model)
    if peer.kind == "torch_post_local":
        # start_localSGD_iter=0 and no gradient all-reduce afterwards: only the averager communicates,
        # the same schedule as our local_sgd with warmup_steps=0 (average after steps 1, 1 + period, ...).
        state = PostLocalSGDState(None, None, start_localSGD_iter=0, post_local_gradient_allreduce=False)
        model.register_comm_hook(state, post_localSGD_hook)
        averager = PeriodicModelAverager(period=peer.options["period"], warmup_steps=0)
    optimizer = workload.make_optimizer(model.parameters())

    recorder = StepRecorder(model, modelled_bytes=lambda: 0, **recorder_args)
    if peer.kind == "torch_ddp":
        recorder.modelled_bytes = lambda: payload * recorder.count
    elif averager is not None:
        period = averager.period
        recorder.modelled_bytes = lambda: payload * math.ceil(recorder.count / period)

    batches = endless(workload.train_loader(rank, world_size))
    recorder.start()
    for _ in range(recorder.total):
        optimizer.zero_grad(set_to_none=True)
        workload.loss(model, next(batches)).backward()
        optimizer.step()
        if averager is not None:
            averager.average_parameters(model.parameters())
        recorder.step_done()
    if dist.is_initialized():
        dist.destroy_process_group()
    return recorder
