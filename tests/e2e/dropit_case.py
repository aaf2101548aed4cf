"""A 2-process CPU fit through ``Trainer.fit`` with a local-update strategy and, with ``--gamma G``, DropIT.

Each rank saves to ``<out>/rank<R>.pt``: the training losses, the layer classes and the bytes autograd saved in
every training step, its parameters after every step, the model after the fit and the layer classes then.
Started by tests/test_dropit_e2e.py as ``python dropit_case.py --strategy local_sgd --gamma 0.9 --out DIR``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.strategies import StrategyRegistry
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_localsgd  # noqa: F401 - registers the strategy names
from lightning_localsgd.dropit import DropITCallback, SavedTensorBytes


def flat(module: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1).clone() for p in module.parameters()])


class ConvNet(L.LightningModule):
    """A convolution on the images (its input is saved by it alone: DropIT shrinks it) and two linear layers."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.features = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten())
        self.classifier = nn.Sequential(nn.Linear(8 * 4 * 4, 32), nn.ReLU(), nn.Linear(32, 4))
        self.records: dict[str, list] = {"loss": [], "classes": [], "saved_bytes": [], "params": []}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))

    def training_step(self, batch, batch_idx):
        x, y = batch
        with SavedTensorBytes(self) as saved:
            loss = F.cross_entropy(self(x), y)
        self.records["loss"].append(loss.item())
        self.records["saved_bytes"].append(saved.bytes)
        self.records["classes"].append([type(m).__name__ for m in self.modules() if m is not self])
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx):
        self.records["params"].append(flat(self))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)

    def train_dataloader(self):
        """Each rank its own data: 4 classes told apart by which quadrant of the 8x8 image is bright."""
        g = torch.Generator().manual_seed(self.global_rank)
        y = torch.randint(0, 4, (256,), generator=g)
        x = 0.3 * torch.randn(256, 1, 8, 8, generator=g)
        for label in range(4):
            rows, cols = divmod(label, 2)
            x[y == label, :, 4 * rows : 4 * rows + 4, 4 * cols : 4 * cols + 4] += 1.0
        return DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True, generator=g)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--strategy", default="local_sgd")
    parser.add_argument("--gamma", type=float, default=0.0, help="DropIT's gamma; 0: no DropIT")
    parser.add_argument("--period", type=int, default=4)
    parser.add_argument("--max-steps", type=int, default=24)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    torch.set_num_threads(1)
    callbacks = [DropITCallback(gamma=args.gamma, skip=["classifier.2"])] if args.gamma else []
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=StrategyRegistry[args.strategy]["strategy"](period=args.period),
        max_steps=args.max_steps,
        callbacks=callbacks,
        use_distributed_sampler=False,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        limit_val_batches=0,
    )
    model = ConvNet()
    trainer.fit(model)
    model.records["final"] = flat(model)
    model.records["classes_after"] = [type(m).__name__ for m in model.modules() if m is not model]
    model.records["rounds"] = trainer.strategy.comm_stats.rounds
    torch.save(model.records, Path(args.out) / f"rank{trainer.global_rank}.pt")


if __name__ == "__main__":
    main()
