"""Peers run by a Lightning Trainer: Lightning's own DDP, one process without communication, and ours."""

from __future__ import annotations

from typing import Any, Optional

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import StrategyRegistry
from torch import Tensor
from torch.utils.data import DataLoader

import lightning_localsgd
from benchmarks.alternating import AlternatingRounds
from benchmarks.peers import Peer
from benchmarks.plain_loop import ring_payload
from benchmarks.recorder import StepRecorder
from benchmarks.workloads import Workload


class BenchModule(L.LightningModule):
    """The workload's model, loss, optimizer and per-rank data, unchanged, behind Lightning's hooks."""

    def __init__(self, workload: Workload, rank: int, world_size: int) -> None:
        super().__init__()
        self.workload, self.rank, self.world_size = workload, rank, world_size
        self.model = workload.build_model()

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self.workload.loss(self.model, batch)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return self.workload.make_optimizer(self.model.parameters())

    def train_dataloader(self) -> DataLoader:
        return self.workload.train_loader(self.rank, self.world_size)


class RecordSteps(Callback):
    """Feeds the recorder; our strategies' round callback runs before it, so a round is inside its step."""

    def __init__(self, recorder: StepRecorder) -> None:
        self.recorder = recorder

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.recorder.start()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        self.recorder.step_done()


ALTERNATE = "rounds_in_alternate_blocks"  # a peer option of the lab's, not the strategy's: see benchmarks.alternating


class AlignBlocks(Callback):
    """Alternating runs: the ranks meet before each on block, outside both measured windows. Nothing couples them in
    an off block, so one rank gets ahead there; without this it would wait out that lead inside the next on window.
    Runs after :class:`RecordSteps`, so the wait falls into the first step of the on block, which neither window
    measures."""

    def __init__(self, block: int, warmup_steps: int) -> None:
        self.block, self.warmup_steps = block, warmup_steps

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        local = trainer.global_step - self.warmup_steps
        if local > 0 and local % (2 * self.block) == 0:
            torch.distributed.barrier()


def build_strategy(peer: Peer) -> Any:
    if peer.strategy == "single":
        return "auto"
    entry = StrategyRegistry[peer.strategy]
    options = {k: v for k, v in peer.options.items() if k != ALTERNATE}
    strategy = entry["strategy"](**{**entry["init_params"], **options})
    if peer.options.get(ALTERNATE):
        strategy.algorithm.schedule = AlternatingRounds(strategy.algorithm.schedule, peer.options[ALTERNATE])
    return strategy


def run_lightning(
    peer: Peer, workload: Workload, rank: int, world_size: int, recorder_args: dict[str, Any]
) -> StepRecorder:
    torch.manual_seed(0)  # the same initial weights in every peer and on every rank
    module = BenchModule(workload, rank, world_size)
    strategy = build_strategy(peer)
    payload = ring_payload(sum(p.numel() for p in module.parameters()), world_size)
    recorder = StepRecorder(module.model, modelled_bytes=lambda: 0, **recorder_args)
    if isinstance(strategy, lightning_localsgd.LocalUpdateStrategy):
        ours: Optional[lightning_localsgd.LocalUpdateStrategy] = strategy
        recorder.modelled_bytes = lambda: ours.comm_stats.bytes_sent
    elif peer.strategy != "single":  # Lightning DDP: one gradient all-reduce per step
        recorder.modelled_bytes = lambda: payload * recorder.count
    callbacks: list[Callback] = [RecordSteps(recorder)]
    if peer.options.get(ALTERNATE):
        block = peer.options[ALTERNATE] * peer.options["period"]
        callbacks.append(AlignBlocks(block, peer.options.get("warmup_steps", 0)))
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        num_nodes=world_size,  # one process per "node": each rank is started by hand, in its own namespace
        strategy=strategy,
        max_steps=recorder.total,
        callbacks=callbacks,
        use_distributed_sampler=False,  # the workload's own per-rank data, exactly as the plain loops get it
        limit_val_batches=0,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module)
    if isinstance(strategy, lightning_localsgd.LocalUpdateStrategy):
        recorder.extra["comm"] = strategy.comm_stats.state_dict()  # rounds, waits, time in flight
    return recorder
