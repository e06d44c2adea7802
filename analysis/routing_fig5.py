"""Figure 5 and the routing metrics from count CSVs (default: the authors' released counts).

    python analysis/routing_fig5.py [--counts CSV ...] [--out DIR]

A thin wrapper around :func:`drop_upcycling.routing.analyze_routing`; the same as
``drop-upcycling analyze routing``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from drop_upcycling.routing import analyze_routing, format_summary, routing_metrics
from drop_upcycling.routing_csv import read_counts

RELEASED = Path(__file__).resolve().parents[1] / "reports/reference/fig5_routing_counts.csv"

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--counts", nargs="+", default=[str(RELEASED)])
    parser.add_argument("--out", type=Path, default=Path("runs/analysis/routing"))
    args = parser.parse_args()
    paths = analyze_routing(args.counts, args.out)
    print(format_summary(routing_metrics(read_counts(args.counts))))
    print("wrote", *paths["metrics"], *paths["figures"])
