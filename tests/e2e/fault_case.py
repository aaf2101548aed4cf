"""A 2-process CPU ``Trainer.fit`` run with one fault injected; each rank that finishes saves ``<out>/rank<R>.pt``.

Faults: ``--uneven N`` (rank 1 has N fewer batches per epoch), ``--nan-at S`` (rank 1's loss turns NaN at
global step S), ``--stall-at S`` (rank 1 stops answering at step S), ``--kill-at S`` (rank 1 SIGKILLs itself at
step S), ``--fp16-init-scale X`` (fp16 AMP with a grad scaler that starts too high, so early steps overflow),
``--usr1-at S0,S1`` (rank r sends itself SLURM's requeue signal at step S_r, on the job's first run only; the
ranks are started by the test with SLURM's variables, as ``srun`` would).
"""

from __future__ import annotations

import argparse
import os
import signal
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.plugins import MixedPrecision
from lightning.pytorch.strategies import StrategyRegistry
from run_case import SameBatchEveryStep, flat, step_checkpoints
from torch import nn
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

from lightning_localsgd import RoundCheckpoint


class Faulty(L.LightningModule):
    def __init__(self, args: argparse.Namespace) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 1))
        self.args = args
        self.records: dict[str, list] = {"steps": []}

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x).float(), y)
        step, rank = self.trainer.global_step, self.global_rank
        if rank == 1 and step == self.args.nan_at:
            loss = loss * float("nan")
        if rank == 1 and step == self.args.stall_at:
            time.sleep(600)  # a stuck peer: alive, never reaching the next collective
        restarted = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0" or "SLURM_RESTART_COUNT" in os.environ
        first_attempt = not restarted
        if rank == 1 and step == self.args.kill_at and first_attempt:
            os.kill(os.getpid(), signal.SIGKILL)  # under torchrun or SLURM: the first attempt only
        if rank == 1 and step == self.args.term_at:
            os.kill(os.getpid(), signal.SIGTERM)  # e.g. a scheduler stopping one task
        if self.args.usr1_at and step == self.args.usr1_at[rank] and os.environ.get("SLURM_RESTART_COUNT") is None:
            os.kill(os.getpid(), signal.SIGUSR1)
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx):
        strategy = self.trainer.strategy
        scaler = getattr(self.trainer.precision_plugin, "scaler", None)
        self.records["steps"].append(
            {
                "global_step": self.trainer.global_step,
                "algorithm_step": strategy.algorithm.step,
                "params": flat(self),
                "scale": scaler.get_scale() if scaler is not None else None,
            }
        )

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)

    def train_dataloader(self):
        if self.args.distinct:  # every sample different, shuffled per epoch by Lightning's DistributedSampler
            g = torch.Generator().manual_seed(0)
            x = torch.randn(2 * 8 * self.args.batches, 6, generator=g)
            return DataLoader(TensorDataset(x, x[:, :1].sin()), batch_size=8, shuffle=True)
        batches = self.args.batches - (self.args.uneven if self.global_rank == 1 else 0)
        dataset = SameBatchEveryStep(self.global_rank, 8, batches)
        if self.args.iterable:  # no length: the ranks cannot agree on a count before the epoch
            return DataLoader(Unsized(dataset), batch_size=8)
        return DataLoader(dataset, batch_size=8)


class Unsized(IterableDataset):
    def __init__(self, dataset: SameBatchEveryStep) -> None:
        self.dataset = dataset

    def __iter__(self):
        return (self.dataset[i] for i in range(len(self.dataset)))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--strategy", default="local_sgd")
    parser.add_argument("--period", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=0)
    parser.add_argument("--batches", type=int, default=20, help="batches per epoch on rank 0")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--uneven", type=int, default=0)
    parser.add_argument("--iterable", action="store_true", help="training data without a length")
    parser.add_argument("--distinct", action="store_true", help="data whose order matters (resume must be exact)")
    parser.add_argument("--nan-at", type=int, default=-1)
    parser.add_argument("--on-nonfinite", default="raise")
    parser.add_argument("--stall-at", type=int, default=-1)
    parser.add_argument("--kill-at", type=int, default=-1)
    parser.add_argument("--term-at", type=int, default=-1)
    parser.add_argument("--collective-timeout", type=float, default=60.0)
    parser.add_argument("--fp16-init-scale", type=float, default=None)
    parser.add_argument("--ckpt-every", type=int, default=None)
    parser.add_argument("--round-ckpt", type=int, default=None, help="RoundCheckpoint every N rounds; resume 'last'")
    parser.add_argument("--usr1-at", type=lambda text: [int(s) for s in text.split(",")], default=None)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    torch.set_num_threads(1)
    out = Path(args.out)
    period_name = {"dpsgd": "check_every", "detag": "check_every", "liec_sgd": "full_sync_period"}.get(
        args.strategy, "period"
    )
    strategy = StrategyRegistry[args.strategy]["strategy"](
        **{period_name: args.period},
        warmup_steps=args.warmup,
        on_nonfinite=args.on_nonfinite,
        collective_timeout=args.collective_timeout,
    )
    plugins = []
    if args.fp16_init_scale:
        scaler = torch.amp.GradScaler("cpu", init_scale=args.fp16_init_scale)
        plugins.append(MixedPrecision("16-mixed", "cpu", scaler=scaler))
    callbacks = [RoundCheckpoint(every_n_rounds=args.round_ckpt)] if args.round_ckpt else []
    callbacks += step_checkpoints(out, args.ckpt_every)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=strategy,
        max_epochs=args.epochs,
        plugins=plugins,
        callbacks=callbacks,
        use_distributed_sampler=args.distinct,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=bool(args.ckpt_every or args.round_ckpt),
        limit_val_batches=0,
        default_root_dir=out,
    )
    model = Faulty(args)
    try:
        trainer.fit(model, ckpt_path="last" if args.round_ckpt else None)
    except SystemExit:  # Lightning's SIGTERMException: a graceful stop
        model.records["stopped"] = True
    model.records["final"] = flat(model)
    model.records["rolled_back"] = strategy.algorithm.rounds_rolled_back
    model.records["torchrun_attempt"] = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    torch.save(model.records, out / f"rank{trainer.global_rank}.pt")


if __name__ == "__main__":
    main()
