"""A 2-process CPU ``Trainer.fit`` run for the core's contract with the rest of a Lightning set-up.

Options: ``--ema`` / ``--swa`` (Lightning's weight-averaging callbacks), ``--finetune`` (BackboneFinetuning unfreezes
the backbone at epoch 1), ``--frozen-per-rank`` (a frozen layer initialised differently on every rank, and a
``-inf`` causal-mask buffer), ``--overflow-at S`` (fp16 AMP; rank 1's loss overflows at step S, so the grad scaler
skips that step on rank 1 only), ``--fit-twice`` (a second ``fit`` continues to twice the steps). Each rank saves what
it saw to ``<out>/rank<R>.pt``.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import BackboneFinetuning, StochasticWeightAveraging
from lightning.pytorch.plugins import MixedPrecision
from lightning.pytorch.strategies import StrategyRegistry
from run_case import SameBatchEveryStep, step_checkpoints
from torch import nn
from torch.utils.data import DataLoader

import lightning_localsgd  # noqa: F401 - registers the strategy names


def everything(module: nn.Module) -> torch.Tensor:
    """Every parameter and floating-point buffer, trainable or not (the mask's -inf replaced by 0)."""
    parts = [p.detach().reshape(-1) for p in module.parameters()]
    parts += [b.detach().reshape(-1) for b in module.buffers() if b.is_floating_point()]
    return torch.nan_to_num(torch.cat(parts).float().clone(), neginf=0.0)


class Model(L.LightningModule):
    def __init__(self, args: argparse.Namespace) -> None:
        super().__init__()
        self.args = args
        torch.manual_seed(0)
        self.backbone = nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.Tanh())
        self.head = nn.Linear(16, 1)
        if args.frozen_per_rank:
            torch.manual_seed(100 + int(os.environ.get("LOCAL_RANK", "0")))  # no shared seed: differs by rank
            self.projection = nn.Linear(6, 6)
            self.projection.requires_grad_(False)
            self.register_buffer("mask", torch.triu(torch.full((6, 6), float("-inf")), diagonal=1))
        self.records: dict[str, list] = {"val": []}

    def forward(self, x):
        if self.args.frozen_per_rank:
            x = self.projection(x) @ torch.softmax(self.mask, dim=-1)  # the mask's -inf rows become zeros
        return self.head(self.backbone(x))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.mse_loss(self(x).float(), y)
        if self.args.overflow_at >= 0 and self.global_rank == 1 and self.trainer.global_step == self.args.overflow_at:
            loss = loss * 1e38  # overflows once scaled: the grad scaler skips this step on rank 1 only
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", nn.functional.mse_loss(self(x).float(), y))
        self.records["val"].append(everything(self))

    def configure_optimizers(self):
        if self.args.two_groups:  # different learning rates per group, and a per-step scheduler
            groups = [
                {"params": self.backbone.parameters(), "lr": 0.05},
                {"params": self.head.parameters(), "lr": 0.02},
            ]
            optimizer = torch.optim.SGD(groups, lr=0.05, momentum=0.9)
            scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=3, gamma=0.7)
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
        params = [p for p in self.parameters() if p.requires_grad]
        return torch.optim.SGD(params, lr=0.05, momentum=0.9)

    def train_dataloader(self):
        return DataLoader(SameBatchEveryStep(self.global_rank, 8, self.args.batches), batch_size=8)

    def val_dataloader(self):
        return DataLoader(SameBatchEveryStep(self.global_rank, 8, 1), batch_size=8)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--strategy", default="local_sgd")
    parser.add_argument("--period", type=int, default=4)
    parser.add_argument("--batches", type=int, default=10, help="batches per epoch")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--ema", action="store_true")
    parser.add_argument("--swa", action="store_true")
    parser.add_argument("--finetune", action="store_true")
    parser.add_argument("--frozen-per-rank", action="store_true")
    parser.add_argument("--overflow-at", type=int, default=-1)
    parser.add_argument("--fit-twice", action="store_true")
    parser.add_argument("--two-groups", action="store_true", help="two lr groups and a per-step StepLR")
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--ckpt-every", type=int, default=0)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    torch.set_num_threads(1)
    out = Path(args.out)
    period_name = "first_period" if args.strategy == "stl_sgd" else "period"
    strategy = StrategyRegistry[args.strategy]["strategy"](**{period_name: args.period})
    callbacks = step_checkpoints(out, args.ckpt_every)
    if args.ema:
        from lightning.pytorch.callbacks import EMAWeightAveraging  # Lightning 2.6 and later

        callbacks.append(EMAWeightAveraging(decay=0.8))
    if args.swa:
        callbacks.append(StochasticWeightAveraging(swa_lrs=0.02, swa_epoch_start=1))
    if args.finetune:
        callbacks.append(BackboneFinetuning(unfreeze_backbone_at_epoch=1, backbone_initial_ratio_lr=1.0))
    plugins = []
    if args.overflow_at >= 0:
        plugins.append(MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=2.0**10)))
    steps = args.batches * args.epochs
    trainer = L.Trainer(
        accelerator="cpu",
        devices=args.devices,
        strategy=strategy,
        max_epochs=args.epochs,
        max_steps=steps,
        callbacks=callbacks,
        plugins=plugins,
        use_distributed_sampler=False,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        check_val_every_n_epoch=1,
        limit_val_batches=1,
        enable_checkpointing=bool(args.ckpt_every),
        default_root_dir=out,
    )
    model = Model(args)
    trainer.fit(model)
    records = model.records
    records["after_first_fit"] = {
        "step": strategy.algorithm.step,
        "rounds": getattr(strategy.algorithm, "rounds", None),
    }
    if hasattr(strategy.algorithm, "delta"):
        records["delta_after_first_fit"] = torch.cat([d.reshape(-1) for d in strategy.algorithm.delta]).clone()
    if args.fit_twice:
        trainer.fit_loop.epoch_loop.max_steps = 2 * steps
        trainer.fit_loop.max_epochs = 2 * args.epochs
        trainer.fit(model)
    records["final"] = everything(model)
    records["step"] = strategy.algorithm.step
    records["rounds"] = getattr(strategy.algorithm, "rounds", None)
    records["global_step"] = trainer.global_step
    if hasattr(strategy.algorithm, "delta"):
        records["delta"] = torch.cat([d.reshape(-1) for d in strategy.algorithm.delta]).clone()
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    records["scale"] = scaler.get_scale() if scaler is not None else None
    torch.save(records, out / f"rank{trainer.global_rank}.pt")


if __name__ == "__main__":
    main()
