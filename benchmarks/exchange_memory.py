"""Extra peak memory per rank and mean step time of each strategy, against plain one-process Lightning.

    python -m benchmarks.exchange_memory [--strategies ddp local_sgd dpsgd ef_sign liec_sgd detag]
        [--params-millions 100] [--steps 24] [--batch-size 32] [--output results/exchange_memory.json]

Every configuration trains the same MLP of ``--layers`` square linear layers (about ``--params-millions`` million
float32 parameters) on synthetic data with SGD and momentum, through ``Trainer(strategy=<name>, accelerator="cpu",
devices=2)`` in fresh processes (:mod:`benchmarks.exchange_memory_worker`; loopback gloo, one thread per rank), one
configuration after the other. First come plain one-process Lightning (the baseline) and two such runs at once (the
2 cores' contention: the most 2 ranks on 2 cores could hope for).

Extra peak memory: the largest ``VmHWM`` of any rank at the end of fit, minus the baseline's, in copies of the model
(numel x element size). Step time: the mean wall time from ``on_train_batch_start`` to ``on_train_batch_end`` after
``--warmup`` steps, over both ranks; where only some steps held a round (``local_sgd``), the mean of those steps
follows in parentheses.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Optional

REPO = Path(__file__).resolve().parent.parent
STRATEGIES = ["ddp", "local_sgd", "dpsgd", "ef_sign", "liec_sgd", "detag"]
SINGLE, PAIR = "single", "single_x2"
DASH = "\u2013"  # an en dash, as the table has
LABELS = {
    SINGLE: "plain Lightning, 1 process",
    PAIR: "two plain 1-process runs at once (the 2 cores' contention)",
    "ddp": "Lightning DDP",
}
# Left to Lightning's launcher: a fresh run must not inherit a launcher's rank or port from the calling shell.
LAUNCH_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "NODE_RANK", "MASTER_PORT")


def child_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS and not k.startswith("TORCHELASTIC_")}
    env["OMP_NUM_THREADS"] = "1"  # one core per rank, from the first import on
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


def start(strategy: str, args: argparse.Namespace, out: Path) -> subprocess.Popen:
    """One worker (rank 0; Lightning's launcher starts rank 1), in its own session so a hang can be killed whole."""
    out.mkdir(parents=True)
    command = [sys.executable, "-m", "benchmarks.exchange_memory_worker", "--strategy", strategy]
    command += ["--params-millions", str(args.params_millions), "--layers", str(args.layers)]
    command += ["--steps", str(args.steps), "--batch-size", str(args.batch_size), "--out", str(out)]
    command += ["--save-at", str(getattr(args, "save_at", 0))]
    with (out / "log.txt").open("w") as log:  # the child keeps its own descriptor
        return subprocess.Popen(
            command, cwd=REPO, env=child_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )


def finish(proc: subprocess.Popen, out: Path, ranks: int, timeout: float) -> list[dict[str, Any]]:
    """The ``ranks`` records, or an exception carrying the end of the log."""
    try:
        code = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # rank 1 is rank 0's child, in the same session
        proc.wait()
        code = "timeout"
    records = [json.loads(p.read_text()) for p in sorted(out.glob("rank*.json"))]
    if code != 0 or len(records) != ranks:
        tail = (out / "log.txt").read_text()[-3000:]
        raise RuntimeError(f"exit {code}; end of the log:\n{tail}")
    return records


def run(strategies: list[str], args: argparse.Namespace, tmp: Path) -> list[list[dict[str, Any]]]:
    """Starts the runs of ``strategies`` at once (two only for the pair row) and waits for all of them."""
    print(f"running {' and '.join(strategies)} ...", file=sys.stderr, flush=True)
    outs = [tmp / f"{name}-{i}" for i, name in enumerate(strategies)]
    procs = [start(name, args, out) for name, out in zip(strategies, outs)]
    ranks = [1 if name == SINGLE else 2 for name in strategies]
    return [finish(proc, out, n, args.timeout) for proc, out, n in zip(procs, outs, ranks)]


def mean_after(records: list[dict[str, Any]], warmup: int, rounds: Optional[bool] = None) -> Optional[float]:
    """Mean step seconds over every rank's steps after ``warmup``; only round (or non-round) steps if asked."""
    times = [
        seconds
        for r in records
        for seconds, is_round in list(zip(r["step_seconds"], r["round_steps"]))[warmup:]
        if rounds is None or is_round == rounds
    ]
    return statistics.mean(times) if times else None


def summarise(name: str, records: list[dict[str, Any]], warmup: int, baseline_peak: int) -> dict[str, Any]:
    flags = [f for r in records for f in r["round_steps"][warmup:]]
    peak = max(r["peak_rss_bytes"] for r in records)
    return {
        "name": name,
        "peak_rss_bytes": peak,
        "extra_peak_models": (peak - baseline_peak) / records[0]["model_bytes"],
        "step_seconds": mean_after(records, warmup),
        # Only where rounds are occasional: a strategy that rounds every step (or never) has one kind of step.
        "round_step_seconds": mean_after(records, warmup, rounds=True) if 0 < sum(flags) < len(flags) else None,
        "ranks": records,
    }


def measure(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Every configuration in turn, in fresh processes; a failed one becomes a row with its error."""
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="exchange_memory-") as tmp_name:
        tmp = Path(tmp_name)
        (single,) = run([SINGLE], args, tmp / SINGLE)
        baseline = summarise(SINGLE, single, args.warmup, max(r["peak_rss_bytes"] for r in single))
        rows.append(baseline)
        pair = run([SINGLE, SINGLE], args, tmp / PAIR)
        runs = [summarise(PAIR, records, args.warmup, baseline["peak_rss_bytes"]) for records in pair]
        rows.append({"name": PAIR, "step_seconds_range": sorted(r["step_seconds"] for r in runs), "runs": runs})
        for name in args.strategies:
            try:
                (records,) = run([name], args, tmp / name)
                rows.append(summarise(name, records, args.warmup, baseline["peak_rss_bytes"]))
            except RuntimeError as error:
                print(f"{name} FAILED: {error}", file=sys.stderr, flush=True)
                rows.append({"name": name, "error": str(error)})
    return rows


def cells(row: dict[str, Any]) -> tuple[str, str]:
    """The memory and step-time cells of one row."""
    if "error" in row:
        return "FAILED", "FAILED"
    if row["name"] == PAIR:
        low, high = row["step_seconds_range"]
        return DASH, f"{low:.3g}{DASH}{high:.3g} s"
    memory = DASH if row["name"] == SINGLE else f"{row['extra_peak_models']:+.1f}"
    step = f"{row['step_seconds']:.3g} s"
    if row.get("round_step_seconds") is not None:
        step += f" ({row['round_step_seconds']:.3g} s)"
    return memory, step


def markdown(rows: list[dict[str, Any]], args: argparse.Namespace, command: str) -> str:
    base = rows[0]["ranks"][0]
    lines = [
        f"MLP of {base['numel'] / 1e6:.1f} M float32 parameters ({base['model_bytes'] / 2**20:.0f} MiB; "
        f"{args.layers} layers of width {base['width']}), batch {args.batch_size}, {args.steps} steps (means after "
        f"the first {args.warmup}), 2 ranks on loopback gloo, 1 thread each; extra peak memory in model copies over "
        f"the 1-process peak RSS of {rows[0]['peak_rss_bytes'] / 2**20:.0f} MiB. Command: `{command}`",
        "",
        "| | extra peak memory | step time |",
        "|---|---:|---:|",
    ]
    for row in rows:
        label = LABELS.get(row["name"], f"`{row['name']}`")
        if row.get("round_step_seconds") is not None:
            label += " (round steps)"
        memory, step = cells(row)
        lines.append(f"| {label} | {memory} | {step} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--strategies", nargs="+", default=STRATEGIES, help="registered strategy names, in order")
    parser.add_argument("--params-millions", type=float, default=100.0, help="model size, million parameters")
    parser.add_argument("--layers", type=int, default=8, help="square linear layers; the width follows the size")
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--warmup", type=int, default=2, help="first steps of each rank left out of the means")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds one configuration may take")
    parser.add_argument("--output", type=Path, default=None, help="JSON of every row (and the table beside it, .md)")
    args = parser.parse_args()
    if args.steps <= args.warmup:
        parser.error("--steps must exceed --warmup")

    command = shlex.join(["python", "-m", "benchmarks.exchange_memory", *sys.argv[1:]])
    rows = measure(args)
    table = markdown(rows, args, command)
    print(table)
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(
            json.dumps({"command": command, "args": vars(args) | {"output": str(args.output)}, "rows": rows}, indent=2)
        )
        args.output.with_suffix(".md").write_text(table)


if __name__ == "__main__":
    main()
