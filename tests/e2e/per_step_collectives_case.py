"""A 2-process CPU ``Trainer.fit`` run, with (``--costly``) or without the settings that add a world collective to
every local step: ``Trainer(max_time=...)``, ``ModelCheckpoint(train_time_interval=...)`` and
``self.log(..., sync_dist=True)`` in ``training_step``. The run without them uses their alternatives (``max_steps``,
``every_n_train_steps``, an unsynced step value, a synced epoch value, synced validation metrics, a per-epoch
``Timer``). Each rank saves ``<out>/rank<R>.json``: the world-group collectives issued inside each training batch.
"""

from __future__ import annotations

import argparse
import functools
import json
from datetime import timedelta
from pathlib import Path

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import ModelCheckpoint, Timer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_localsgd import LocalSGDStrategy

WORLD_COLLECTIVES = [0]


def count_world_collectives() -> None:
    """Count calls on the default group (Lightning's); the strategy's own collectives run on a group of their own."""
    for name in ("all_reduce", "broadcast", "broadcast_object_list", "all_gather", "all_gather_object", "barrier"):
        original = getattr(dist, name)

        @functools.wraps(original)
        def counted(*args, _original=original, **kwargs):
            group = kwargs.get("group")
            if group is None or group == dist.group.WORLD:
                WORLD_COLLECTIVES[0] += 1
            return _original(*args, **kwargs)

        setattr(dist, name, counted)


class Tiny(L.LightningModule):
    def __init__(self, costly: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Linear(4, 1)
        self.costly = costly
        self.per_step: list[int] = []
        self._before = 0

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x), y)
        if self.costly:
            self.log("train_loss", loss, sync_dist=True)  # on_step=True: all-reduced when logged, every step
        else:
            self.log("train_loss", loss)
            self.log("train_loss_mean", loss, on_step=False, on_epoch=True, sync_dist=True)  # synced at epoch end
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", nn.functional.mse_loss(self.net(x), y), sync_dist=True)

    def on_train_batch_start(self, batch, batch_idx):
        self._before = WORLD_COLLECTIVES[0]

    def on_train_batch_end(self, outputs, batch, batch_idx):  # after every callback's on_train_batch_end
        self.per_step.append(WORLD_COLLECTIVES[0] - self._before)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)

    def train_dataloader(self):
        g = torch.Generator().manual_seed(self.global_rank)
        x = torch.randn(24, 4, generator=g)
        return DataLoader(TensorDataset(x, x[:, :1]), batch_size=4)

    def val_dataloader(self):
        x = torch.randn(8, 4, generator=torch.Generator().manual_seed(1))
        return DataLoader(TensorDataset(x, x[:, :1]), batch_size=4)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--costly", action="store_true", help="use the settings that cost a collective per step")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    torch.set_num_threads(1)
    count_world_collectives()
    out = Path(args.out)
    if args.costly:
        callbacks = [ModelCheckpoint(dirpath=out / "ckpt", train_time_interval=timedelta(hours=1))]
        limits = {"max_time": {"hours": 1}, "max_epochs": 1}
    else:
        callbacks = [ModelCheckpoint(dirpath=out / "ckpt", every_n_train_steps=4), Timer({"hours": 1}, "epoch")]
        limits = {"max_steps": 6}
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=LocalSGDStrategy(period=3, log_comm_metrics=False),
        callbacks=callbacks,
        limit_val_batches=1,
        num_sanity_val_steps=0,
        use_distributed_sampler=False,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=out,
        **limits,
    )
    model = Tiny(args.costly)
    trainer.fit(model)
    (out / f"rank{trainer.global_rank}.json").write_text(json.dumps({"per_step": model.per_step}))


if __name__ == "__main__":
    main()
