"""Which Lightning each rank of a ``Trainer.fit`` imported: ``<out>/rank<R>.json`` holds its version and location.

Started by ``tests/test_lightning_compat.py`` as a user runs a script (``python version_case.py --out DIR``), so that
rank 1 is the process Lightning's launcher starts by re-running this script.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.demos.boring_classes import BoringModel

import lightning_localsgd  # noqa: F401 - registers the strategy names


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="local_sgd",
        max_steps=1,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(BoringModel())
    report = {"version": L.__version__, "file": L.__file__}
    (Path(args.out) / f"rank{trainer.global_rank}.json").write_text(json.dumps(report))
    dist.destroy_process_group()  # as torch asks of every script; exiting with gloo's threads alive may abort


if __name__ == "__main__":
    main()
