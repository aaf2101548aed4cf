"""One rank of one configuration of :mod:`benchmarks.sharded_groups`: a ``Trainer.fit`` of a stack of square
``Linear`` layers, started as torchrun starts ranks (``RANK``, ``WORLD_SIZE``, ``LOCAL_WORLD_SIZE``, ``GROUP_RANK``,
``MASTER_ADDR``/``MASTER_PORT`` and ``TORCHELASTIC_RUN_ID`` in the environment), so Lightning launches nothing.

    --strategy local_sgd|diloco  --shard-size S   replica groups of S ranks (S = 1: a full replica per rank)
    --strategy fsdp                               FSDP2 over every rank, through Lightning's ModelParallelStrategy
                                                  (its FSDPStrategy refuses the CPU)

Writes ``<out>/rank<R>.json``: the resident memory before the model existed and its peak at the end of fit, the
end time of every step, what the strategy counted as sent after every step and its rounds.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import time
from pathlib import Path
from typing import Any, Optional

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn
from torch.utils.data import DataLoader

import lightning_localsgd  # noqa: F401 - registers the strategy names
from benchmarks.exchange_memory_worker import OneBatchPerStep

OUTER = {"outer_optimizer": "SGD", "outer_optimizer_options": {"lr": 0.7, "momentum": 0.9, "nesterov": True}}


def status_bytes(field: str) -> int:
    """``VmRSS`` (resident now) or ``VmHWM`` (its peak) of this process, from ``/proc/self/status``, in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def set_mmap_threshold(nbytes: int) -> None:
    """glibc: serve every allocation of ``nbytes`` or more by its own ``mmap``, returned to the system when freed.

    By default glibc raises this threshold up to 32 MiB as large blocks are freed, after which blocks below it come
    from the heap, where freed memory stays resident and fragments: FSDP2's gathered layers and gradients (one
    Linear's worth, allocated and freed at every step) then grow the resident set well past what is live. Fixing
    the threshold (``mallopt``, as ``MALLOC_MMAP_THRESHOLD_`` would, but also in a forked process) measures what is
    live."""
    m_mmap_threshold = -3  # from malloc.h
    if ctypes.CDLL("libc.so.6").mallopt(m_mmap_threshold, nbytes) != 1:
        raise RuntimeError(f"mallopt(M_MMAP_THRESHOLD, {nbytes}) failed")


class LinearStack(L.LightningModule):
    """``layers`` square Linear layers with ReLU between them, in the child ``net`` (replica groups shard the
    LightningModule's children, never the module itself)."""

    def __init__(self, width: int, layers: int, batch_size: int, steps: int) -> None:
        super().__init__()
        torch.manual_seed(0)  # the same initial weights on every rank and in every configuration
        blocks: list[nn.Module] = []
        for i in range(layers):
            blocks += [nn.Linear(width, width)] + ([nn.ReLU()] if i < layers - 1 else [])
        self.net = nn.Sequential(*blocks)
        self.width, self.batch_size, self.steps = width, batch_size, steps

    def configure_model(self) -> None:
        """Plain FSDP2 for the ``fsdp`` baseline only (replica groups shard the module themselves): each Linear its
        own unit, then ``net``, as ``shard_layers=["Linear"]`` shards it inside a replica group."""
        from lightning.pytorch.strategies import ModelParallelStrategy

        if not isinstance(self.trainer.strategy, ModelParallelStrategy):
            return
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"]
        for layer in self.net:
            if isinstance(layer, nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(self.net, mesh=mesh)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=1e-3, momentum=0.9)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(OneBatchPerStep(self.global_rank, self.batch_size, self.width, self.steps), batch_size=None)


class StepLog(Callback):
    """After every step: its end time, and (our strategies) the bytes sent and rounds so far. A round runs in a
    callback our strategies put first, so it is over by this callback's ``on_train_batch_end``."""

    def __init__(self) -> None:
        self.ends: list[float] = []
        self.bytes_sent: list[int] = []
        self.rounds: list[int] = []
        self.start = 0.0
        self.start_bytes_sent = self.start_rounds = 0

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.start = time.perf_counter()
        stats = getattr(trainer.strategy, "comm_stats", None)  # the set-up broadcast is in already
        self.start_bytes_sent, self.start_rounds = (stats.bytes_sent, stats.rounds) if stats is not None else (0, 0)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        self.ends.append(time.perf_counter())
        stats = getattr(trainer.strategy, "comm_stats", None)
        self.bytes_sent.append(stats.bytes_sent if stats is not None else 0)
        self.rounds.append(stats.rounds if stats is not None else 0)


def build_strategy(name: str, shard_size: int, period: int) -> Any:
    if name == "fsdp":
        from lightning.pytorch.strategies import ModelParallelStrategy

        world = int(os.environ["WORLD_SIZE"])  # one data-parallel dimension over every rank: plain FSDP
        return ModelParallelStrategy(data_parallel_size=world, tensor_parallel_size=1)
    options: dict[str, Any] = {"period": period, **(OUTER if name == "diloco" else {})}
    if shard_size > 1:
        options.update(shard_size=shard_size, shard_layers=["Linear"])
    return L.pytorch.strategies.StrategyRegistry[name]["strategy"](**options)


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--strategy", required=True, choices=["local_sgd", "diloco", "fsdp"])
    parser.add_argument("--shard-size", type=int, default=1)
    parser.add_argument("--period", type=int, default=4)
    parser.add_argument("--width", type=int, required=True)
    parser.add_argument("--layers", type=int, required=True)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--mmap-threshold", type=int, default=0, help="glibc's, in bytes (0: its default)")
    args = parser.parse_args(argv)
    if args.mmap_threshold:
        set_mmap_threshold(args.mmap_threshold)

    torch.set_num_threads(1)  # one core per rank; OMP_NUM_THREADS=1 is set by the launcher as well
    start_rss = status_bytes("VmRSS")  # torch, Lightning and this package imported, no model yet
    world, local = int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_WORLD_SIZE"])
    module = LinearStack(args.width, args.layers, args.batch_size, args.steps)
    numel = sum(p.numel() for p in module.parameters())
    shapes = [list(p.shape) for p in module.parameters()]
    strategy = build_strategy(args.strategy, args.shard_size, args.period)
    log = StepLog()
    trainer = L.Trainer(
        accelerator="cpu",
        devices=local,
        num_nodes=world // local,
        strategy=strategy,
        max_steps=args.steps,
        callbacks=[log],
        use_distributed_sampler=False,  # each rank's own synthetic batch
        limit_val_batches=0,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module)
    stats = getattr(strategy, "comm_stats", None)
    record = {
        "rank": trainer.global_rank,
        "world_size": world,
        "strategy": args.strategy,
        "shard_size": args.shard_size,
        "period": args.period,
        "mmap_threshold": args.mmap_threshold,
        "start_rss_bytes": start_rss,
        "peak_rss_bytes": status_bytes("VmHWM"),
        "numel": numel,
        "shapes": shapes,
        "model_bytes": 4 * numel,
        "train_start": log.start,
        "step_ends": log.ends,
        "start_bytes_sent": log.start_bytes_sent,
        "start_rounds": log.start_rounds,
        "step_bytes_sent": log.bytes_sent,
        "step_rounds": log.rounds,
        "bytes_sent": stats.bytes_sent if stats is not None else None,  # after fit: the final average included
        "rounds": stats.rounds if stats is not None else None,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main()
