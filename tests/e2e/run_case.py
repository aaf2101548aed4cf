"""One CPU training run (2 processes, or ``--devices N``) through ``Trainer.fit``; each rank saves what it saw to
``<out>/rank<R>.pt``.

Started by the tests as ``python tests/e2e/run_case.py --strategy vrl_sgd --out DIR [...]``; Lightning's
launcher starts rank 1 by re-running this script, exactly as it does for users.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import pickle
from pathlib import Path

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.strategies import StrategyRegistry
from torch import nn
from torch.utils.data import DataLoader, Dataset

import lightning_localsgd  # noqa: F401 - registers the strategy names

COLLECTIVES = [0]
OBJECT_BYTES = [0]  # pickled size of everything passed to object collectives (a gather of state shows here)
OBJECT_COLLECTIVES = {"all_gather_object", "gather_object", "broadcast_object_list"}


def pickled_size(values: tuple) -> int:
    size = 0
    for value in values:
        with contextlib.suppress(Exception):  # e.g. a process group: not payload
            size += len(pickle.dumps(value))
    return size


def count_collectives() -> None:
    """Wrap torch.distributed's collectives so every call, by anyone, is counted. Point-to-point operations (a
    gossip step's neighbour exchange) are not collectives and are left alone: ``P2POp`` accepts torch's own
    ``isend`` / ``irecv`` only, and the communicator counts them itself."""
    names = [
        "all_reduce",
        "broadcast",
        "all_gather",
        "gather",
        "scatter",
        "reduce",
        "reduce_scatter",
        "barrier",
        "all_gather_object",
        "gather_object",
        "broadcast_object_list",
        "all_to_all",
        "all_gather_into_tensor",
        "reduce_scatter_tensor",
    ]
    for name in names:
        original = getattr(dist, name)

        @functools.wraps(original)
        def counted(*args, _original=original, _name=name, **kwargs):
            COLLECTIVES[0] += 1
            if _name in OBJECT_COLLECTIVES:
                OBJECT_BYTES[0] += pickled_size(args)
            return _original(*args, **kwargs)

        setattr(dist, name, counted)


def step_checkpoints(out: Path, every: int) -> list[Callback]:
    """A checkpoint every ``every`` training steps under ``out/ckpt`` (named by step, all kept); none for 0."""
    if not every:
        return []
    return [ModelCheckpoint(dirpath=out / "ckpt", every_n_train_steps=every, save_top_k=-1, filename="{step}")]


class SameBatchEveryStep(Dataset):
    """Rank-dependent data, one identical batch per step: resumed runs see exactly the same data."""

    def __init__(self, rank: int, batch: int, steps: int) -> None:
        g = torch.Generator().manual_seed(rank)
        self.x = torch.randn(batch, 6, generator=g) + 2 * rank
        self.y = (self.x[:, :1] * (rank + 1)).sin()
        self.batch, self.steps = batch, steps

    def __len__(self) -> int:
        return self.batch * self.steps

    def __getitem__(self, i: int):
        return self.x[i % self.batch], self.y[i % self.batch]


def flat(module: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1).clone() for p in module.parameters()])


def float_buffers(module: nn.Module) -> torch.Tensor:
    return torch.cat([b.detach().reshape(-1).clone() for b in module.buffers() if b.is_floating_point()])


class Recorder(L.LightningModule):
    def __init__(self, optimizer: str, manual: bool = False, dropout: float = 0.0, epoch_batches: int = 200) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.Tanh())
        if dropout:  # no parameters: the checkpoint's keys stay the same
            self.body.append(nn.Dropout(dropout))
        self.epoch_batches = epoch_batches
        self.head = nn.Linear(16, 1)
        self.optimizer_name = optimizer
        self.automatic_optimization = not manual
        self.records: dict[str, list] = {"steps": [], "val": [], "buffers_before_round": []}

    def forward(self, x):
        return self.head(self.body(x))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.mse_loss(self(x), y)
        if self.automatic_optimization:
            return loss
        opt_body, opt_head = self.optimizers()
        opt_body.zero_grad()
        opt_head.zero_grad()
        self.manual_backward(loss)
        opt_body.step()
        opt_head.step()
        return None

    def on_before_optimizer_step(self, optimizer):
        self.records["buffers_before_round"].append(float_buffers(self))

    def on_train_batch_end(self, outputs, batch, batch_idx):
        strategy = self.trainer.strategy
        self.records["steps"].append(
            {
                "params": flat(self),
                "buffers": float_buffers(self),
                "collectives": COLLECTIVES[0],
                "object_bytes": OBJECT_BYTES[0],
                "algorithm_step": strategy.algorithm.step,
                "in_sync": strategy.algorithm.in_sync,
                "rounds": strategy.comm_stats.rounds,
                "exchanges": strategy.comm_stats.exchanges,
                "global_step": self.trainer.global_step,
                "lrs": [g["lr"] for opt in self.trainer.optimizers for g in opt.param_groups],
            }
        )

    def on_validation_start(self):  # runs before the strategy swaps the consensus in
        self._local_before_validation = flat(self)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", nn.functional.mse_loss(self(x), y), sync_dist=False)
        self.records["val"].append(
            {"local": self._local_before_validation, "evaluated": flat(self), "step": self.trainer.global_step}
        )

    def configure_optimizers(self):
        make = {
            "sgd": lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, weight_decay=1e-4),
            "adam": lambda ps: torch.optim.Adam(ps, lr=0.01),
        }[self.optimizer_name]
        if not self.automatic_optimization:
            return make(self.body.parameters()), make(self.head.parameters())
        return make(self.parameters())

    def train_dataloader(self):
        return DataLoader(SameBatchEveryStep(self.global_rank, 8, self.epoch_batches), batch_size=8)

    def val_dataloader(self):
        return DataLoader(SameBatchEveryStep(self.global_rank, 8, 1), batch_size=8)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--strategy", default="vrl_sgd")
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--dropout", type=float, default=0.0, help="a Dropout layer with this probability")
    parser.add_argument("--epoch-batches", type=int, default=200, help="training batches per epoch")
    parser.add_argument("--period", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=0)
    parser.add_argument("--optimizer", default="sgd")
    parser.add_argument("--manual", action="store_true")
    parser.add_argument("--accumulate", type=int, default=1)
    parser.add_argument("--max-steps", type=int, default=12)
    parser.add_argument("--val-every", type=int, default=None)
    parser.add_argument("--ckpt-every", type=int, default=None)
    parser.add_argument("--resume", default=None)
    parser.add_argument("--csv", action="store_true", help="log to a CSVLogger in <out>/logs every 2 steps")
    parser.add_argument("--rounds-end-periods", action="store_true", help="local_sgd: rounds after steps H, 2H, ...")
    parser.add_argument("--topology", default=None, help="dpsgd / detag: the gossip topology")
    parser.add_argument("--gossip-rounds", type=int, default=None, help="detag: gossip rounds per step")
    parser.add_argument("--overlap", action="store_true", help="diloco: the delayed, overlapped outer step")
    parser.add_argument("--stage-steps", type=int, default=0, help="stl_sgd: first stage's steps (periods x2)")
    parser.add_argument("--num-nodes", type=int, default=1, help="nodes of --devices ranks each")
    parser.add_argument("--inter-period", type=int, default=0, help="hierarchical: steps between world rounds")
    parser.add_argument("--variance-reduction", action="store_true", help="liec_sgd: VRL-SGD's control variate")
    parser.add_argument("--server", default=None, help="liec_sgd: 'sharded' or 'replicated'")
    parser.add_argument("--block-size-mb", type=float, default=None, help="liec_sgd: MiB per compression block")
    parser.add_argument("--fit-again", type=int, default=0, help="then a second fit on the same Trainer to this step")
    parser.add_argument("--options", default=None, help="more strategy keyword arguments, as a JSON object")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    torch.set_num_threads(1)
    count_collectives()
    out = Path(args.out)
    options = {"first_period_one_step": False} if args.rounds_end_periods else {}
    # LIEC-SGD's period is its full-precision rounds', gossip's the steps between its guard's world checks.
    period_name = {
        "liec_sgd": "full_sync_period",
        "dpsgd": "check_every",
        "detag": "check_every",
        "stl_sgd": "first_period",
        "hierarchical_local_sgd": "intra_period",
    }
    period = {period_name.get(args.strategy, "period"): args.period}
    if args.topology:
        options["topology"] = args.topology
    if args.gossip_rounds:
        options["gossip_rounds"] = args.gossip_rounds
    if args.overlap:
        options["overlap"] = True
    if args.variance_reduction:
        options["variance_reduction"] = True
    if args.server:
        options["server"] = args.server
    if args.block_size_mb:
        options["block_size_mb"] = args.block_size_mb
    if args.inter_period:
        options["inter_period"] = args.inter_period
    if args.stage_steps:
        options.update(first_stage_steps=args.stage_steps, period_growth="identical")
    if args.options:
        options.update(json.loads(args.options))
    strategy = StrategyRegistry[args.strategy]["strategy"](**period, warmup_steps=args.warmup, **options)
    callbacks = step_checkpoints(out, args.ckpt_every)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=args.devices,
        num_nodes=args.num_nodes,
        strategy=strategy,
        max_steps=args.max_steps,
        callbacks=callbacks,
        accumulate_grad_batches=args.accumulate,
        use_distributed_sampler=False,
        logger=CSVLogger(out / "logs", name="", version="") if args.csv else False,
        log_every_n_steps=2,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=1 if args.val_every else 0,
        val_check_interval=args.val_every,
        enable_checkpointing=bool(args.ckpt_every),
    )
    model = Recorder(args.optimizer, manual=args.manual, dropout=args.dropout, epoch_batches=args.epoch_batches)
    trainer.fit(model, ckpt_path=args.resume)
    if args.fit_again:  # a second fit on the same Trainer continues the run (configure_optimizers is called anew)
        trainer.fit_loop.epoch_loop.max_steps = args.fit_again
        trainer.fit(model)
    model.records["final"] = flat(model)
    model.records["final_buffers"] = float_buffers(model)
    model.records["comm"] = strategy.comm_stats.state_dict()
    model.records["algorithm_metrics"] = strategy.algorithm.metrics()
    torch.save(model.records, out / f"rank{trainer.global_rank}.pt")


if __name__ == "__main__":
    main()
