"""A 2-process CPU fit through ``Trainer.fit`` with a parameter no rank ever uses, or a GAN-like model trained with
``toggle_optimizer``; each rank saves what it saw to ``<out>/rank<R>.pt``.

Started by tests/test_unused_and_toggled_e2e.py as ``python unused_case.py --strategy ef_sign --out DIR [--extra]``
(a parameter between the two layers that the forward never uses) or ``--gan [--no-toggle]``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.strategies import StrategyRegistry
from torch import nn
from torch.utils.data import DataLoader, Dataset

import lightning_localsgd  # noqa: F401 - registers the strategy names

STEPS = 8
STATE = {"ef_sign": ("error",), "liec_sgd": ("server_error",), "detag": ("tracker", "last_gradient"), "dpsgd": ()}


class RankData(Dataset):
    """Rank-dependent data, one identical batch per step."""

    def __init__(self, rank: int) -> None:
        g = torch.Generator().manual_seed(rank)
        self.x = torch.randn(8, 6, generator=g) + 2 * rank
        self.y = (self.x[:, :1] * (rank + 1)).sin()

    def __len__(self) -> int:
        return 8 * STEPS

    def __getitem__(self, i: int):
        return self.x[i % 8], self.y[i % 8]


def flat(params) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1).clone() for p in params])


class WithUnused(L.LightningModule):
    """Linear(6, 16), tanh, Linear(16, 1); with ``extra``, a parameter between them that the forward never uses
    (drawn from its own generator: the used layers start the same either way)."""

    def __init__(self, extra: bool, optimizer: str) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Linear(6, 16)
        if extra:
            self.mid = nn.Module()
            self.mid.w = nn.Parameter(torch.randn(5, generator=torch.Generator().manual_seed(1)) + 2)
        self.head = nn.Linear(16, 1)
        self.optimizer_name = optimizer
        self.records: dict[str, list] = {"used": [], "extra": [], "grad_none": []}

    def used(self) -> list[nn.Parameter]:
        return [*self.body.parameters(), *self.head.parameters()]

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self.head(torch.tanh(self.body(x))), y)

    def on_before_optimizer_step(self, optimizer):  # after the strategy's exchange, before the optimizer steps
        if hasattr(self, "mid"):
            self.records["grad_none"].append(self.mid.w.grad is None)

    def on_train_batch_end(self, outputs, batch, batch_idx):
        self.records["used"].append(flat(self.used()))
        if hasattr(self, "mid"):
            self.records["extra"].append(self.mid.w.detach().clone())

    def configure_optimizers(self):
        if self.optimizer_name == "adam":
            return torch.optim.Adam(self.parameters(), lr=0.01, weight_decay=1e-2)
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-2)

    def train_dataloader(self):
        return DataLoader(RankData(self.global_rank), batch_size=8)


class Gan(L.LightningModule):
    """A generator and a discriminator, two optimizers, manual optimisation with ``toggle_optimizer``."""

    def __init__(self, toggled: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.gen = nn.Linear(6, 6)
        self.disc = nn.Linear(6, 1)
        self.toggled = toggled
        self.automatic_optimization = False
        self.records: dict[str, list] = {"params": [], "errors": [], "rebucketings": [], "managed": []}
        self.rebucketings = 0

    def on_train_start(self):
        algorithm = self.trainer.strategy.algorithm
        rebucket = algorithm._rebucket

        def counted(*args, **kwargs):
            self.rebucketings += 1
            return rebucket(*args, **kwargs)

        algorithm._rebucket = counted

    def _step(self, optimizer, loss):
        if self.toggled:
            self.toggle_optimizer(optimizer)
        optimizer.zero_grad()
        self.manual_backward(loss())
        optimizer.step()
        if self.toggled:
            self.untoggle_optimizer(optimizer)

    def training_step(self, batch, batch_idx):
        x, y = batch
        opt_g, opt_d = self.optimizers()
        self._step(opt_g, lambda: -self.disc(torch.tanh(self.gen(x))).mean())
        self._step(opt_d, lambda: (self.disc(torch.tanh(self.gen(x)).detach()) - y).pow(2).mean())

    def on_train_batch_end(self, outputs, batch, batch_idx):
        algorithm = self.trainer.strategy.algorithm
        self.records["params"].append(flat(self.parameters()))
        self.records["errors"].append(flat(algorithm.state_views(STATE[self.trainer.strategy.strategy_name][0])))
        self.records["rebucketings"].append(self.rebucketings)
        self.records["managed"].append(len(algorithm.flat.params))

    def configure_optimizers(self):
        return (
            torch.optim.SGD(self.gen.parameters(), lr=0.05, momentum=0.9),
            torch.optim.SGD(self.disc.parameters(), lr=0.05, momentum=0.9),
        )

    def train_dataloader(self):
        return DataLoader(RankData(self.global_rank), batch_size=8)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--strategy", default="ef_sign")
    parser.add_argument("--extra", action="store_true", help="a parameter that the forward never uses")
    parser.add_argument("--optimizer", default="sgd")
    parser.add_argument("--gan", action="store_true", help="the GAN-like model, manual optimisation")
    parser.add_argument("--no-toggle", action="store_true", help="--gan without toggle_optimizer")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    torch.set_num_threads(1)
    out = Path(args.out)
    period = {"liec_sgd": "full_sync_period", "detag": "check_every", "dpsgd": "check_every"}.get(
        args.strategy, "period"
    )
    strategy = StrategyRegistry[args.strategy]["strategy"](**{period: 3})
    strategy.strategy_name = args.strategy
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=strategy,
        max_steps=STEPS * (2 if args.gan else 1),  # manual optimisation counts every optimizer's step
        use_distributed_sampler=False,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    model = Gan(not args.no_toggle) if args.gan else WithUnused(args.extra, args.optimizer)
    trainer.fit(model)
    algorithm = strategy.algorithm
    if args.extra:
        index = algorithm.flat.index_of[id(model.mid.w)]
        model.records["state"] = {k: algorithm.state_views(k)[index].clone() for k in STATE[args.strategy]}
    model.records["final"] = flat(model.parameters())
    torch.save(model.records, out / f"rank{trainer.global_rank}.pt")


if __name__ == "__main__":
    main()
