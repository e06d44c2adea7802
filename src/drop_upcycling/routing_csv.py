"""The routing-counts CSV: the one format between counting (:mod:`.count_routing`) and analysis (:mod:`.routing`).

Columns are those of the authors' released Figure 5 counts (``reports/reference/``), so our counts
and theirs go through the same reader: ``model, domain, layer, expert`` name a row, ``assignments``
is how many top-k slots chose the expert and ``distinct_tokens`` how many different vocabulary ids
it saw. Both halves import this module and neither imports the other; it needs pandas only (no
torch), so analysis stays free of the model code.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from .errors import UserError
from .fsio import atomic_file, write_json

COUNT_COLUMNS = ["model", "domain", "layer", "expert", "assignments", "distinct_tokens"]
COUNTS_FILE = "routing_counts.csv"
PROVENANCE_FILE = "routing_counts.json"


# ---------------------------------------------------------------------------- reading
def read_counts(paths: str | Path | Sequence[str | Path]) -> pd.DataFrame:
    """Concatenate count CSVs, checking columns, types and that every (model, domain, layer) is complete.

    A malformed file is a :class:`UserError` naming the file and the problem.
    """
    if isinstance(paths, (str, Path)):
        paths = [paths]
    if not paths:
        raise UserError("no counts CSV given")
    counts = pd.concat([_read_one(Path(p)) for p in paths], ignore_index=True)
    dup = counts.duplicated(["model", "domain", "layer", "expert"])
    if dup.any():
        row = counts[dup].iloc[0]
        raise UserError(f"duplicate counts for model {row.model}, domain {row.domain}, layer {row.layer}, "
                        f"expert {row.expert} (the same model in two files?)")
    _check_complete(counts)
    return counts.drop(columns="_file")


def _read_one(path: Path) -> pd.DataFrame:
    """One file (or the ``--out`` folder of ``drop-upcycling routing``), validated, with a ``_file`` column
    so that later checks across files can name where a model's rows came from."""
    if path.is_dir():
        path = path / COUNTS_FILE
    if not path.is_file():
        raise UserError(f"counts file {path} does not exist")
    try:
        df = pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not a readable CSV: {e}") from None
    missing = [c for c in COUNT_COLUMNS if c not in df.columns]
    if missing:
        raise UserError(f"{path} lacks column(s) {', '.join(missing)} (expected {', '.join(COUNT_COLUMNS)})")
    return _validate(df[COUNT_COLUMNS].copy(), path).assign(_file=str(path))


def _check_complete(counts: pd.DataFrame) -> None:
    """Every model has a row for each (domain, layer 0..L-1, expert 0..E-1), E the same in every layer.

    Checked over all files together (a model's domains may come from several), because a missing
    row would otherwise become a missing share: a wrong top expert, entropy or specialization.
    """
    for model, g in counts.groupby("model", sort=False):
        where = ", ".join(sorted(set(g["_file"])))
        experts = g.groupby(["domain", "layer"])["expert"].max() + 1
        if experts.nunique() > 1:
            (d_lo, l_lo), (d_hi, l_hi) = experts.idxmin(), experts.idxmax()
            raise UserError(f"{where}: model {model} has {experts.min()} experts in domain {d_lo} layer {l_lo} but "
                            f"{experts.max()} in domain {d_hi} layer {l_hi} (rows missing?)")
        layers = set(g["layer"])
        absent = sorted(set(range(max(layers) + 1)) - layers)
        if absent:
            raise UserError(f"{where}: model {model} has no rows for layer(s) {', '.join(map(str, absent))} "
                            f"(expected layers 0..{max(layers)})")
        have = set(experts.index)
        for domain in sorted(set(g["domain"])):
            lacking = [layer for layer in sorted(layers) if (domain, layer) not in have]
            if lacking:
                raise UserError(f"{where}: model {model} has no rows for domain {domain} in layer(s) "
                                f"{', '.join(map(str, lacking))}")


def _validate(df: pd.DataFrame, path: Path) -> pd.DataFrame:
    """One file's rows: names present, counts non-negative integers, each (model, domain, layer) whole."""
    if df.empty:
        raise UserError(f"{path} has no rows")
    for col in ("model", "domain"):
        empty = df[col].isna() | (df[col].astype(str).str.strip() == "")
        if empty.any():
            raise UserError(f"{path}: column {col} is empty in line {int(np.flatnonzero(empty)[0]) + 2}")
        df[col] = df[col].astype(str)
    for col in ("layer", "expert", "assignments", "distinct_tokens"):
        values = pd.to_numeric(df[col], errors="coerce")
        invalid = values.isna() | (values < 0) | (values % 1 != 0)
        if invalid.any():
            row = int(np.flatnonzero(invalid)[0])
            raise UserError(f"{path}: column {col} must hold non-negative integers, got {df[col].iloc[row]} "
                            f"in line {row + 2}")
        df[col] = values.astype(np.int64)
    experts = df.groupby(["model", "domain", "layer"])["expert"].agg(["nunique", "max", "count"])
    n_exp = experts["max"] + 1
    bad = experts[(experts["nunique"] != n_exp) | (experts["count"] != n_exp)]
    if not bad.empty:
        m, d, layer = bad.index[0]
        raise UserError(f"{path}: model {m}, domain {d}, layer {layer} does not list experts 0..E-1 exactly once")
    totals = df.groupby(["model", "domain", "layer"])["assignments"].sum()
    if (totals == 0).any():
        m, d, layer = totals[totals == 0].index[0]
        raise UserError(f"{path}: model {m}, domain {d}, layer {layer} has no assignments")
    over = df["distinct_tokens"] > df["assignments"]
    if over.any():
        row = df[over].iloc[0]
        raise UserError(f"{path}: model {row.model}, domain {row.domain}, layer {row.layer}, expert {row.expert} "
                        f"has more distinct tokens ({row.distinct_tokens}) than assignments ({row.assignments})")
    return df


# ---------------------------------------------------------------------------- writing
def write_counts(counts: pd.DataFrame, out_dir: str | Path, metadata: dict | None = None) -> Path:
    """``out_dir/routing_counts.csv`` (+ ``routing_counts.json`` provenance), each written atomically."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = write_csv(counts[COUNT_COLUMNS], out_dir / COUNTS_FILE, float_format=None)
    if metadata is not None:
        write_json(out_dir / PROVENANCE_FILE, metadata)
    return path


def write_csv(df: pd.DataFrame, path: Path, float_format: str | None = "%.6g") -> Path:
    """``df`` as CSV without its index, atomically (a reader never sees half a table)."""
    with atomic_file(path) as tmp:
        df.to_csv(tmp, index=False, float_format=float_format)
    return path
