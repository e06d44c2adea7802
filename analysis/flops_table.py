"""The paper's training-cost table and the 8x3.7B-DU vs 13B-dense headline, as CSV + figure.

    python analysis/flops_table.py [--out DIR]

A thin wrapper around :mod:`drop_upcycling.flops`; the same as ``drop-upcycling flops --plan paper --out DIR``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from drop_upcycling.cli import main

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/analysis/flops"))
    args = parser.parse_args()
    raise SystemExit(main(["flops", "--plan", "paper", "--out", str(args.out)]))
