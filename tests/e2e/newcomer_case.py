"""A small CPU fit as a newcomer runs it (``run_case``'s model and data), recording what Lightning shows of the
strategy: ``callback_metrics``, the progress bar's metrics and a ``ModelCheckpoint`` monitoring ``comm/mb_sent``.

Started by the tests as ``python tests/e2e/newcomer_case.py --out DIR [...]``; each rank saves ``<out>/rank<R>.pt``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.strategies import StrategyRegistry
from run_case import Recorder

import lightning_localsgd  # noqa: F401 - registers the strategy names


class Watch(Callback):
    """After every batch (after the strategy's round): what Lightning holds of the strategy's metrics."""

    def __init__(self, stop_after: int) -> None:
        self.stop_after = stop_after
        self.seen: list[dict] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.seen.append(
            {
                "callback": {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("comm/")},
                "progress_bar": sorted(trainer.progress_bar_metrics),
                "mb_sent": trainer.strategy.comm_stats.bytes_sent / 1e6,
            }
        )
        if self.stop_after and trainer.global_step >= self.stop_after:
            trainer.should_stop = True  # every rank stops after the same batch


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--strategy", default="local_sgd")
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--num-nodes", type=int, default=1)
    parser.add_argument("--period", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=0)
    parser.add_argument("--max-steps", type=int, default=12)
    parser.add_argument("--stop-after", type=int, default=0, help="set `trainer.should_stop` after this step")
    parser.add_argument("--init-timeout", type=float, default=300.0)
    parser.add_argument("--no-comm-progress-bar", action="store_true")
    parser.add_argument("--monitor-every", type=int, default=0, help="ModelCheckpoint(monitor='comm/mb_sent')")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    torch.set_num_threads(1)
    out = Path(args.out)
    strategy = StrategyRegistry[args.strategy]["strategy"](
        period=args.period,
        warmup_steps=args.warmup,
        init_timeout=args.init_timeout,
        comm_progress_bar=not args.no_comm_progress_bar,
    )
    watch = Watch(args.stop_after)
    callbacks: list[Callback] = [watch]
    if args.monitor_every:
        monitored = ModelCheckpoint(
            dirpath=out / "monitored",
            monitor="comm/mb_sent",
            mode="max",
            save_top_k=1,
            every_n_train_steps=args.monitor_every,
            filename="{step}",
        )
        callbacks.append(monitored)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=args.devices,
        num_nodes=args.num_nodes,
        strategy=strategy,
        max_steps=args.max_steps,
        callbacks=callbacks,
        use_distributed_sampler=False,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        enable_checkpointing=bool(args.monitor_every),
    )
    model = Recorder("sgd")
    start = time.monotonic()
    try:
        trainer.fit(model)
    finally:
        print(f"newcomer_case: fit ran {time.monotonic() - start:.1f} s", file=sys.stderr, flush=True)
    torch.save(
        {
            "seen": watch.seen,
            "callback_metrics": {k: float(v) for k, v in trainer.callback_metrics.items()},
            "best_model_score": float(monitored.best_model_score) if args.monitor_every else None,
            "best_model_path": monitored.best_model_path if args.monitor_every else None,
            "comm": strategy.comm_stats.state_dict(),
        },
        out / f"rank{trainer.global_rank}.pt",
    )


if __name__ == "__main__":
    main()
