"""What one ``trainer.save_checkpoint`` costs each strategy, in extra peak memory and seconds, against plain
one-process Lightning saving the same model.

    python -m benchmarks.save_memory [--strategies local_sgd vrl_sgd cocod_sgd diloco dpsgd ef_sign]
        [--params-millions 100] [--steps 3] [--save-at 2] [--output results/save_memory.json]

Every configuration trains the MLP of :mod:`benchmarks.exchange_memory` (SGD with momentum, 2 ranks on loopback
gloo, one thread each, fresh processes per configuration) and, at the end of step ``--save-at`` (mid-period for
every default strategy: replicas differ, so the checkpoint needs the consensus and each rank's own state), saves one
full checkpoint. Extra peak memory: the largest rise of any rank's resident set during the save (the kernel's peak
is reset just before it), in copies of the model; seconds: the slowest rank's save.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
from pathlib import Path
from typing import Any

from benchmarks.exchange_memory import SINGLE, run

STRATEGIES = ["local_sgd", "vrl_sgd", "cocod_sgd", "diloco", "dpsgd", "ef_sign"]


def row(name: str, records: list[dict[str, Any]]) -> dict[str, Any]:
    model = records[0]["model_bytes"]
    return {
        "name": name,
        "save_extra_models": max(r["save_extra_bytes"] for r in records) / model,
        "save_seconds": max(r["save_seconds"] for r in records),
        "ranks": records,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--strategies", nargs="+", default=STRATEGIES)
    parser.add_argument("--params-millions", type=float, default=100.0)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--save-at", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--timeout", type=float, default=1800.0)
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args()
    if not 0 < args.save_at <= args.steps:
        parser.error("--save-at must be a step of the run")
    command = shlex.join(["python", "-m", "benchmarks.save_memory", *sys.argv[1:]])
    rows = []
    with tempfile.TemporaryDirectory(prefix="save_memory-") as tmp_name:
        tmp = Path(tmp_name)
        for name in [SINGLE, *args.strategies]:
            try:
                (records,) = run([name], args, tmp / name)
                rows.append(row(name, records))
            except RuntimeError as error:
                print(f"{name} FAILED: {error}", file=sys.stderr, flush=True)
                rows.append({"name": name, "error": str(error)})
    base = rows[0]
    lines = [
        f"`{command}`",
        "",
        "| | extra peak memory during the save (model copies) | save seconds | against plain Lightning's save |",
        "|---|---:|---:|---:|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| `{r['name']}` | FAILED | FAILED | |")
            continue
        label = "plain Lightning, 1 process" if r["name"] == SINGLE else f"`{r['name']}`"
        relative = r["save_seconds"] / base["save_seconds"] if "save_seconds" in base else float("nan")
        lines.append(f"| {label} | {r['save_extra_models']:+.1f} | {r['save_seconds']:.2f} | {relative:.2f}x |")
    table = "\n".join(lines) + "\n"
    print(table)
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps({"command": command, "rows": rows}, indent=2, default=str))
        args.output.with_suffix(".md").write_text(table)


if __name__ == "__main__":
    main()
