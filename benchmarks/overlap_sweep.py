"""Where communication stops fitting behind computation: Local SGD, Overlap Local-SGD and CoCoD-SGD by period.

    sudo python -m benchmarks.overlap_sweep --link 200mbit [--periods 8 16 32 64 128]

Same lab, workload and peers' runner as :mod:`benchmarks.slow_link` (MLP by default). For each period it
reports throughput as a fraction of the compute limit (a plain PyTorch loop), of "every rank at once, no
communication" (what 2 ranks sharing this machine can do at best) and of Lightning training one process with no
communication (what Lightning's own loop allows any strategy), of the same strategy with no rounds at all (its
own local steps, the bound a fully hidden round can reach), the seconds the overlapping strategies waited
for a transfer against the seconds transfers were in flight (hidden fraction = 1 - wait / in flight), and the
final loss, which should match Local SGD's at the same period (same loss per step, communication off the clock).
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from benchmarks import report
from benchmarks.alternating import block_rates, job_ratios
from benchmarks.lightning_run import ALTERNATE
from benchmarks.netlab import DEFAULT_MTU, NetLab
from benchmarks.peers import Peer
from benchmarks.slow_link import REPO, run_peer
from benchmarks.workloads import WORKLOADS

STRATEGIES = ("local_sgd", "overlap_local_sgd", "cocod_sgd")
NO_ROUNDS = 10**9


def hidden(ranks: list[dict[str, Any]]) -> str:
    comm = ranks[0].get("comm") or {}
    if not comm.get("background_seconds"):
        return ""
    wait, flight = comm["wait_seconds"], comm["background_seconds"]
    return f"{wait:.2f} / {flight:.2f} s ({100 * (1 - wait / flight):.0f} % hidden)"


def summarise(peer: Peer, trials: list[dict[str, Any]]) -> dict[str, Any]:
    """One row: the median run's figures, with the spread of steps/s over the runs."""
    ordered = sorted(trials, key=lambda t: t["steps_per_s"])
    median = ordered[len(ordered) // 2]
    spread = f" ({ordered[0]['steps_per_s']:.1f}-{ordered[-1]['steps_per_s']:.1f})" if len(ordered) > 1 else ""
    strategy = peer.strategy if peer.kind == "lightning" else None
    return {"label": peer.label, "strategy": strategy, "spread": spread, **median}


def paired_ratio(runs: list[dict[str, Any]], bounds: list[dict[str, Any]]) -> str:
    """Median over the repeats of steps/s divided by the bound's steps/s in the same repeat (min-max).

    Pairing by repeat cancels the machine's slow drifts (a shared host's speed moves by 10-20 % over minutes),
    which a ratio of two medians taken from different minutes would keep.
    """
    ratios = sorted(run["steps_per_s"] / bound["steps_per_s"] for run, bound in zip(runs, bounds))
    median = 100 * ratios[len(ratios) // 2]
    return f"{median:.1f} % ({100 * ratios[0]:.0f}-{100 * ratios[-1]:.0f})" if len(ratios) > 1 else f"{median:.1f} %"


def in_run_ratios(peer: Peer, ranks: list[dict[str, Any]], first_count: int) -> list[float]:
    """The job's on/off block ratios of an alternating run (empty for any other run)."""
    blocks = peer.options.get(ALTERNATE)
    if not blocks:
        return []
    warmup, period = peer.options.get("warmup_steps", 0), peer.options["period"]
    return job_ratios([block_rates(rank["step_ends"], first_count, warmup, period, blocks) for rank in ranks])


def alternating_table(peers: list[Peer], trials: dict[str, list[dict[str, Any]]], blocks: int) -> list[str]:
    lines = [
        f"Rounds on and off within one run (blocks of {blocks} periods; benchmarks.alternating): steps/s with a "
        "round every period over steps/s of the same run's round-free block seconds later, median (min-max) over "
        "every pair of blocks of every repeat (a pair's speeds are the slowest rank's)",
        "",
        "| strategy | of its own round-free steps, same run | pairs |",
        "|---|---:|---:|",
    ]
    for peer in peers:
        ratios = sorted(r for trial in trials[peer.label] for r in trial["block_ratios"])
        if not ratios:
            lines.append(f"| {peer.label} | no pair of blocks fitted in the run: more --steps | 0 |")
            continue
        median = 100 * ratios[len(ratios) // 2]
        lines.append(
            f"| {peer.label} | {median:.1f} % ({100 * ratios[0]:.0f}-{100 * ratios[-1]:.0f}) | {len(ratios)} |"
        )
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--link", default="200mbit")
    parser.add_argument("--mtu", type=int, default=DEFAULT_MTU, help="the links' MTU (1500: standard frames)")
    parser.add_argument("--workload", default="mlp", choices=sorted(WORKLOADS))
    parser.add_argument("--periods", type=int, nargs="+", default=[8, 16, 32, 64, 128])
    parser.add_argument("--steps", type=int, default=512)
    parser.add_argument("--timeout", type=float, default=600)
    parser.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=STRATEGIES)
    parser.add_argument("--repeats", type=int, default=1, help="run the whole list N times, interleaved; medians")
    parser.add_argument(
        "--alternate", type=int, default=0, metavar="N",
        help="also run each overlapping strategy and period with rounds on and off in blocks of N periods, "
        "and report the round's cost within those runs (benchmarks.alternating)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if args.alternate and any(2 * args.alternate * p > args.steps for p in args.periods):
        parser.error("--steps must hold at least one pair of blocks (2 x N x period) for every period")
    workload = WORKLOADS[args.workload]
    run_args = argparse.Namespace(
        workload=args.workload, ranks=2, warmup=workload.warmup, steps=args.steps,
        eval_every=args.steps, timeout=args.timeout,
    )  # fmt: skip
    out = REPO / "results" / f"overlap-sweep-{args.workload}-{args.link}"
    peers = [Peer("compute limit", "compute"), Peer("every rank at once, no comm", "compute_pair")]
    peers += [Peer("Lightning 1 process, no comm", "lightning", "single")]
    # The same strategy with no rounds: a period longer than the run (its local steps' own speed).
    never = {"local_sgd": {"first_period_one_step": False}}  # Local SGD's default first round after one step
    for s in args.strategies:  # each strategy's bound next to its periods: close in time, so the pairs compare
        peers.append(Peer(f"{s}, no rounds", "lightning", s, {"period": NO_ROUNDS, **never.get(s, {})}, True))
        peers += [Peer(f"{s}, period {p}", "lightning", s, {"period": p}, True) for p in args.periods]
        if args.alternate:
            peers += [
                Peer(
                    f"{s}, period {p}, rounds in alternate blocks",
                    "lightning",
                    s,
                    {"period": p, ALTERNATE: args.alternate},
                    True,
                )
                for p in args.periods
            ]
    trials: dict[str, list[dict[str, Any]]] = {peer.label: [] for peer in peers}
    with NetLab(2, args.link, args.mtu) as lab:
        print(lab.notice, flush=True)
        # Round-robin over the list: a machine that slows down for a minute slows every row alike.
        for repeat in range(args.repeats):
            for i, peer in enumerate(peers):
                run_dir = out / "runs" / f"{peer.slug}-{repeat}"
                run_peer(peer, lab, run_args, run_dir, 29711 + repeat * len(peers) + i)
                ranks = report.load_ranks(run_dir)
                scored = ranks[:1] if peer.kind == "compute_pair" else ranks
                points = report.curve(workload, run_dir, scored)
                trials[peer.label].append({"steps_per_s": ranks[0]["steps_per_s"], "hidden": hidden(ranks),
                                           "final_loss": points[-1]["loss"],
                                           "block_ratios": in_run_ratios(peer, ranks, run_args.warmup)})  # fmt: skip
                print(f"-- {peer.label} ({repeat}): {ranks[0]['steps_per_s']:.1f} steps/s {hidden(ranks)}", flush=True)
    alternating = [peer for peer in peers if ALTERNATE in peer.options]
    peers = [peer for peer in peers if ALTERNATE not in peer.options]
    rows = [summarise(peer, trials[peer.label]) for peer in peers]
    limit, pair, lightning = (trials[peer.label] for peer in peers[:3])
    no_rounds = {peer.strategy: trials[peer.label] for peer in peers if peer.label.endswith(", no rounds")}
    lines = [
        f"{args.workload} over {args.link}, 2 ranks x 1 thread, {args.steps} steps measured, {args.repeats} "
        "interleaved run(s): steps/s is the median (min-max); each ratio is the median over the runs of the ratio "
        "to the bound measured in the same run (min-max)",
        "",
        lab.notice,
        "",
        "| strategy | steps/s | of compute limit | of every-rank-at-once | of Lightning 1 process | "
        "of the same strategy with no rounds | waited / in flight | final loss |",
        "|---|---:|---:|---:|---:|---:|---|---:|",
    ]
    for peer, r in zip(peers, rows):
        runs = trials[peer.label]
        bound = no_rounds.get(r["strategy"])
        of_bound = paired_ratio(runs, bound) if bound else ""
        lines.append(
            f"| {r['label']} | {r['steps_per_s']:.1f}{r['spread']} | {paired_ratio(runs, limit)} | "
            f"{paired_ratio(runs, pair)} | {paired_ratio(runs, lightning)} | {of_bound} | "
            f"{r['hidden']} | {r['final_loss']:.3f} |"
        )
    if alternating:
        lines += ["", *alternating_table(alternating, trials, args.alternate)]
    text = "\n".join(lines)
    (out / "table.md").write_text(text + "\n")
    (out / "results.json").write_text(json.dumps(rows))
    print("\n" + text)


if __name__ == "__main__":
    main()
