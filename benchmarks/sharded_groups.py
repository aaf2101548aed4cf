"""Replica groups (``shard_size``): peak memory and bytes per round on loopback, then steps/s over a slow link.

    python -m benchmarks.sharded_groups            # both parts (~15 min on 2 cores; the lab needs root)
    python -m benchmarks.sharded_groups --smoke    # tiny model, loopback only, seconds: for CI

1. Memory and bytes, loopback, 4 processes: ``local_sgd`` and ``diloco`` (outer SGD, Nesterov) at ``shard_size`` 1
   (4 full replicas) and 2 (2 groups x 2 ranks, ``shard_layers=["Linear"]``), plus 2 processes at ``shard_size`` 1
   (the same 2 replicas as the sharded run, unsharded). A stack of square Linear layers (about
   ``--params-millions`` million float32 parameters), SGD with momentum, ``--steps`` steps at ``--period``. Peak
   resident memory per rank (``VmHWM`` at the end of fit; also less the ``VmRSS`` each rank had before building the
   model: the imports and the process's fixed cost), bytes one rank sends across groups per round (``comm_stats``
   after each step: the growth over the steps that held a round, so the set-up broadcast and the final average
   are left out; ``bytes_sent / rounds`` is in the JSON too).
2. The lab: two network namespaces joined by a veth pair shaped to ``--link`` (``benchmarks/netlab.py``), two ranks
   in each (a replica group per namespace: its FSDP2 traffic stays on the namespace's own loopback): steps/s of
   ``local_sgd`` and ``diloco`` at ``shard_size`` 2, of ``local_sgd`` at ``shard_size`` 1 (4 full replicas, whose
   rounds cross the link as a 4-rank ring), and of plain FSDP2 over the 4 ranks (Lightning's
   ``ModelParallelStrategy``; its ``FSDPStrategy`` refuses the CPU), whose collectives cross the link every step.

Each configuration runs in fresh processes (``--smoke``: forked from one process that imported Lightning once),
one after another, one thread per rank. Prints markdown tables; writes ``results.json`` and ``table.md`` under
``--out`` (default ``results/sharded_groups/``, ``.../smoke`` with ``--smoke``).
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NoReturn, Optional

from benchmarks.netlab import DEFAULT_MTU, PREFIX, NetLab, rate_bits

REPO = Path(__file__).resolve().parent.parent
# A launcher's variables in the calling shell must not leak into the ranks: each rank gets its own below.
LAUNCH_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "NODE_RANK", "MASTER_ADDR",
               "MASTER_PORT", "GLOO_SOCKET_IFNAME")  # fmt: skip
MIB = 2**20
PRELOAD = ["torch", "torch.distributed", "lightning.pytorch", "lightning_localsgd", "benchmarks.sharded_groups_worker"]


def size(nbytes: int) -> str:
    return f"{nbytes // MIB} MiB" if nbytes % MIB == 0 else f"{nbytes / 1024:.0f} KiB"


@dataclass(frozen=True)
class Config:
    """One run: ``world`` ranks of ``per_node`` ranks per node (namespace in the lab)."""

    label: str
    strategy: str
    shard_size: int
    world: int
    period: int
    steps: int
    mmap_threshold: int = 0  # glibc's (0: its default, which grows as large blocks are freed)

    @property
    def slug(self) -> str:
        return f"{self.strategy}-s{self.shard_size}-w{self.world}" + ("-mmap" if self.mmap_threshold else "")

    @property
    def allocator(self) -> str:
        return f"mmap >= {size(self.mmap_threshold)}" if self.mmap_threshold else "glibc default"


@dataclass(frozen=True)
class Model:
    width: int
    layers: int
    batch_size: int

    @property
    def numel(self) -> int:
        return self.layers * (self.width * self.width + self.width)

    @classmethod
    def of(cls, params_millions: float, layers: int, batch_size: int) -> Model:
        return cls(max(2, round(math.sqrt(params_millions * 1e6 / layers))), layers, batch_size)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_env(rank: int, world: int, per_node: int, addr: str, port: int, run_id: str, ifname: str) -> dict[str, str]:
    """What torchrun would set for ``rank`` (Lightning then starts no process itself)."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS and not k.startswith("TORCHELASTIC_")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")])))
    env.update(RANK=str(rank), LOCAL_RANK=str(rank % per_node), GROUP_RANK=str(rank // per_node))
    env.update(WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(per_node), TORCHELASTIC_RUN_ID=run_id)
    env.update(MASTER_ADDR=addr, MASTER_PORT=str(port))
    if ifname != "lo":  # the lab: gloo listens on the namespace's veth address (peers in it reach it via lo)
        env["GLOO_SOCKET_IFNAME"] = ifname
    return env


def _forked_rank(env: dict[str, str], argv: list[str], log: str) -> None:
    """One rank forked from the preloaded server (``--smoke``): the worker's ``main`` under the rank's environment."""
    with open(log, "w") as sink:
        os.dup2(sink.fileno(), 1)
        os.dup2(sink.fileno(), 2)
    os.environ.clear()
    os.environ.update(env)
    code = 0
    try:
        from benchmarks.sharded_groups_worker import main

        main(argv)
    except BaseException:
        import traceback

        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


class Launcher:
    """Starts a configuration's ranks and waits for them. Fresh ``python -m`` processes (what a torchrun user
    gets, so the memory is theirs), each wrapped in ``ip netns exec`` in the lab; or, with ``fork=True``, forked
    from a server that imported Lightning once (seconds instead of ~5 s of imports per rank, for ``--smoke``)."""

    def __init__(self, fork: bool, timeout: float) -> None:
        self.timeout = timeout
        self.context: Any = None
        if fork:
            self.context = multiprocessing.get_context("forkserver")
            self.context.set_forkserver_preload(PRELOAD)

    def run(self, config: Config, model: Model, out: Path, lab: Optional[NetLab] = None, port: int = 0) -> list[dict]:
        out.mkdir(parents=True, exist_ok=True)
        for old in out.glob("rank*"):
            old.unlink()
        per_node = config.world // 2 if lab is not None else config.world
        argv = ["--strategy", config.strategy, "--shard-size", str(config.shard_size), "--period", str(config.period)]
        argv += ["--width", str(model.width), "--layers", str(model.layers), "--batch-size", str(model.batch_size)]
        argv += ["--steps", str(config.steps), "--out", str(out), "--mmap-threshold", str(config.mmap_threshold)]
        run_id, port = uuid.uuid4().hex, port or free_port()
        procs: list[Any] = []
        logs = [out / f"rank{r}.log" for r in range(config.world)]
        for r in range(config.world):
            net = lab.ranks[r // per_node] if lab is not None else None
            addr = lab.master_addr if lab is not None else "127.0.0.1"
            env = rank_env(r, config.world, per_node, addr, port, run_id, net.interface if net is not None else "lo")
            if self.context is not None:
                proc = self.context.Process(target=_forked_rank, args=(env, argv, str(logs[r])))
                proc.start()
            else:
                command = [sys.executable, "-m", "benchmarks.sharded_groups_worker", *argv]
                with logs[r].open("w") as log:  # the child keeps its own descriptor
                    proc = subprocess.Popen(net.wrap(command) if net is not None else command, cwd=REPO, env=env,
                                            stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
            procs.append(proc)
        codes = self._wait(procs)
        failed = [r for r, code in enumerate(codes) if code != 0]
        if failed:
            tail = "\n".join(logs[failed[0]].read_text().strip().splitlines()[-15:])
            raise RuntimeError(f"{config.label}: rank {failed[0]} exited {codes[failed[0]]}; its log ends:\n{tail}")
        return [json.loads((out / f"rank{r}.json").read_text()) for r in range(config.world)]

    def _wait(self, procs: list[Any]) -> list[Optional[int]]:
        """Exit codes; once one rank failed the others get a few seconds, then every rank still alive is killed
        (ours, by pid): a failed rank must not leave its peers waiting in a collective until the timeout."""
        deadline = time.monotonic() + self.timeout

        def code(proc: Any) -> Optional[int]:
            return proc.poll() if isinstance(proc, subprocess.Popen) else proc.exitcode

        while time.monotonic() < deadline and any(code(p) is None for p in procs):
            if any(code(p) not in (None, 0) for p in procs):
                deadline = min(deadline, time.monotonic() + 5.0)
            time.sleep(0.1)
        for proc in procs:
            if code(proc) is None:
                proc.kill()
            if isinstance(proc, subprocess.Popen):
                proc.wait()
            else:
                proc.join()
        return [code(p) for p in procs]


def round_deltas(record: dict[str, Any]) -> list[int]:
    """Bytes sent during each step that held a round (one at most per step here): the rounds alone, without the
    set-up broadcast (before the first step) or the final average (after the last)."""
    deltas, sent_before, rounds_before = [], record["start_bytes_sent"], record["start_rounds"]
    for sent, rounds in zip(record["step_bytes_sent"], record["step_rounds"]):
        if rounds > rounds_before:
            deltas.append(sent - sent_before)
        sent_before, rounds_before = sent, rounds
    return deltas


def memory_row(config: Config, records: list[dict[str, Any]]) -> dict[str, Any]:
    per_round = [statistics.mean(d) if (d := round_deltas(r)) else None for r in records]
    return {
        "label": config.label,
        "config": asdict(config),
        "allocator": config.allocator,
        "model_numel": records[0]["numel"],
        "model_bytes": records[0]["model_bytes"],
        "shapes": records[0]["shapes"],
        "peak_rss_bytes": max(r["peak_rss_bytes"] for r in records),
        "start_rss_bytes": max(r["start_rss_bytes"] for r in records),
        "training_rss_bytes": max(r["peak_rss_bytes"] - r["start_rss_bytes"] for r in records),
        "rounds": [r["rounds"] for r in records],
        "bytes_sent": [r["bytes_sent"] for r in records],
        "bytes_sent_per_round": [r["bytes_sent"] / r["rounds"] for r in records],
        "bytes_per_round": per_round,  # per rank, rounds only
        "max_bytes_per_round": max(b for b in per_round if b is not None) if any(per_round) else None,
        "seconds": max(r["step_ends"][-1] - r["train_start"] for r in records),
    }


def steps_per_second(records: list[dict[str, Any]], warmup: int) -> tuple[float, int]:
    """Steps after the first ``warmup`` over the slowest rank's seconds for them (the job's pace)."""
    steps = len(records[0]["step_ends"]) - warmup
    seconds = max(r["step_ends"][-1] - r["step_ends"][warmup - 1] for r in records)
    return steps / seconds, steps


def link_bytes(lab: NetLab) -> int:
    """Bytes sent by both ends of the shaped veth pair so far (TCP/IP included): the traffic between namespaces."""
    total = 0
    for net in lab.ranks:
        proc = subprocess.run(["ip", "-n", str(net.namespace), "-s", "-j", "link", "show", "dev", net.interface],
                              capture_output=True, text=True, check=True)  # fmt: skip
        total += json.loads(proc.stdout)[0]["stats64"]["tx"]["bytes"]
    return total


def step_seconds(records: list[dict[str, Any]], warmup: int) -> tuple[list[float], list[float]]:
    """Every rank's step durations after ``warmup``: those without a round, and those with one."""
    local, rounds = [], []
    for r in records:
        ends = [r["train_start"], *r["step_ends"]]
        counts = [r["start_rounds"], *r["step_rounds"]]
        for i in range(warmup, len(r["step_ends"])):
            (rounds if counts[i + 1] > counts[i] else local).append(ends[i + 1] - ends[i])
    return local, rounds


def lab_row(config: Config, records: list[dict[str, Any]], warmup: int, link: Optional[int]) -> dict[str, Any]:
    rate, window = steps_per_second(records, warmup)
    local, with_round = step_seconds(records, warmup)
    rounds = [r["rounds"] for r in records] if records[0]["rounds"] is not None else None
    return {
        "label": config.label,
        "config": asdict(config),
        "model_numel": records[0]["numel"],
        "steps_per_s": rate,
        "window_steps": window,
        "warmup_steps": warmup,
        "local_step_seconds": statistics.median(local) if local else None,  # steps without a round
        "round_step_seconds": statistics.mean(with_round) if with_round else None,
        "link_bytes": link,  # the whole run: set-up, every step, the final average
        "link_mb_per_step": link / config.steps / 1e6 if link is not None else None,
        "rounds": rounds,
        "seconds": max(r["step_ends"][-1] - r["train_start"] for r in records),
    }


def memory_configs(args: argparse.Namespace) -> list[Config]:
    """Each strategy at shard_size 1 and 2 over 4 processes, under glibc's default allocator and with large blocks
    always mmapped (see ``set_mmap_threshold`` in the worker); then 2 full replicas for the bytes of the same 2
    replicas as the sharded run (their memory is that of the 4-process rows)."""
    configs = []
    for threshold in (0, args.mmap_threshold) if args.mmap_threshold else (0,):
        for strategy in ("local_sgd", "diloco"):
            layouts = ((1, 4), (2, 4), (1, 2)) if threshold else ((1, 4), (2, 4))
            for shard_size, world in layouts:
                replicas = world // shard_size
                what = f"{replicas} full replicas" if shard_size == 1 else f"{replicas} groups x {shard_size}"
                label = f"{strategy}, shard_size {shard_size}, {world} processes ({what})"
                configs.append(Config(label, strategy, shard_size, world, args.period, args.steps, threshold))
    return configs


def lab_configs(args: argparse.Namespace) -> list[Config]:
    # local_sgd rounds after step 1 and then every period, diloco after every period: the window after the first
    # step (the warm-up) holds exactly 2 rounds of either.
    period = args.lab_period
    steps = 1 + 2 * period
    return [
        Config("FSDP2 over all 4 ranks (ModelParallelStrategy)", "fsdp", 1, 4, 1, 1 + args.fsdp_steps),
        Config(f"local_sgd, shard_size 1, period {period} (4 full replicas)", "local_sgd", 1, 4, period, steps),
        Config(f"local_sgd, shard_size 2, period {period}", "local_sgd", 2, 4, period, steps),
        Config(f"diloco, shard_size 2, period {period}", "diloco", 2, 4, period, steps),
    ]


def ratios(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """shard_size 2 against 4 full replicas (and its bytes against 2 full replicas), per strategy and allocator."""
    out = []
    for allocator in dict.fromkeys(r["allocator"] for r in rows if "error" not in r):
        for strategy in ("local_sgd", "diloco"):
            by = {
                (r["config"]["shard_size"], r["config"]["world"]): r
                for r in rows
                if "error" not in r and r["config"]["strategy"] == strategy and r["allocator"] == allocator
            }
            if not {(1, 4), (2, 4)} <= by.keys():
                continue
            sharded, full, two = by[(2, 4)], by[(1, 4)], by.get((1, 2))
            out.append({
                "strategy": strategy,
                "allocator": allocator,
                "peak_rss": sharded["peak_rss_bytes"] / full["peak_rss_bytes"],
                "training_rss": sharded["training_rss_bytes"] / full["training_rss_bytes"],
                "bytes_per_round": sharded["max_bytes_per_round"] / full["max_bytes_per_round"],
                "bytes_per_round_vs_2_replicas": (
                    sharded["max_bytes_per_round"] / two["max_bytes_per_round"] if two is not None else None
                ),
            })  # fmt: skip
    return out


def memory_table(rows: list[dict[str, Any]], model: Model, args: argparse.Namespace) -> str:
    ok = next(r for r in rows if "error" not in r)
    mmap = f"mmap >= {size(args.mmap_threshold)}"
    lines = [
        f"Stack of {model.layers} Linear layers of width {model.width} ({ok['model_numel'] / 1e6:.1f} M float32 "
        f"parameters, {ok['model_bytes'] / 1e6:.0f} MB), batch {model.batch_size} per rank, SGD momentum 0.9, "
        f"{args.steps} steps at period {args.period}; loopback gloo, 1 thread per rank. Peak RSS: the largest "
        "`VmHWM` of any rank, under glibc's default allocator and with every block of "
        f"{size(args.mmap_threshold)} or more mmapped (`mallopt(M_MMAP_THRESHOLD)`: freed blocks leave the "
        "resident set); training part: the largest peak less that rank's RSS before it built the model. MB per "
        "round: what one rank sends across groups in a round (`comm_stats`), the largest over ranks.",
        "",
        f"| configuration | peak RSS per rank, glibc default (MiB) | peak RSS per rank, {mmap} (MiB) | "
        f"training part, {mmap} (MiB) | MB per round per rank | rounds |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    keyed: dict[str, dict[str, dict[str, Any]]] = {}
    for r in rows:
        keyed.setdefault(r["label"], {})["mmap" if r["config"]["mmap_threshold"] else "default"] = r

    def mib(row: Optional[dict[str, Any]], key: str) -> str:
        if row is None:
            return "-"
        return "FAILED" if "error" in row else f"{row[key] / MIB:.0f}"

    for label, runs in keyed.items():
        default, mapped = runs.get("default"), runs.get("mmap")
        bytes_row = next((r for r in (mapped, default) if r is not None and "error" not in r), None)
        per_round = f"{bytes_row['max_bytes_per_round'] / 1e6:.2f}" if bytes_row else "FAILED"
        rounds = str(max(bytes_row["rounds"])) if bytes_row else ""
        lines.append(
            f"| {label} | {mib(default, 'peak_rss_bytes')} | {mib(mapped, 'peak_rss_bytes')} | "
            f"{mib(mapped, 'training_rss_bytes')} | {per_round} | {rounds} |"
        )
    lines += [
        "",
        "| strategy | allocator | peak RSS, shard 2 / shard 1 (target <= 0.6) | training part, shard 2 / shard 1 | "
        "MB per round, shard 2 / shard 1 (4 processes) | MB per round, shard 2 / 2 full replicas |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for q in ratios(rows):
        two = f"{q['bytes_per_round_vs_2_replicas']:.3f}" if q["bytes_per_round_vs_2_replicas"] else "-"
        lines.append(
            f"| {q['strategy']} | {q['allocator']} | {q['peak_rss']:.2f} | {q['training_rss']:.2f} | "
            f"{q['bytes_per_round']:.3f} | {two} |"
        )
    return "\n".join(lines) + "\n"


def lab_table(lab: dict[str, Any], model: Model) -> str:
    rows = lab["rows"]
    ok = next((r for r in rows if "error" not in r), None)
    params = f"{ok['model_numel'] / 1e6:.1f} M parameters, " if ok else ""
    lines = [
        f"{lab['notice']}. Ranks 0, 1 in one namespace, 2, 3 in the other; stack of {model.layers} Linear layers of "
        f"width {model.width} ({params}{lab['size_note']}), batch {model.batch_size} per rank, 1 thread per rank. "
        "Steps/s after the first step, over the slowest rank; link MB: both ends of the shaped veth pair, the whole "
        "run (set-up and final average included) over its steps.",
        "",
        "| configuration | steps/s | s/step | step without a round (s, median) | step with a round (s, mean) | "
        "MB over the link per step | measured steps |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]

    def seconds(value: Optional[float]) -> str:
        return "-" if value is None else f"{value:.2f}"

    for r in rows:
        if "error" in r:
            lines.append(f"| {r['label']} | FAILED | | | | | |")
            continue
        link = f"{r['link_mb_per_step']:.1f}" if r["link_mb_per_step"] is not None else "-"
        lines.append(
            f"| {r['label']} | {r['steps_per_s']:.3f} | {1 / r['steps_per_s']:.2f} | "
            f"{seconds(r['local_step_seconds'])} | {seconds(r['round_step_seconds'])} | {link} | {r['window_steps']} |"
        )
    return "\n".join(lines) + "\n"


def run_memory(launcher: Launcher, model: Model, args: argparse.Namespace, out: Path) -> list[dict[str, Any]]:
    rows = []
    for config in memory_configs(args):
        print(f"-- {config.label}", flush=True)
        try:
            rows.append(memory_row(config, launcher.run(config, model, out / "runs" / config.slug)))
            print(f"   peak RSS {rows[-1]['peak_rss_bytes'] / MIB:.0f} MiB, {rows[-1]['seconds']:.0f} s", flush=True)
        except RuntimeError as error:
            print(f"   FAILED: {error}", flush=True)
            rows.append({"label": config.label, "config": asdict(config), "error": str(error)})
    return rows


def run_lab(launcher: Launcher, model: Model, args: argparse.Namespace, out: Path) -> dict[str, Any]:
    rows = []
    with NetLab(2, args.link, args.mtu) as lab:
        print(lab.notice, flush=True)
        for i, config in enumerate(lab_configs(args)):
            print(f"-- lab: {config.label}", flush=True)
            port = 29631 + i if lab.shaped else free_port()  # fresh namespaces: no one else there
            try:
                before = link_bytes(lab) if lab.shaped else None
                records = launcher.run(config, model, out / "lab" / config.slug, lab, port)
                link = link_bytes(lab) - before if before is not None else None
                rows.append(lab_row(config, records, 1, link))
                print(f"   {rows[-1]['steps_per_s']:.3f} steps/s, {rows[-1]['seconds']:.0f} s", flush=True)
            except RuntimeError as error:
                print(f"   FAILED: {error}", flush=True)
                rows.append({"label": config.label, "config": asdict(config), "error": str(error)})
        shaped = lab.shaped
        # netlab speaks of ranks (one per namespace there); here each namespace holds a replica group of 2.
        notice = (
            f"Network lab: 2 namespaces ({PREFIX}-<pid>-r0, -r1) joined by one veth pair, MTU {args.mtu}, both "
            f"egresses shaped to {args.link} by `tc tbf`"
            if shaped
            else lab.notice
        )
    same = args.lab_params_millions == args.params_millions
    note = "the memory part's model" if same else f"not the memory part's model: FSDP2 over {args.link} is too slow"
    return {"notice": notice, "shaped": shaped, "link": args.link, "size_note": note, "rows": rows}


def parse(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params-millions", type=float, default=64.0, help="memory part: model size")
    parser.add_argument("--layers", type=int, default=8, help="square Linear layers; the width follows the size")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=8, help="memory part: steps per run")
    parser.add_argument("--period", type=int, default=4, help="memory part: period (2 rounds in 8 steps)")
    parser.add_argument("--link", default="200mbit", help="lab: the tbf rate between the two namespaces")
    parser.add_argument("--mtu", type=int, default=DEFAULT_MTU)
    parser.add_argument("--lab-params-millions", type=float, default=None, help="lab: model size (default: as above)")
    parser.add_argument("--lab-period", type=int, default=8, help="lab: period of local_sgd and diloco")
    parser.add_argument("--fsdp-steps", type=int, default=2, help="lab: FSDP2 steps measured (after 1 warm-up)")
    parser.add_argument("--mmap-threshold", type=int, default=2**20, help="glibc's, in bytes, for the second pass")
    parser.add_argument("--parts", nargs="+", choices=["memory", "lab"], default=["memory", "lab"])
    parser.add_argument("--smoke", action="store_true", help="tiny model, 6 steps, loopback only: seconds")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds one configuration may take")
    parser.add_argument("--out", type=Path, default=None, help="default: results/sharded_groups[/smoke]")
    args = parser.parse_args(argv)
    if args.smoke:
        args.params_millions, args.layers, args.steps, args.period, args.parts = 0.02, 4, 6, 2, ["memory"]
    if args.lab_params_millions is None:
        args.lab_params_millions = args.params_millions
    if args.steps < 2 * args.period:
        parser.error("--steps must be at least 2 * --period (two rounds of diloco, which rounds after each period)")
    rate_bits(args.link)
    args.out = args.out or REPO / "results" / "sharded_groups" / ("smoke" if args.smoke else "")
    return args


def interrupted(signum: int, frame: Any) -> NoReturn:
    raise KeyboardInterrupt  # SIGTERM takes Ctrl-C's way out: the lab's namespaces are removed on the way


def main(argv: Optional[list[str]] = None) -> None:
    args = parse(argv)
    signal.signal(signal.SIGTERM, interrupted)
    command = shlex.join(["python", "-m", "benchmarks.sharded_groups", *(argv if argv is not None else sys.argv[1:])])
    args.out.mkdir(parents=True, exist_ok=True)
    launcher = Launcher(fork=args.smoke, timeout=args.timeout)
    model = Model.of(args.params_millions, args.layers, args.batch_size)
    started = time.monotonic()
    memory: list[dict[str, Any]] = []
    tables = ""
    if "memory" in args.parts:
        memory = run_memory(launcher, model, args, args.out)
        tables = memory_table(memory, model, args)
    lab: Optional[dict[str, Any]] = None
    lab_model = Model.of(args.lab_params_millions, args.layers, args.batch_size)
    if "lab" in args.parts:
        lab = run_lab(launcher, lab_model, args, args.out)
        tables += ("\n" if tables else "") + lab_table(lab, lab_model)
    seconds = time.monotonic() - started
    results = {
        "command": command,
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "model": asdict(model) | {"numel": model.numel},
        "memory": {"rows": memory, "ratios": ratios(memory)},
        "lab": None if lab is None else lab | {"model": asdict(lab_model) | {"numel": lab_model.numel}},
        "seconds": seconds,
    }
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    (args.out / "table.md").write_text(f"`{command}`\n\n{tables}")
    print(f"\n`{command}` ({seconds:.0f} s)\n\n{tables}\nwritten to {args.out}/ (results.json, table.md)")
    if any("error" in r for r in memory + (lab["rows"] if lab else [])):
        sys.exit(1)


if __name__ == "__main__":
    main()
