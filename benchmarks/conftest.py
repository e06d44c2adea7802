"""Benchmark-wide plumbing: every benchmark's headline ratios go into one file, ``benchmarks/results.json``,
which ``benchmarks/report.py`` renders into the README's performance table.

A benchmark records what it compares with the ``record_ratio`` fixture, once per ratio::

    def test_conversion(benchmark, record_ratio):
        ...
        record_ratio("conversion_vs_floor", per_round_ratios, target=2.0, better="lower",
                     label="upcycle 152M -> 8x152M, whole process / its floor", seconds=3.1)

``value`` is a number or the list of per-round values (the table shows their median and the min..max
spread: on a shared machine one number says little). At the end of the session the ratios recorded
replace those of the same name in the file and the others are kept, so running one benchmark file
updates its rows only. Each row names the run that measured it (date, commit, machine, versions).
``--bench-results PATH`` writes elsewhere; ``--bench-results ''`` writes nothing.

The file (``"schema": 1``)::

    {"schema": 1,
     "runs":   {"<run id: UTC time>": {"date", "commit", "dirty", "command", "machine": {...}, "versions": {...}}},
     "ratios": {"<name>": {"label", "value", "min", "max", "rounds", "unit", "target", "better",
                           "meets_target", "test", "run", "details": {...}}}}

``unit`` is ``"x"`` (a ratio), ``"%"`` (a share, stored as a fraction) or a unit of its own ("GB");
``better`` says which direction is good ("lower" or "higher"); ``meets_target`` is null without a
target.
"""

from __future__ import annotations

import contextlib
import datetime
import importlib.metadata
import json
import os
import platform
import statistics
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

SCHEMA = 1
REPO = Path(__file__).resolve().parents[1]
DEFAULT_RESULTS = REPO / "benchmarks" / "results.json"
PACKAGES = ("torch", "transformers", "numpy", "safetensors", "drop-upcycling")
_KEY = pytest.StashKey[dict[str, dict[str, Any]]]()
_LOAD = pytest.StashKey[float | None]()


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--bench-results", default=str(DEFAULT_RESULTS), metavar="PATH",
                     help="where the benchmarks' ratios are merged (default benchmarks/results.json; '' = nowhere)")


def pytest_configure(config: pytest.Config) -> None:
    config.stash[_KEY] = {}
    # Other jobs on the machine move every ratio: the load when the run starts goes with the results.
    config.stash[_LOAD] = round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None


@pytest.fixture
def record_ratio(request: pytest.FixtureRequest) -> Callable[..., dict[str, Any]]:
    """``record_ratio(name, value, *, label, target=None, better="lower", unit="x", **details)``:
    one row of ``results.json`` (see the module docstring); returns the row."""

    def record(name: str, value: float | Sequence[float], **kwargs: Any) -> dict[str, Any]:
        row = ratio_row(value, test=request.node.nodeid, **kwargs)
        request.config.stash[_KEY][name] = row
        return row

    return record


def ratio_row(value: float | Sequence[float], *, label: str, test: str, target: float | None = None,
              better: str = "lower", unit: str = "x", **details: Any) -> dict[str, Any]:
    """One ratio's row: the median of the per-round values, their spread, and the target's verdict."""
    if better not in ("lower", "higher"):
        raise ValueError(f"better must be 'lower' or 'higher', got {better!r}")
    values = [float(v) for v in value] if isinstance(value, Sequence) else [float(value)]
    median = statistics.median(values)
    return {
        "label": label, "value": median, "min": min(values), "max": max(values), "rounds": len(values),
        "unit": unit, "target": target, "better": better,
        "meets_target": None if target is None else (median <= target if better == "lower" else median >= target),
        "test": test, "details": details,
    }


def pytest_sessionfinish(session: pytest.Session) -> None:
    rows = session.config.stash.get(_KEY, {})
    target = session.config.getoption("--bench-results")
    if not rows or not target:
        return
    run_id = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    path = Path(target)
    run = {"date": run_id, **_provenance(), "command": " ".join(["pytest", *sys.argv[1:]])}
    run["machine"]["load_average_at_start"] = session.config.stash.get(_LOAD, None)
    merge_results(path, run, run_id, rows)


def merge_results(path: Path, run: dict[str, Any], run_id: str, rows: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Replace ``rows`` in the results file at ``path`` (kept: the other rows and the runs they name)."""
    try:
        old = json.loads(path.read_text())
        if old.get("schema") != SCHEMA:
            old = {}
    except (OSError, ValueError):
        old = {}
    ratios = {**old.get("ratios", {}), **{name: {**row, "run": run_id} for name, row in rows.items()}}
    runs = {**old.get("runs", {}), run_id: run}
    used = {row["run"] for row in ratios.values()}
    results = {"schema": SCHEMA, "runs": {k: v for k, v in sorted(runs.items()) if k in used}, "ratios": ratios}
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(results, indent=1) + "\n")
    os.replace(tmp, path)
    return results


def _provenance(root: Path = REPO) -> dict[str, Any]:
    """Commit, machine and versions: what a reader needs to judge a ratio measured elsewhere (``root``:
    the checkout measured)."""

    def git(*args: str) -> str | None:
        try:
            return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=True,
                                  timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None

    versions = {"python": platform.python_version()}
    for pkg in PACKAGES:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            versions[pkg] = importlib.metadata.version(pkg)
    # Dirty: the measured code differs from the commit. The benchmarks' own outputs (this file's rows
    # and the README table rendered from them) do not count, or every run after the first would be.
    status = git("status", "--porcelain", "--untracked-files=no", "--", ".",
                 ":(exclude)benchmarks/results.json", ":(exclude)README.md")
    return {"commit": git("rev-parse", "--short", "HEAD"), "dirty": None if status is None else bool(status),
            "machine": _machine(), "versions": versions}


def _machine() -> dict[str, Any]:
    import torch

    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError, StopIteration):
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    try:
        memory_gb = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9, 1)
    except (OSError, ValueError, AttributeError):
        memory_gb = None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "platform": platform.platform(), "cpu": cpu, "cores": cores, "torch_threads": torch.get_num_threads(),
        "memory_gb": memory_gb, "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
