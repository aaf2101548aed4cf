"""The device check: every strategy through ``Trainer.fit`` on CUDA (or, with ``--device cpu``, on the CPU), one
table and one JSON file, in a few minutes.

    python -m benchmarks.gpu_check                 # CUDA if there is one, else the CPU
    python -m benchmarks.gpu_check --device cpu    # small, about two minutes on 2 cores (the test suite runs a part)
    make gpu-check

Two sets of processes run, one after the other:

* one process (NCCL on CUDA, gloo on CPU): each strategy's timing fit on a larger model, against plain
  single-process Lightning on the same model (a local step's median time, the device's peak memory), and the
  compressors' encode + decode against a device-to-device copy of the same bytes;
* two processes: on two or more GPUs NCCL with one GPU each; on one GPU gloo with CUDA tensors, both processes on
  that GPU (real two-rank semantics on the device); on CPU gloo. For each strategy: a fit to the end with a
  checkpoint mid-period, where the replicas must agree at every step the strategy says they do (bit for bit),
  validation, the checkpoint and the model after fit must be the consensus (the checkpoint's weights are those
  validation evaluated at the same step, and every rank holds the same), a resume from the checkpoint must end
  exactly where the uninterrupted run ended, an fp16 fit with a grad scaler where rank 1 alone overflows at a
  warm-up step must skip that step on every rank and back off the scale alike, and a bf16 fit; then DropIT on
  the device, Lightning's DDP with the compressed ``ef_sign_hook``, and one raw all-reduce of the model's bytes,
  the bound a round is measured against.

Ratios, each measured in the same run: a local step against plain Lightning's step (goal <= 1.05), a round against
the raw all-reduce, encode + decode against the copy, peak memory against plain training. The exit status is 1 if
any check failed. Results: ``<out>/gpu_check.json`` and the table on stdout.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

import torch

from benchmarks.gpu_check_cases import STRATEGIES

ROOT = Path(__file__).resolve().parents[1]
CORRECTNESS = (
    "fit",
    "replicas_agree",
    "validation_consensus",
    "checkpoint_is_consensus",
    "final_consensus",
    "mid_period_resume",
    "fp16_overflow",
    "bf16",
)
# The timing model per device: on a GPU large enough that a step is device-bound (about 25 M parameters).
PERF = {
    "cuda": {"perf-width": 2048, "perf-depth": 6, "perf-batch": 256, "perf-steps": 30, "codec-mib": 64},
    "cpu": {"perf-width": 64, "perf-depth": 2, "perf-batch": 16, "perf-steps": 12, "codec-mib": 1},
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_fleet(
    fleet: str, world: int, device: str, backend: str, labels: list[str], out: Path, timeout: float
) -> list[dict[str, Any]]:
    """Start ``world`` worker processes as torchrun would (one "node" each), wait, and read every rank's results."""
    gpus = torch.cuda.device_count() if device == "cuda" else 0
    port = free_port()
    procs = []
    for rank in range(world):
        env = dict(
            os.environ,
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            WORLD_SIZE=str(world),
            NODE_RANK=str(rank),
            LOCAL_RANK="0",
            PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        )
        command = [sys.executable, "-m", "benchmarks.gpu_check_worker", "--fleet", fleet, "--device", device]
        command += ["--gpu-index", str(rank if gpus > 1 else 0), "--backend", backend, "--out", str(out)]
        command += ["--strategies", *labels]
        command += [part for key, value in PERF[device].items() for part in (f"--{key}", str(value))]
        log = open(out / f"{fleet}-rank{rank}.log", "w")  # noqa: SIM115 - closed with the process below
        procs.append((subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT), log))
    deadline = time.monotonic() + timeout
    for proc, log in procs:
        try:
            proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
    results = []
    for rank, (proc, _) in enumerate(procs):
        path = out / f"{fleet}-rank{rank}.json"
        if path.exists():
            results.append(json.loads(path.read_text()))
        else:
            tail = (out / f"{fleet}-rank{rank}.log").read_text()[-3000:]
            results.append({"error": f"rank {rank} wrote no results (exit status {proc.returncode})", "log": tail})
    return results


def ratio(value: Optional[float], bound: Optional[float]) -> Optional[float]:
    return value / bound if value is not None and bound else None


def summarise(one: dict[str, Any], several: list[dict[str, Any]], labels: list[str]) -> dict[str, Any]:
    """Per strategy: every correctness check (ok on every rank), and the ratios (rank 0's measurements)."""
    rows: dict[str, Any] = {}
    plain = one.get("plain", {})
    lead = several[0] if several else {}
    raw = lead.get("raw_all_reduce_s")
    for label in labels:
        per_rank = [r.get("strategies", {}).get(label, {}) for r in several]
        checks = {}
        for name in CORRECTNESS:
            found = [entry.get(name) for entry in per_rank]
            checks[name] = bool(found) and all(c is not None and c.get("ok") for c in found)
        agreement = per_rank[0].get("replicas_agree", {}) if per_rank else {}
        timed = one.get("strategies", {}).get(label, {}).get("timed", {})
        rounds = per_rank[0].get("timed", {}) if per_rank else {}
        rows[label] = {
            "checks": checks,
            "steps_claimed_in_sync": agreement.get("steps_in_sync"),
            "local_step_ratio": ratio(timed.get("local_step_s"), plain.get("local_step_s")),
            "round_to_all_reduce": ratio(rounds.get("round_comm_s"), raw),
            "peak_memory_ratio": ratio(timed.get("peak_bytes"), plain.get("peak_bytes")),
            "timed_ok": bool(timed.get("ok")) and all(bool(r.get("timed", {}).get("ok")) for r in per_rank),
        }
    return rows


def failures(one: dict[str, Any], several: list[dict[str, Any]], rows: dict[str, Any]) -> list[str]:
    failed = [f"{label}: {name}" for label, row in rows.items() for name, ok in row["checks"].items() if not ok]
    failed += [f"{label}: timed fit" for label, row in rows.items() if not row["timed_ok"]]
    for rank, result in enumerate(several):
        failed += [f"rank {rank}: {result['error']}"] if "error" in result else []
        for extra in ("dropit", "ddp_hook"):
            if not result.get(extra, {}).get("ok"):
                failed.append(f"rank {rank}: {extra}")
    failed += ["one process: " + one["error"]] if "error" in one else []
    failed += [] if one.get("plain", {}).get("ok") else ["plain Lightning timing fit"]
    failed += [] if one.get("codecs", {}).get("ok") else ["compressors"]
    return failed


def fmt(value: Optional[float], digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def table(rows: dict[str, Any], one: dict[str, Any], several: list[dict[str, Any]]) -> str:
    heads = ["fit", "agree", "val", "ckpt", "final", "resume", "fp16", "bf16"]
    lines = [
        "| strategy | " + " | ".join(heads) + " | local step / plain | round / all-reduce | peak memory / plain |",
        "|---|" + "---|" * len(heads) + "---:|---:|---:|",
    ]
    for label, row in rows.items():
        marks = ["ok" if row["checks"][name] else "FAIL" for name in CORRECTNESS]
        if row["checks"]["replicas_agree"] and not row["steps_claimed_in_sync"]:
            marks[1] = "-"  # the strategy never says its replicas agree (gossip, CoCoD-SGD, ...)
        lines.append(
            f"| {label} | " + " | ".join(marks) + f" | {fmt(row['local_step_ratio'])} | "
            f"{fmt(row['round_to_all_reduce'], 1)} | {fmt(row['peak_memory_ratio'])} |"
        )
    lead = several[0] if several else {}
    for extra in ("dropit", "ddp_hook"):
        result = lead.get(extra, {})
        detail = {k: v for k, v in result.items() if k not in ("ok", "trace")}
        lines.append(f"\n{extra}: {'ok' if result.get('ok') else 'FAIL'} {detail}")
    codecs = one.get("codecs", {}).get("by_compressor", {})
    if codecs:
        lines.append("\n| compressor | encode + decode (ms) | copy (ms) | ratio to copy | GB/s |")
        lines.append("|---|---:|---:|---:|---:|")
        for name, c in codecs.items():
            lines.append(
                f"| {name} | {fmt(c['encode_decode_s'] * 1e3, 3)} | {fmt(c['copy_s'] * 1e3, 3)} | "
                f"{fmt(c['ratio_to_copy'], 1)}x | {fmt(c['gb_per_s'], 1)} |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    parser.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=list(STRATEGIES))
    parser.add_argument("--out", default="results/gpu_check")
    parser.add_argument("--timeout", type=float, default=420.0, help="seconds per set of processes")
    args = parser.parse_args()
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device here")
    gpus = torch.cuda.device_count() if device == "cuda" else 0
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob("*-rank*.json"):
        stale.unlink()
    several_backend = "nccl" if gpus > 1 else "gloo"
    started = time.perf_counter()
    one = run_fleet("one", 1, device, "nccl" if device == "cuda" else "gloo", args.strategies, out, args.timeout)[0]
    several = run_fleet("several", 2, device, several_backend, args.strategies, out, args.timeout)
    rows = summarise(one, several, args.strategies)
    failed = failures(one, several, rows)
    report = {
        "date": datetime.date.today().isoformat(),
        "device": torch.cuda.get_device_name(0) if device == "cuda" else platform.processor() or "cpu",
        "gpus": gpus,
        "torch": torch.__version__,
        "two_process_backend": several_backend,
        "seconds": time.perf_counter() - started,
        "rows": rows,
        "failed": failed,
        "one_process": one,
        "two_processes": several,
    }
    (out / "gpu_check.json").write_text(json.dumps(report, indent=1, default=str))
    print(
        f"device check on {report['device']} ({device}, {gpus} GPU(s), two processes over {several_backend}), "
        f"{report['seconds']:.0f} s"
    )
    print(table(rows, one, several))
    print("\nfailed: " + ("; ".join(failed) if failed else "nothing"))
    print(f"results: {out / 'gpu_check.json'}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
