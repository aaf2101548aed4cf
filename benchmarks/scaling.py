"""One table across link rates, from the saved lab runs: steps/s and the fraction of the compute limit.

    python -m benchmarks.scaling --workload mlp --links 100mbit 200mbit 1gbit 10gbit

Writes ``results/<workload>-scaling.md`` too.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from benchmarks.report import compute_limit

REPO = Path(__file__).resolve().parent.parent


def load(results: Path, workload: str, link: str) -> dict[str, dict[str, Any]]:
    rows = json.loads((results / f"{workload}-{link}" / "results.json").read_text())["rows"]
    return {r["label"]: r for r in rows}


def cell(row: dict[str, Any] | None, limit: float | None) -> str:
    if row is None or "error" in row:
        return "n/a"
    fraction = f" ({100 * row['steps_per_s'] / limit:.0f} %)" if limit else ""
    return f"{row['steps_per_s']:.1f}{fraction}"


def table(results: Path, workload: str, links: list[str]) -> str:
    runs = {link: load(results, workload, link) for link in links}
    labels = list(dict.fromkeys(label for rows in runs.values() for label in rows))  # first-seen order
    limits = {link: compute_limit(list(rows.values())) for link, rows in runs.items()}
    lines = ["| strategy | " + " | ".join(f"{link}: steps/s (of limit)" for link in links) + " |"]
    lines.append("|---" + "|---:" * len(links) + "|")
    for label in labels:
        cells = [cell(runs[link].get(label), limits[link]) for link in links]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", default="mlp")
    parser.add_argument("--links", nargs="+", default=["100mbit", "200mbit", "1gbit", "10gbit"])
    parser.add_argument("--results", type=Path, default=REPO / "results")
    args = parser.parse_args()
    text = table(args.results, args.workload, args.links)
    (args.results / f"{args.workload}-scaling.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
