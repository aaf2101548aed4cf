"""What the device check trains and measures with: the models, the data, the strategy settings and the callbacks
that record what each rank saw (see ``gpu_check.py`` for the checks themselves).

Every rank trains on its own synthetic data (the ranks' batches differ, so replicas really drift between rounds),
generated from the rank and the batch index alone: a resumed run sees exactly the batches the uninterrupted one saw.
"""

from __future__ import annotations

import time
from typing import Any, Optional

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

# Per strategy (a label may add options to a registered name): settings whose rounds, periods and stages all fall
# inside the check's 10 steps, with a mid-period checkpoint at step 6 (rounds at 4 and 8).
STRATEGIES: dict[str, tuple[str, dict[str, Any]]] = {
    "local_sgd": ("local_sgd", {"period": 4}),
    "vrl_sgd": ("vrl_sgd", {"period": 4}),
    "overlap_local_sgd": ("overlap_local_sgd", {"period": 4}),
    "cocod_sgd": ("cocod_sgd", {"period": 4}),
    "liec_sgd": ("liec_sgd", {"full_sync_period": 4}),
    "ef_sign": ("ef_sign", {"period": 4}),
    "dpsgd": ("dpsgd", {"check_every": 4}),
    "detag": ("detag", {"check_every": 4}),
    "diloco": ("diloco", {"period": 4}),
    "diloco_overlap_theta_on_cpu": ("diloco", {"period": 4, "global_device": "cpu", "overlap": True}),
    # Streaming DiLoCo: a fragment's int4 payload all-gathered without blocking, one step before its outer step
    "streaming_diloco_int4": ("diloco", {"period": 4, "fragments": 2, "sync_delay": 1, "compressor": "int4"}),
    "stl_sgd": ("stl_sgd", {"first_period": 2, "first_stage_steps": 4}),
    "hierarchical_local_sgd": ("hierarchical_local_sgd", {"intra_period": 2, "inter_period": 4}),
}

STEPS = 10  # steps of every correctness fit
CHECKPOINT_STEP = 6  # mid-period for every strategy above
OVERFLOW_STEP = 1  # a warm-up step of the fp16 fit: rank 1's gradients overflow there
FP16_WARMUP_STEPS = 2
FP16_INIT_SCALE = 2.0**10


def flat_parameters(module: nn.Module) -> Tensor:
    """Every parameter and floating-point buffer as one float32 vector on the CPU (for comparisons)."""
    parts = [p.detach().reshape(-1) for p in module.parameters()]
    parts += [b.detach().reshape(-1) for b in module.buffers() if b.is_floating_point()]
    return torch.cat(parts).float().cpu()


def parameters_only(module: nn.Module) -> Tensor:
    return torch.cat([p.detach().reshape(-1) for p in module.parameters()]).float().cpu()


def gather_cpu(value: Tensor) -> list[Tensor]:
    """Every rank's ``value`` (a CPU tensor), in rank order; just ``[value]`` without a process group."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [value]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def max_difference(tensors: list[Tensor]) -> float:
    """The largest elementwise difference of any tensor from the first (0.0: all identical)."""
    return max((float((t - tensors[0]).abs().max()) for t in tensors[1:]), default=0.0)


class RankBatches(Dataset):
    """``length`` samples of a regression task whose inputs depend on the rank (its own data) and the index."""

    def __init__(self, rank: int, length: int, width: int, outputs: int) -> None:
        self.rank, self.length, self.width, self.outputs = rank, length, width, outputs
        generator = torch.Generator().manual_seed(1234)
        self.target_map = torch.randn(width, outputs, generator=generator) / width**0.5

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        generator = torch.Generator().manual_seed(1000 * self.rank + index)
        x = torch.randn(self.width, generator=generator) + 0.3 * self.rank
        return x, torch.tanh(x @ self.target_map)


class CheckModel(L.LightningModule):
    """An MLP with a BatchNorm (buffers the strategies average) for the correctness fits; ``width`` and ``depth``
    make it the larger model of the timing fits. Records the parameters each validation evaluated."""

    def __init__(
        self,
        width: int = 16,
        depth: int = 2,
        batch_size: int = 8,
        steps: int = STEPS,
        overflow_step: int = -1,
    ) -> None:
        super().__init__()
        torch.manual_seed(0)
        layers: list[nn.Module] = [nn.Linear(width, width), nn.BatchNorm1d(width), nn.Tanh()]
        for _ in range(depth - 1):
            layers += [nn.Linear(width, width), nn.Tanh()]
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(width, 4)
        self.width, self.batch_size, self.steps, self.overflow_step = width, batch_size, steps, overflow_step
        self.validated: list[tuple[int, Tensor]] = []

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x))

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        loss = nn.functional.mse_loss(self(x).float(), y)
        if self.global_rank == 1 and self.trainer.global_step == self.overflow_step:
            loss = loss * 1e38  # inf once the grad scaler multiplies it: rank 1 alone overflows at this step
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", nn.functional.mse_loss(self(x).float(), y), sync_dist=True)
        if batch_idx == 0:
            self.validated.append((self.trainer.global_step, flat_parameters(self)))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)

    def train_dataloader(self) -> DataLoader:
        data = RankBatches(self.global_rank, self.steps * self.batch_size, self.width, 4)
        return DataLoader(data, batch_size=self.batch_size)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(RankBatches(99, self.batch_size, self.width, 4), batch_size=self.batch_size)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class ReplicaAgreement(Callback):
    """After every step: where the strategy says its replicas agree, every rank's parameters must be the same bits.
    They agree after a round that synchronises (``algorithm.in_sync``), and after every step of an algorithm whose
    per-step exchange leaves identical parameters (EF-SGD: ``exchanges_every_step`` and ``rounds_synchronise``).
    Records the largest difference seen at such a step and how many there were (none: the strategy never says so)."""

    def __init__(self) -> None:
        self.checked = 0
        self.worst = 0.0

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        algorithm = getattr(trainer.strategy, "algorithm", None)
        in_sync = bool(getattr(algorithm, "in_sync", True))
        every_step = bool(getattr(algorithm, "exchanges_every_step", False)) and bool(
            getattr(algorithm, "rounds_synchronise", False)
        )
        # A round brings parameters and buffers together; a per-step exchange the parameters only (each rank's
        # BatchNorm statistics follow its own batches until the next round).
        values = flat_parameters(pl_module) if in_sync else parameters_only(pl_module)
        claimed = in_sync or every_step
        gathered = gather_cpu(torch.cat([values, torch.tensor([float(in_sync), float(claimed)])]))
        if all(bool(g[-1]) for g in gathered) and len({bool(g[-2]) for g in gathered}) == 1:
            self.checked += 1  # every rank calls the collective; compare where all claim the same
            self.worst = max(self.worst, max_difference([g[:-2] for g in gathered]))


class StepTimer(Callback):
    """Wall-clock time of every training step (device work included) and whether a round happened in it."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.round_steps: list[bool] = []
        self.round_seconds: list[float] = []
        self._start = 0.0
        self._rounds = 0
        self._comm_seconds = 0.0

    def _stats(self, trainer: L.Trainer) -> tuple[int, float]:
        algorithm = getattr(trainer.strategy, "algorithm", None)
        if algorithm is None:
            return 0, 0.0
        return algorithm.comm.stats.rounds, algorithm.comm.stats.seconds

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        synchronize(pl_module.device)
        self._rounds, self._comm_seconds = self._stats(trainer)
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        synchronize(pl_module.device)
        self.times.append(time.perf_counter() - self._start)
        rounds, seconds = self._stats(trainer)
        self.round_steps.append(rounds > self._rounds)
        if rounds == self._rounds + 1:
            self.round_seconds.append(seconds - self._comm_seconds)


class SkippedStepCheck(Callback):
    """Around the step at which a rank overflows: did this rank's parameters stay as they were (the step skipped)?"""

    def __init__(self, step: int) -> None:
        self.step = step
        self.before: Optional[Tensor] = None
        self.unchanged: Optional[bool] = None

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if trainer.global_step == self.step:
            self.before = torch.cat([p.detach().reshape(-1).float().cpu() for p in pl_module.parameters()])

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if self.before is not None and self.unchanged is None:
            after = torch.cat([p.detach().reshape(-1).float().cpu() for p in pl_module.parameters()])
            self.unchanged = bool(torch.equal(after, self.before))


def median(values: list[float]) -> Optional[float]:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[len(ordered) // 2]
