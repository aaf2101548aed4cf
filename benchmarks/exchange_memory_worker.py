"""One configuration of :mod:`benchmarks.exchange_memory`: a Lightning fit of a wide MLP; each rank writes
``rank<R>.json`` (peak RSS, step times, which steps held a round) into ``--out``.

    python -m benchmarks.exchange_memory_worker --strategy local_sgd --params-millions 5 --steps 8 --out DIR

``--strategy single`` is plain one-process Lightning; any other name is looked up in Lightning's strategy registry
and run on 2 CPU processes, rank 1 started by Lightning's own launcher (which re-runs this command), as for users.
``--save-at S`` also times one ``trainer.save_checkpoint`` after step S and the peak memory it adds
(:mod:`benchmarks.save_memory`).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

import lightning_localsgd  # noqa: F401 - registers the strategy names


def mlp_width(params_millions: float, layers: int) -> int:
    """Width of ``layers`` square linear layers holding about ``params_millions`` million parameters."""
    return max(1, round(math.sqrt(params_millions * 1e6 / layers)))


def wide_mlp(width: int, layers: int) -> nn.Sequential:
    blocks: list[nn.Module] = []
    for i in range(layers):
        blocks.append(nn.Linear(width, width))
        if i < layers - 1:
            blocks.append(nn.ReLU())
    return nn.Sequential(*blocks)


class OneBatchPerStep(Dataset):
    """A fixed random batch per rank, handed out whole every step: no loading cost, nothing downloaded."""

    def __init__(self, rank: int, batch_size: int, width: int, steps: int) -> None:
        g = torch.Generator().manual_seed(rank)
        self.x = torch.randn(batch_size, width, generator=g)
        self.y = torch.randn(batch_size, width, generator=g)
        self.steps = steps

    def __len__(self) -> int:
        return self.steps

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        return self.x, self.y


class WideMLP(L.LightningModule):
    def __init__(self, width: int, layers: int, batch_size: int, steps: int) -> None:
        super().__init__()
        torch.manual_seed(0)  # the same initial weights on every rank and in every configuration
        self.model = wide_mlp(width, layers)
        self.width, self.batch_size, self.steps = width, batch_size, steps

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        return nn.functional.mse_loss(self.model(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=1e-3, momentum=0.9)

    def train_dataloader(self) -> DataLoader:
        data = OneBatchPerStep(self.global_rank, self.batch_size, self.width, self.steps)
        return DataLoader(data, batch_size=None)


def rounds_so_far(strategy: Any) -> int:
    """Our strategies count their rounds; Lightning's have none (every DDP step is the same)."""
    stats = getattr(strategy, "comm_stats", None)
    return stats.rounds if stats is not None else 0


class StepTimer(Callback):
    """Wall time of each training batch, and whether it held a round. Our strategies round in a callback they put
    first in ``trainer.callbacks``, so the round falls inside this window."""

    def __init__(self) -> None:
        self.seconds: list[float] = []
        self.round_steps: list[bool] = []
        self._start, self._rounds = 0.0, 0

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        self._rounds = rounds_so_far(trainer.strategy)
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        self.seconds.append(time.perf_counter() - self._start)
        self.round_steps.append(rounds_so_far(trainer.strategy) > self._rounds)


def status_bytes(field: str) -> int:
    """A size from ``/proc/self/status`` (``VmHWM``: the peak resident set size; ``VmRSS``: the current one)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024  # reported in kB
    raise RuntimeError(f"no {field} in /proc/self/status")


def peak_rss_bytes() -> int:
    """This process's peak resident set size (``VmHWM``), in bytes."""
    return status_bytes("VmHWM")


class SaveProbe(Callback):
    """At the end of step ``step``: one ``trainer.save_checkpoint``, its seconds and the peak resident memory it
    added (the peak is reset just before it through ``/proc/self/clear_refs``). The files are removed after."""

    def __init__(self, step: int, directory: Path) -> None:
        self.step, self.directory = step, directory
        self.seconds: Optional[float] = None
        self.extra_bytes: Optional[int] = None

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if trainer.global_step != self.step:
            return
        path = self.directory / "probe.ckpt"
        trainer.strategy.barrier()
        before = status_bytes("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
        start = time.perf_counter()
        trainer.save_checkpoint(path)
        self.seconds = time.perf_counter() - start
        self.extra_bytes = peak_rss_bytes() - before
        trainer.strategy.barrier()
        trainer.strategy.remove_checkpoint(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--strategy", required=True, help="'single', or a registered strategy name")
    parser.add_argument("--params-millions", type=float, required=True)
    parser.add_argument("--layers", type=int, required=True)
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--batch-size", type=int, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--save-at", type=int, default=0, help="step after which one checkpoint is timed (0: none)")
    run(parser.parse_args())


def run(args: argparse.Namespace, extra_callbacks: Sequence[Callback] = ()) -> dict[str, Any]:
    """One configuration: fit, then write this rank's record (also returned) into ``args.out``."""
    torch.set_num_threads(1)  # one core per rank: 2 ranks on the machine's 2 cores
    width = mlp_width(args.params_millions, args.layers)
    module = WideMLP(width, args.layers, args.batch_size, args.steps)
    timer = StepTimer()
    callbacks: list[Callback] = [timer, *extra_callbacks]
    probe = SaveProbe(args.save_at, args.out) if args.save_at else None
    callbacks += [probe] if probe is not None else []
    single = args.strategy == "single"
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1 if single else 2,
        strategy="auto" if single else args.strategy,
        max_steps=args.steps,
        callbacks=callbacks,
        use_distributed_sampler=False,  # each rank's own synthetic batch
        limit_val_batches=0,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module)
    parameters = list(module.parameters())
    record = {
        "strategy": args.strategy,
        "rank": trainer.global_rank,
        "peak_rss_bytes": peak_rss_bytes(),
        "model_bytes": sum(p.numel() * p.element_size() for p in parameters),
        "numel": sum(p.numel() for p in parameters),
        "width": width,
        "step_seconds": timer.seconds,
        "round_steps": timer.round_steps,
        "save_seconds": probe.seconds if probe is not None else None,
        "save_extra_bytes": probe.extra_bytes if probe is not None else None,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))
    return record


if __name__ == "__main__":
    main()
