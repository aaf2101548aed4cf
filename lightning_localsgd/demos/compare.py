"""The demo: train the digits CNN with 2 CPU processes under DDP, Local SGD and VRL-SGD; print a table.

    python -m lightning_localsgd.demos.compare [--epochs 30] [--period 10] [--out results/demo]

Each rank sees only its label-sorted shard of the digits (rank 0 mostly 0-4, rank 1 mostly 5-9), the
setting VRL-SGD was designed for. Losses and accuracies are of the final (averaged) model on the whole
training set and on the held-out test set.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

STRATEGIES = ("ddp", "local_sgd", "vrl_sgd")


def run_one(strategy: str, args: argparse.Namespace, out: Path) -> dict:
    summary = out / f"{strategy}.json"
    command = [
        sys.executable,
        "-m",
        "lightning_localsgd.demos.digits",
        "--strategy",
        strategy,
        "--epochs",
        str(args.epochs),
        "--period",
        str(args.period),
        "--json",
        str(summary),
    ]
    print(f"$ python {' '.join(command[1:])}", flush=True)  # as a user would type it, whatever the interpreter
    proc = subprocess.run(command, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
        raise SystemExit(f"the {strategy} run failed (exit code {proc.returncode})")
    return json.loads(summary.read_text())


def table(rows: list[dict]) -> str:
    lines = [
        "| strategy | period | final train loss | test accuracy | rounds | MB sent per rank | wall time (s) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['strategy']} | {r['period']} | {r['train_loss']:.4f} | {100 * r['test_acc']:.2f} % | "
            f"{r['rounds']} | {r['mb_sent']:.1f} | {r['seconds']:.1f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--period", type=int, default=10)
    parser.add_argument("--out", type=Path, default=Path("results/demo"))
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    rows = [run_one(strategy, args, args.out) for strategy in STRATEGIES]
    text = table(rows)
    (args.out / "table.md").write_text(text + "\n")
    print()
    print(text)
    print("\nDDP's rounds and MB are its per-step gradient all-reduces (ring all-reduce cost model);")
    print("ours are counted by the strategy. Wall time is Trainer.fit on this machine's loopback.")


if __name__ == "__main__":
    main()
