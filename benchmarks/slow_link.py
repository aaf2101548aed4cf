"""The slow-link lab: every peer, one after another, on the same shaped link, model, data and batch.

    sudo python -m benchmarks.slow_link --workload mlp --link 200mbit
    python -m benchmarks.slow_link --smoke          # seconds, loopback, for CI

Runs the compute limit (1 process, no communication), Lightning DDP, torch DDP, torch DDP + post-local SGD
(period 16) and every strategy of ours that is registered (see ``benchmarks/peers.py``), each rank with one
thread in its own network namespace (``benchmarks/netlab.py``). Prints the markdown table and writes it,
the raw numbers and the plots (loss vs seconds, loss vs MB sent) to ``results/<workload>-<link>/``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, NoReturn, Optional

from benchmarks import report
from benchmarks.netlab import DEFAULT_MTU, NetLab, rate_bits
from benchmarks.peers import Peer, runnable_peers, skipped_peers
from benchmarks.plots import plot
from benchmarks.workloads import WORKLOADS

REPO = Path(__file__).resolve().parent.parent
ELASTIC = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_env(lab: NetLab, rank: int, world_size: int, port: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ELASTIC and k != "GLOO_SOCKET_IFNAME"}
    env.update({"OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)})
    if world_size > 1:  # what torchrun would set: Lightning then takes the ranks as they are
        env.update({"RANK": str(rank), "WORLD_SIZE": str(world_size), "GROUP_RANK": str(rank)})
        env.update({"LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1", "MASTER_ADDR": lab.master_addr})
        env.update({"MASTER_PORT": str(port), "GLOO_SOCKET_IFNAME": lab.ranks[rank].interface})
    return env


def run_peer(peer: Peer, lab: NetLab, args: argparse.Namespace, run_dir: Path, port: int) -> None:
    """Start the peer's ranks, wait for all of them; raise with the log's tail if one fails."""
    world_size = 1 if peer.kind == "compute" or peer.strategy == "single" else args.ranks
    run_dir.mkdir(parents=True, exist_ok=True)
    for old in run_dir.glob("rank*"):
        old.unlink()
    procs, logs = [], []
    for rank in range(world_size):
        argv = [sys.executable, "-m", "benchmarks.worker", "--peer", json.dumps(peer.__dict__)]
        argv += ["--workload", args.workload, "--rank", str(rank), "--world-size", str(world_size)]
        argv += ["--warmup", str(args.warmup), "--steps", str(args.steps), "--eval-every", str(args.eval_every)]
        argv += ["--seed", str(getattr(args, "seed", 0)), "--out", str(run_dir)]  # overlap_sweep's args: no seed
        log = open(run_dir / f"log{rank}.txt", "w")  # noqa: SIM115  (closed below, after the process ends)
        wrapped = lab.ranks[rank].wrap(argv) if world_size > 1 else argv  # no link needed without peers
        procs.append(subprocess.Popen(wrapped, env=rank_env(lab, rank, world_size, port), stdout=log, stderr=log))
        logs.append(log)
    deadline = time.monotonic() + args.timeout
    try:
        for proc in procs:
            proc.wait(timeout=max(deadline - time.monotonic(), 1))
    finally:
        for proc in procs:  # ours only, by pid: a failed rank must not leave its peer waiting forever
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        for log in logs:
            log.close()
    failed = [r for r, proc in enumerate(procs) if proc.returncode != 0]
    if failed:
        tail = (run_dir / f"log{failed[0]}.txt").read_text().strip().splitlines()[-1:]
        raise RuntimeError(f"rank {failed[0]} exited {procs[failed[0]].returncode}: {' '.join(tail)[:200]}")


def lab_port(lab: NetLab, index: int) -> int:
    return 29611 + index if lab.shaped else free_port()  # fresh namespaces: no one else there


def measure_peer(
    peer: Peer, lab: Optional[NetLab], args: argparse.Namespace, run_dir: Path, port: int
) -> dict[str, Any]:
    """Run one peer (``lab`` None: use its saved run) and score it: its table row, or ``{"label", "error"}``."""
    workload = WORKLOADS[args.workload]
    print(f"-- {peer.label}", flush=True)
    try:
        if lab is not None:
            run_peer(peer, lab, args, run_dir, port)
        elif not (run_dir / "rank0.json").exists():
            raise RuntimeError("no saved run")
    except (RuntimeError, subprocess.TimeoutExpired) as error:
        print(f"   FAILED: {error} (logs in {run_dir})", flush=True)
        return {"label": peer.label, "error": str(error).splitlines()[0][:120]}
    ranks = report.load_ranks(run_dir)
    curve_file = run_dir / "curve.json"
    if lab is not None or not curve_file.exists():
        # independent processes: their average means nothing, rank 0's own model is the curve
        scored = ranks[:1] if peer.kind == "compute_pair" else ranks
        curve_file.write_text(json.dumps(report.curve(workload, run_dir, scored)))
        if not args.keep_snapshots:  # hundreds of MB per peer for the MLP; the curve is what they were for
            for snapshot in run_dir.glob("rank*.pt"):
                snapshot.unlink()
    points = json.loads(curve_file.read_text())
    r = report.row(peer.label, ranks, points, args.target_loss, args.target_acc)
    print(f"   {r['steps_per_s']:.1f} steps/s, {r['mb_per_step']:.3f} MB/step, final loss {r['final_loss']:.3f}")
    return r


def measure(lab: Optional[NetLab], args: argparse.Namespace, out: Path) -> list[dict[str, Any]]:
    peers = [p for p in runnable_peers(args.smoke) if not args.only or any(o in p.label for o in args.only)]
    rows = []
    for i, peer in enumerate(peers):
        port = lab_port(lab, i) if lab is not None else 0  # 0: a saved run, no port
        rows.append(measure_peer(peer, lab, args, out / "runs" / peer.slug, port))
    return rows


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", default="mlp", choices=sorted(WORKLOADS))
    parser.add_argument("--link", default="200mbit", help="tbf rate (100mbit, 1gbit, 10gbit) or 'loopback'")
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--mtu", type=int, default=DEFAULT_MTU, help="the links' MTU (1500: standard frames)")
    parser.add_argument("--warmup", type=int, default=None, help="steps before the throughput window")
    parser.add_argument("--steps", type=int, default=None, help="steps in the throughput window")
    parser.add_argument("--eval-every", type=int, default=None, help="steps between snapshots for the curves")
    parser.add_argument("--target-loss", type=float, default=None)
    parser.add_argument("--target-acc", type=float, default=None, help="e.g. 0.95 (workloads that score accuracy)")
    parser.add_argument("--timeout", type=float, default=900, help="seconds one peer may take")
    parser.add_argument("--out", type=Path, default=REPO / "results")
    parser.add_argument("--smoke", action="store_true", help="loopback, a few steps, one peer of each kind")
    parser.add_argument("--seed", type=int, default=0, help="the initial weights' seed (the data's order is fixed)")
    parser.add_argument("--only", nargs="*", default=[], help="run the rows whose label contains one of these")
    parser.add_argument("--keep-snapshots", action="store_true", help="keep the replicas' rank*.pt files")
    parser.add_argument("--report-only", action="store_true", help="redo table and plots from the saved runs")
    args = parser.parse_args(argv)
    workload = WORKLOADS[args.workload]
    if args.smoke:
        args.link, args.warmup, args.steps, args.eval_every = "loopback", 4, 8, 4
    for name in ("warmup", "steps", "eval_every", "target_loss", "target_acc"):
        if getattr(args, name) is None:
            setattr(args, name, getattr(workload, name))
    return args


def interrupted(signum: int, frame: Any) -> NoReturn:
    raise KeyboardInterrupt  # SIGTERM takes the same way out as Ctrl-C: through every `finally`


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    signal.signal(signal.SIGTERM, interrupted)
    seed = f"-seed{args.seed}" if args.seed else ""  # seed 0: the runs' directory as before the option
    out = args.out / f"{args.workload}-{args.link}{seed}{'-smoke' if args.smoke else ''}"
    out.mkdir(parents=True, exist_ok=True)
    if args.report_only:  # the lab's notice is the one of the run that produced the data
        notice = json.loads((out / "results.json").read_text())["notice"]
        rows = measure(None, args, out)
    else:
        with NetLab(args.ranks, None if args.link == "loopback" else args.link, args.mtu) as lab:
            notice = lab.notice
            print(notice, flush=True)
            for label in skipped_peers():
                print(f"-- {label}: skipped (not registered)")
            rows = measure(lab, args, out)
    title = f"{args.workload} over {args.link}, {args.ranks} ranks x 1 thread\n{WORKLOADS[args.workload].what}"
    link_bits = rate_bits(args.link) if notice.startswith("network lab") else None  # None: loopback, unshaped
    table = report.markdown(rows, args.target_loss, args.target_acc, link_bits)
    command = "python -m benchmarks.slow_link " + " ".join(argv if argv is not None else sys.argv[1:])
    (out / "table.md").write_text(f"{title}\n\n`{command}`\n\n{notice}\n\n{table}\n")
    results = {"args": {k: str(v) for k, v in vars(args).items()}, "notice": notice, "rows": rows}
    (out / "results.json").write_text(json.dumps(results))
    plot(rows, "seconds", out / "loss_vs_seconds.png", title, args.target_loss)
    plot(rows, "mb", out / "loss_vs_mb.png", title, args.target_loss)
    print(f"\n{title}\n{notice}\n\n{table}\n\nwritten to {out}/ (table.md, results.json, *.png)")


if __name__ == "__main__":
    main()
