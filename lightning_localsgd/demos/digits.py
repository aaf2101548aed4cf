"""A small CNN on scikit-learn's bundled 8x8 digits, split non-identically across ranks.

``python -m lightning_localsgd.demos.digits --strategy vrl_sgd`` trains it with 2 CPU processes and writes a
JSON summary; :mod:`lightning_localsgd.demos.compare` runs it once per strategy and prints the table.
The digits ship inside scikit-learn (no download). ``--dataset mnist`` loads MNIST through torchvision
instead, for users whose machines can download it.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_localsgd
from lightning_localsgd.data import NonIIDSampler


def load_images(dataset: str) -> tuple[TensorDataset, TensorDataset]:
    """(train, test) as float images in [0, 1] with shape (N, 1, H, W) and integer labels."""
    if dataset == "digits":
        try:
            from sklearn.datasets import load_digits
        except ImportError as error:
            raise ImportError("The digits data ship with scikit-learn: `pip install scikit-learn`.") from error
        bunch = load_digits()
        images = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
        labels = torch.tensor(bunch.target, dtype=torch.long)
        order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
        images, labels = images[order], labels[order]
        cut = int(0.8 * len(labels))
        return TensorDataset(images[:cut], labels[:cut]), TensorDataset(images[cut:], labels[cut:])
    if dataset == "mnist":
        try:
            from torchvision import datasets
        except ImportError as error:
            raise ImportError("`--dataset mnist` needs torchvision: `pip install torchvision`.") from error
        root = Path.home() / ".cache" / "lightning_localsgd"
        splits = []
        for train in (True, False):
            raw = datasets.MNIST(root, train=train, download=True)
            images = raw.data.float().unsqueeze(1) / 255.0
            splits.append(TensorDataset(images, raw.targets.long()))
        return splits[0], splits[1]
    raise ValueError(f"`dataset` must be 'digits' or 'mnist', got {dataset!r}.")


class DigitsDataModule(L.LightningDataModule):
    """Digits (or MNIST) with each rank's training shard drawn by :class:`NonIIDSampler`.

    Args:
        dataset: ``"digits"`` (bundled with scikit-learn) or ``"mnist"`` (downloads via torchvision).
        split: ``"label_sorted"`` (each rank sees a few classes), ``"dirichlet"`` or ``"iid"``.
        alpha: Dirichlet concentration for ``split="dirichlet"``.
        batch_size: per-rank batch size.
        seed: seed of the split and of the per-epoch shuffles.
    """

    def __init__(
        self,
        dataset: str = "digits",
        split: str = "label_sorted",
        alpha: float = 0.5,
        batch_size: int = 32,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.dataset, self.split, self.alpha, self.batch_size, self.seed = dataset, split, alpha, batch_size, seed
        self.train_set, self.test_set = load_images(dataset)

    def train_dataloader(self) -> DataLoader:
        labels = self.train_set.tensors[1]
        sampler = NonIIDSampler(labels, scheme=self.split, alpha=self.alpha, seed=self.seed)  # type: ignore[arg-type]
        return DataLoader(self.train_set, batch_size=self.batch_size, sampler=sampler, drop_last=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.test_set, batch_size=256)

    test_dataloader = val_dataloader


class DigitsCNN(L.LightningModule):
    """Two 3x3 convolutions, a max-pool and two linear layers.

    The defaults make about 40 k parameters for 8x8 inputs. ``channels=(32, 64), hidden=1024`` is the shape of
    PyTorch's MNIST example (about 1.08 M parameters for 8x8 inputs, mostly the first linear layer): the size at
    which averaging a model costs a slow link far more time than a training step.
    """

    def __init__(
        self,
        lr: float = 0.01,
        momentum: float = 0.9,
        weight_decay: float = 1e-4,
        image_size: int = 8,
        channels: tuple[int, int] = (16, 32),
        hidden: int = 64,
    ):
        super().__init__()
        self.save_hyperparameters()
        first, second = channels
        self.features = nn.Sequential(
            nn.Conv2d(1, first, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(first, second, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
        )
        self.classifier = nn.Sequential(
            nn.Linear(second * (image_size // 2) ** 2, hidden), nn.ReLU(), nn.Linear(hidden, 10)
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.log("val_loss", nn.functional.cross_entropy(logits, y), sync_dist=True)
        self.log("val_acc", (logits.argmax(1) == y).float().mean(), sync_dist=True, prog_bar=True)

    test_step = validation_step

    def configure_optimizers(self) -> torch.optim.Optimizer:
        hp = self.hparams
        return torch.optim.SGD(self.parameters(), lr=hp.lr, momentum=hp.momentum, weight_decay=hp.weight_decay)


@torch.no_grad()
def evaluate(model: nn.Module, data: TensorDataset) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) of ``model`` over a whole dataset."""
    model.eval()
    images, labels = data.tensors
    logits = model(images)
    return nn.functional.cross_entropy(logits, labels).item(), (logits.argmax(1) == labels).float().mean().item()


def make_strategy(name: str, period: int, warmup_steps: int) -> Any:
    if name == "ddp":
        return "ddp"
    cls = {"local_sgd": lightning_localsgd.LocalSGDStrategy, "vrl_sgd": lightning_localsgd.VRLSGDStrategy}[name]
    return cls(period=period, warmup_steps=warmup_steps)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--strategy", default="vrl_sgd", choices=["ddp", "local_sgd", "vrl_sgd"])
    parser.add_argument("--period", type=int, default=10)
    parser.add_argument("--warmup-steps", type=int, default=0)
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--dataset", default="digits", choices=["digits", "mnist"])
    parser.add_argument("--split", default="label_sorted", choices=["label_sorted", "dirichlet", "iid"])
    parser.add_argument("--json", type=Path, default=None, help="write the summary here (rank 0)")
    args = parser.parse_args(argv)

    torch.set_num_threads(1)
    L.seed_everything(0, verbose=False)
    data = DigitsDataModule(dataset=args.dataset, split=args.split)
    image_size = data.train_set.tensors[0].shape[-1]
    model = DigitsCNN(lr=args.lr, image_size=image_size)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=args.devices,
        strategy=make_strategy(args.strategy, args.period, args.warmup_steps),
        max_epochs=args.epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    start = time.perf_counter()
    trainer.fit(model, datamodule=data)
    seconds = time.perf_counter() - start
    if trainer.global_rank != 0:
        return
    train_loss, train_acc = evaluate(model, data.train_set)
    _, test_acc = evaluate(model, data.test_set)
    steps = trainer.global_step
    n_params = sum(p.numel() for p in model.parameters())
    if isinstance(trainer.strategy, lightning_localsgd.LocalUpdateStrategy):
        stats = trainer.strategy.comm_stats
        rounds, mb_sent = stats.rounds, stats.bytes_sent / 1e6
    else:  # DDP all-reduces every gradient every step: ring all-reduce cost, 2 (N-1)/N of the payload
        world = trainer.world_size
        rounds, mb_sent = steps, steps * 2 * (world - 1) / world * n_params * 4 / 1e6
    summary = {
        "strategy": args.strategy,
        "period": args.period if args.strategy != "ddp" else 1,
        "steps": steps,
        "train_loss": train_loss,
        "train_acc": train_acc,
        "test_acc": test_acc,
        "rounds": rounds,
        "mb_sent": mb_sent,
        "seconds": seconds,
    }
    print(json.dumps(summary))
    if args.json:
        args.json.write_text(json.dumps(summary))


if __name__ == "__main__":
    main()
