"""A 1.32 M-parameter MLP on synthetic data: a communication-bound workload for benchmarks."""

from __future__ import annotations

import lightning as L
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

IN_FEATURES, CLASSES = 512, 10


def mlp() -> nn.Sequential:
    """512 -> 1024 -> 512 -> 512 -> 10: 1,317,898 parameters (5.3 MB in fp32)."""
    return nn.Sequential(
        nn.Linear(IN_FEATURES, 1024), nn.ReLU(),
        nn.Linear(1024, 512), nn.ReLU(),
        nn.Linear(512, 512), nn.ReLU(),
        nn.Linear(512, CLASSES),
    )  # fmt: skip


class SyntheticClassification(Dataset):
    """Gaussian inputs labelled by a fixed random linear teacher; ``rank`` shifts the inputs (non-identical)."""

    def __init__(self, size: int = 32 * 1000, rank: int = 0, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        teacher = torch.randn(IN_FEATURES, CLASSES, generator=g)
        g.manual_seed(seed + 1 + rank)
        self.x = torch.randn(size, IN_FEATURES, generator=g) + 0.5 * rank
        self.y = (self.x @ teacher).argmax(1)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        return self.x[i], self.y[i]


class SyntheticMLP(L.LightningModule):
    """The MLP trained with SGD (momentum 0.9) on :class:`SyntheticClassification`."""

    def __init__(self, lr: float = 0.01, batch_size: int = 32, size: int = 32 * 1000) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = mlp()

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)

    def train_dataloader(self) -> DataLoader:
        data = SyntheticClassification(self.hparams.size, rank=self.global_rank)
        return DataLoader(data, batch_size=self.hparams.batch_size, shuffle=True)
