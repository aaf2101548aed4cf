"""Streaming DiLoCo in the slow-link lab: megabytes and seconds to the target against DDP and DiLoCo, over seeds.

    sudo python -m benchmarks.streaming_diloco [--workloads cnn lm] [--seeds 0 1 2] [--link 200mbit] [--steps N]
    sudo python -m benchmarks.streaming_diloco --smoke --only "Lightning DDP" "diloco, period 32"

Per workload and seed, one after another on the same shaped link (``benchmarks/slow_link.py``'s lab and runner):
Lightning DDP, ``diloco`` at period 32, and the Streaming DiLoCo rows of ``benchmarks/peers.py``
(``STREAMING_PEERS``: F = 4 fragments, tau = 2, plain, int4 and sparse top-k). A seed sets the initial weights;
the data's order is the workload's own, the same in every seed. Rows whose options the installed
``DiLoCoStrategy`` does not take yet are listed as skipped, not run.

Prints one markdown table per workload: for each row the median over seeds (min to max) of the MB each rank sent
until the averaged replicas first reached the target loss (and 95 % test accuracy on the CNN), the same as a
fraction of DDP's MB in the same seed, the seconds to those targets, and the final accuracy (CNN) or loss (LM)
with its difference to DDP's in the same seed. A seed that never reached a target counts as infinitely late, so
a median reads "not reached" when most seeds did not reach it. Writes ``table.md``, ``results.json`` and
``loss_vs_mb.png`` to ``results/streaming_diloco/<workload>-<link>/``.
"""

from __future__ import annotations

import argparse
import json
import math
import signal
import statistics
import sys
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable, Optional

from benchmarks.lightning_run import build_strategy
from benchmarks.netlab import DEFAULT_MTU, NetLab
from benchmarks.peers import PEERS, STREAMING_PEERS, Peer
from benchmarks.plots import plt, style
from benchmarks.slow_link import REPO, interrupted, lab_port, measure_peer
from benchmarks.workloads import WORKLOADS

DDP = "Lightning DDP"  # the reference of every ratio
ROWS: tuple[Peer, ...] = (
    *(p for p in PEERS if p.label in (DDP, "diloco, period 32")),
    *STREAMING_PEERS,
)
SMOKE = {"warmup": 4, "steps": 32, "eval_every": 12}  # one DiLoCo round, every fragment once
ALIGN = 32  # measured steps: whole periods of every row
Point = dict[str, Optional[float]]  # one row's numbers in one seed; None: target never reached
Spread = dict[str, Any]  # median, min, max (None: not reached), reached, of
TARGETS = ("mb_to_loss", "s_to_loss", "mb_to_acc", "s_to_acc")  # None: the target was never reached
VALUES = ("final_loss", "final_acc", "steps_per_s")  # None: not measured (accuracy on the LM)


# ---------------------------------------------------------------- pure helpers (tested without the lab)
def first_reached(points: list[dict[str, float]], key: str, target: Optional[float], above: bool) -> Optional[dict]:
    """The first curve point whose ``key`` is at or past the target (loss: at or below; accuracy: at or above)."""
    if target is None:
        return None
    return next((p for p in points if key in p and (p[key] >= target if above else p[key] <= target)), None)


def seed_point(row: dict[str, Any], target_loss: float, target_acc: Optional[float]) -> Optional[Point]:
    """From a ``report.row`` to the numbers of one seed (no accuracy targets without ``target_acc``); None when
    the run failed."""
    if "error" in row:
        return None
    points = row["points"]
    loss = first_reached(points, "loss", target_loss, above=False)
    point: Point = {"mb_to_loss": None if loss is None else loss["mb"]}
    point["s_to_loss"] = None if loss is None else loss["seconds"]
    if target_acc is not None:
        acc = first_reached(points, "acc", target_acc, above=True)
        point["mb_to_acc"] = None if acc is None else acc["mb"]
        point["s_to_acc"] = None if acc is None else acc["seconds"]
    point |= {"final_loss": row["final_loss"], "final_acc": row.get("final_acc"), "steps_per_s": row["steps_per_s"]}
    return point


def spread(values: list[Optional[float]]) -> Optional[Spread]:
    """Median, min and max, None (never reached) counting as infinitely late; None when there is no value."""
    if not values:
        return None
    ordered = [math.inf if v is None else v for v in values]

    def finite(x: float) -> Optional[float]:
        return None if math.isinf(x) else x

    return {
        "median": finite(statistics.median(ordered)),
        "min": finite(min(ordered)),
        "max": finite(max(ordered)),
        "reached": sum(v is not None for v in values),
        "of": len(values),
    }


def compared(
    per_seed: dict[int, dict[str, Optional[Point]]], label: str, key: str, how: str, reference: str
) -> list[Optional[float]]:
    """Per seed, ``label``'s ``key`` as a ``"ratio"`` to the reference's (None: ``label`` never reached it) or as
    a ``"difference"``. Seeds where either run failed, or the reference has no positive value to divide by (never
    reached, nothing sent), are left out: there is nothing to compare with."""
    values = []
    for rows in per_seed.values():
        mine, ref = rows.get(label), rows.get(reference)
        if mine is None or ref is None or key not in mine or ref.get(key) is None:
            continue
        if how == "ratio" and ref[key] > 0:
            values.append(None if mine[key] is None else mine[key] / ref[key])
        elif how == "difference" and mine[key] is not None:
            values.append(mine[key] - ref[key])
    return values


def aggregate(
    per_seed: dict[int, dict[str, Optional[Point]]], labels: list[str], reference: str = DDP
) -> list[dict[str, Any]]:
    """One summary per label over the seeds (``per_seed[seed][label]`` None: that run failed): the spread of every
    number, of the ratios of MB to the reference's and of the final numbers' differences to the reference's."""
    summary = []
    for label in labels:
        points = [rows[label] for rows in per_seed.values() if rows.get(label) is not None]
        failed = [seed for seed, rows in per_seed.items() if label in rows and rows[label] is None]
        entry: dict[str, Any] = {"label": label, "seeds": len(points), "failed_seeds": failed}
        for key in TARGETS:
            entry[key] = spread([p[key] for p in points if key in p])
        for key in VALUES:
            entry[key] = spread([p[key] for p in points if p.get(key) is not None])
        for key in ("mb_to_loss", "mb_to_acc"):
            entry[f"{key}_vs_ref"] = spread(compared(per_seed, label, key, "ratio", reference))
        for key in ("final_loss", "final_acc"):
            entry[f"{key}_vs_ref"] = spread(compared(per_seed, label, key, "difference", reference))
        summary.append(entry)
    return summary


def fraction(x: float) -> str:
    """Ratios: 1/N below a tenth (the goal reads "1/100 of DDP's bytes"), two decimals above."""
    if x <= 0:
        return "0"
    return f"1/{1 / x:.0f}" if x < 0.1 else f"{x:.2f}"


def megabytes(x: float) -> str:
    return f"{x:.0f}" if x >= 100 else f"{x:.3g}"


def cell(s: Optional[Spread], fmt: Callable[[float], str]) -> str:
    """``median (min to max)``; "not reached" for an infinite one; the seeds that reached it if not all."""
    if s is None:
        return "-"
    text = "not reached" if s["median"] is None else fmt(s["median"])
    if s["of"] > 1 and s["min"] is not None:
        high = "not reached" if s["max"] is None else fmt(s["max"])
        reached = f", {s['reached']}/{s['of']} seeds" if s["reached"] < s["of"] else ""
        text += f" ({fmt(s['min'])} to {high}{reached})"
    return text


def table(
    summary: list[dict[str, Any]],
    target_loss: float,
    target_acc: Optional[float],
    skipped: Optional[dict[str, str]] = None,
    reference: str = DDP,
) -> str:
    acc = target_acc is not None
    head = ["strategy", f"MB to loss <= {target_loss:g}", f"of {reference}'s"]
    head += [f"MB to accuracy >= {100 * target_acc:g} %", f"of {reference}'s"] if acc else []
    head += [f"s to loss <= {target_loss:g}"]
    head += [f"s to accuracy >= {100 * target_acc:g} %"] if acc else []
    head += ["final accuracy (%)", "vs DDP (points)"] if acc else ["final loss", "vs DDP"]
    head += ["steps/s"]
    lines = ["| " + " | ".join(head) + " |", "|---" + "|---:" * (len(head) - 1) + "|"]
    for e in summary:
        label = e["label"] + (f" (failed in seeds {e['failed_seeds']})" if e["failed_seeds"] else "")
        if e["seeds"] == 0:
            lines.append(f"| {label} | failed |" + " |" * (len(head) - 2))
            continue
        cells = [label, cell(e["mb_to_loss"], megabytes), cell(e["mb_to_loss_vs_ref"], fraction)]
        cells += [cell(e["mb_to_acc"], megabytes), cell(e["mb_to_acc_vs_ref"], fraction)] if acc else []
        cells += [cell(e["s_to_loss"], "{:.1f}".format)]
        cells += [cell(e["s_to_acc"], "{:.1f}".format)] if acc else []
        if acc:
            cells += [cell(e["final_acc"], lambda x: f"{100 * x:.1f}")]
            cells += [cell(e["final_acc_vs_ref"], lambda x: f"{100 * x:+.1f}")]
        else:
            cells += [cell(e["final_loss"], "{:.3f}".format), cell(e["final_loss_vs_ref"], "{:+.3f}".format)]
        cells += [cell(e["steps_per_s"], "{:.1f}".format)]
        lines.append("| " + " | ".join(cells) + " |")
    for label, reason in (skipped or {}).items():
        lines.append(f"| {label} | skipped: {reason} |" + " |" * (len(head) - 2))
    return "\n".join(lines)


# ---------------------------------------------------------------- the runs
def unbuildable(peer: Peer) -> Optional[str]:
    """Why the installed strategy cannot take the row's options (e.g. keywords still to come), or None."""
    try:
        build_strategy(peer)
    except (TypeError, ValueError) as error:
        return str(error).splitlines()[0][:160]
    return None


def chosen_rows(args: argparse.Namespace) -> tuple[list[Peer], dict[str, str]]:
    """The rows to run (in the table's order) and the skipped ones with the reason."""
    rows = [p for p in ROWS if not args.only or any(o in p.label for o in args.only)]
    skipped = {p.label: why for p in rows if (why := unbuildable(p)) is not None}
    runnable = [p for p in rows if p.label not in skipped]
    if args.smoke and not args.only:  # DDP and the most elaborate row the strategy takes today
        runnable = [p for p in runnable if p.label == DDP] + [p for p in runnable if p.label != DDP][-1:]
    return runnable, skipped


def run_args(args: argparse.Namespace, workload: str, seed: int) -> argparse.Namespace:
    """What ``slow_link.measure_peer`` reads, for one workload and seed."""
    w = WORKLOADS[workload]
    steps = SMOKE if args.smoke else {"warmup": w.warmup, "steps": args.steps or w.steps, "eval_every": w.eval_every}
    return argparse.Namespace(
        workload=workload,
        ranks=2,
        seed=seed,
        timeout=args.timeout,
        target_loss=w.target_loss,
        target_acc=w.target_acc,
        keep_snapshots=False,
        **steps,
    )


def plot_loss_vs_mb(per_seed: dict[int, list[dict[str, Any]]], out: Path, title: str, target: float) -> None:
    """Every seed's curve, one colour per row (the first seed's curve labelled); log MB axis, step 0 left out."""
    fig, ax = plt.subplots(figsize=(8, 5), dpi=110)
    labels = list(dict.fromkeys(r["label"] for rows in per_seed.values() for r in rows))
    for seed_index, rows in enumerate(per_seed.values()):
        for r in rows:
            points = [p for p in r.get("points", []) if p["step"] > 0 and p["mb"] > 0]
            if points:
                kind = style(r["label"], labels.index(r["label"]))
                ax.plot([p["mb"] for p in points], [p["loss"] for p in points], marker=".", alpha=0.8,
                        label=r["label"] if seed_index == 0 else None, **kind)  # fmt: skip
    ax.axhline(target, color="black", linewidth=0.8, alpha=0.6)
    ax.set_xscale("log")
    ax.set_xlabel("MB sent per rank (log scale)")
    ax.set_ylabel("loss of the averaged model")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)


def report_workload(
    args: argparse.Namespace,
    workload: str,
    rows: dict[int, list[dict[str, Any]]],
    labels: list[str],
    skipped: dict[str, str],
    notice: str,
    out: Path,
) -> str:
    """Table, JSON and plot of one workload; returns the text printed."""
    w = WORKLOADS[workload]
    per_seed = {seed: {r["label"]: seed_point(r, w.target_loss, w.target_acc) for r in rs} for seed, rs in rows.items()}
    summary = aggregate(per_seed, labels)
    seeds = ", ".join(str(s) for s in rows)
    title = f"{workload} over {args.link}, 2 ranks x 1 thread, seed{'s' * (len(rows) > 1)} {seeds}\n{w.what}"
    over = f"Median over seeds {seeds} (min to max)" if len(rows) > 1 else f"Seed {seeds}"
    how = (
        f"{over}. MB: sent per rank until the averaged replicas first reached the target (as the interface counted "
        f"them; the strategy's own count on loopback). Ratios and differences are to {DDP} in the same seed; a seed "
        "that never reached a target counts as infinitely late."
    )
    text = f"{title}\n\n{notice}\n\n{how}\n\n{table(summary, w.target_loss, w.target_acc, skipped)}"
    command = "python -m benchmarks.streaming_diloco " + " ".join(args.argv)
    (out / "table.md").write_text(f"`{command}`\n\n{text}\n")
    results = {"args": {k: str(v) for k, v in vars(args).items()}, "notice": notice, "skipped": skipped}
    results |= {"workload": workload, "target_loss": w.target_loss, "target_acc": w.target_acc}
    results |= {"summary": summary, "rows": {str(seed): rs for seed, rs in rows.items()}}
    (out / "results.json").write_text(json.dumps(results))
    plot_loss_vs_mb(rows, out / "loss_vs_mb.png", title, w.target_loss)
    return text


def parse(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", nargs="+", default=None, choices=["cnn", "lm"], help="default: cnn lm")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--link", default="200mbit", help="tbf rate, or 'loopback'")
    parser.add_argument("--mtu", type=int, default=DEFAULT_MTU)
    parser.add_argument("--steps", type=int, default=None, help=f"measured steps (multiple of {ALIGN})")
    parser.add_argument("--timeout", type=float, default=900, help="seconds one run may take")
    parser.add_argument("--only", nargs="*", default=[], help="the rows whose label contains one of these")
    parser.add_argument("--smoke", action="store_true", help="a few steps, 1 seed, DDP and one more row (cnn)")
    parser.add_argument("--report-only", action="store_true", help="redo tables and plots from the saved runs")
    parser.add_argument("--out", type=Path, default=REPO / "results" / "streaming_diloco")
    args = parser.parse_args(argv)
    args.argv = argv if argv is not None else sys.argv[1:]
    if args.steps is not None and (args.steps <= 0 or args.steps % ALIGN):
        parser.error(f"--steps must be a positive multiple of {ALIGN}, got {args.steps}")
    if args.workloads is None:
        args.workloads = ["cnn"] if args.smoke else ["cnn", "lm"]
    if args.smoke:
        args.seeds = args.seeds[:1]
    return args


def main(argv: Optional[list[str]] = None) -> None:
    args = parse(argv)
    signal.signal(signal.SIGTERM, interrupted)
    peers, skipped = chosen_rows(args)
    for label, reason in skipped.items():
        print(f"-- {label}: skipped ({reason})", flush=True)
    labels = [p.label for p in peers]
    dirs = {w: args.out / f"{w}-{args.link}{'-smoke' if args.smoke else ''}" for w in args.workloads}
    if args.report_only:  # no lab; the notice of the run that produced the data
        context: Any = nullcontext(None)
        notice = json.loads((dirs[args.workloads[0]] / "results.json").read_text())["notice"]
    else:
        context = NetLab(2, None if args.link == "loopback" else args.link, args.mtu)
    with context as lab:
        if lab is not None:
            notice = lab.notice
            print(notice, flush=True)
        runs = 0  # a fresh port for every run: an earlier run's may still be in TIME_WAIT
        for workload in args.workloads:
            dirs[workload].mkdir(parents=True, exist_ok=True)
            rows: dict[int, list[dict[str, Any]]] = {}
            for seed in args.seeds:
                print(f"== {workload}, seed {seed}", flush=True)
                rows[seed] = []
                for peer in peers:
                    run_dir = dirs[workload] / "runs" / f"seed{seed}" / peer.slug
                    port = lab_port(lab, runs) if lab is not None else 0
                    rows[seed].append(measure_peer(peer, lab, run_args(args, workload, seed), run_dir, port))
                    runs += 1
            text = report_workload(args, workload, rows, labels, skipped, notice, dirs[workload])
            print(f"\n{text}\n\nwritten to {dirs[workload]}/ (table.md, results.json, loss_vs_mb.png)\n", flush=True)


if __name__ == "__main__":
    main()
