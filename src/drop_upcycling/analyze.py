"""``drop-upcycling analyze KIND ...``: analyses of finished artifacts (counts, logs), no training code.

Each kind is one line in :data:`ANALYSES` naming the module that implements it; that module exposes
``configure_analyze_parser(parser)`` and ``run_analyze(args) -> int``; adding a kind is one line
here plus those two functions. Analysis modules keep their heavy imports (matplotlib, torch) inside
functions, so declaring every kind's options stays cheap.
"""

from __future__ import annotations

import argparse
import importlib

# kind -> (module, one-line help)
ANALYSES: dict[str, tuple[str, str]] = {
    "routing": ("drop_upcycling.routing", "Figure 5 and specialization metrics from routing count CSVs"),
    "curves": ("drop_upcycling.curves", "LM loss against tokens and FLOPs, final losses and crossovers of runs"),
    "study": ("drop_upcycling.study", "held-out curves, the DU-0.5 - NU crossover, experts over training, ablation"),
}


def configure_parser(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="kind", metavar="KIND", required=True)
    for kind, (module_name, help_) in ANALYSES.items():
        p = sub.add_parser(kind, help=help_, description=help_)
        p.set_defaults(_analysis_module=module_name)
        # Imported only to declare options; the module's heavy imports stay inside its functions.
        importlib.import_module(module_name).configure_analyze_parser(p)


def run(args: argparse.Namespace) -> int:
    return int(importlib.import_module(args._analysis_module).run_analyze(args) or 0)
