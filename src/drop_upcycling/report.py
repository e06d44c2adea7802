"""``drop-upcycling report RUN_DIR --out DIR``: the reproduction report of one run directory.

Reads the files a reproduction leaves behind (never imports the trainer) and writes ``DIR/README.md``
(figures, tables, provenance, and for each of the paper's findings whether this run reproduces it,
from the numbers), ``DIR/findings.json`` (the same verdicts, machine-readable) and the figures and
CSV tables it shows.

Layout of ``RUN_DIR``: the contract in :mod:`drop_upcycling.layout` (what the smoke recipe
writes; only ``runs/`` is required). :func:`discover` finds its parts through
:class:`~drop_upcycling.layout.ReproLayout`, the same names the smoke recipe writes with.

Findings (each ``reproduced`` is true, false, or null when the inputs to test it are missing):

- ``nu_starts_at_dense``: every NU run's first logged LM loss is within ``start_tol`` of the
  pre-trained dense model's loss on the same batch: ``checks/first_batch.json``'s ``dense-final`` for
  the run's seed, else the first logged LM loss of a dense reference run trained on the same batches
  (same seed, data, batch, world size in run.json). NU is function-preserving: they agree to rounding.
- ``fs_starts_worst``: FS's lowest first LM loss (over seeds) is above every other method's highest.
- ``du_ends_below_nu``: DU-0.5's highest final LM loss (over seeds) is below NU's lowest, i.e. the
  gap is beyond the seed spread (with one seed each: a plain comparison, said so).
- ``nu_routing_collapses``: NU's routing specialization (mean over layers of the mean pairwise L1
  distance between domains' expert distributions, :func:`drop_upcycling.routing.routing_metrics`)
  is below that of FS and of every DU model, beyond the spread across seeds.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import math
import platform
import subprocess
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from .configs import load_json
from .data_pipeline import sha256_file
from .errors import UserError
from .fsio import jsonable
from .layout import HELDOUT, METRICS, RECORDS, ROUTING_COUNTS, ReproLayout
from .methods import DENSE, lookup, order_methods
from .methods import rank as method_rank

log = logging.getLogger(__name__)

DEFAULT_START_TOL = 1e-3
# The metric shown per task in the README's eval table (the CSV keeps every metric).
PRIMARY_METRICS = ("acc", "acc_norm", "bits_per_byte", "word_perplexity", "exact_match", "f1", "bleu", "chrf")
REPORT_MARKERS = ("README.md", "findings.json")
SAME_BATCH_KEYS = ("seed", "data", "seq_len", "global_batch_tokens")


@dataclass
class Finding:
    id: str
    claim: str
    reproduced: bool | None
    detail: str
    evidence: dict = field(default_factory=dict)


# ============================================================================ reading the run directory
@dataclass
class RunDir:
    root: Path
    run_dirs: list[Path]
    pretrain: Path | None
    branches: list[Path]
    eval_csv: Path | None
    routing_csvs: list[Path]
    provenance: dict[str, object]
    config_files: list[Path]
    first_batch: dict | None


def discover(root: str | Path) -> RunDir:
    """Find the parts of the layout contract (:mod:`drop_upcycling.layout`) under ``root``."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"{root} is not a directory")
    at = ReproLayout(root)
    run_dirs = sorted(p for p in at.runs.iterdir() if p.is_dir() and not p.name.startswith(".")) \
        if at.runs.is_dir() else []
    if not run_dirs:
        raise UserError(f"{root} has no runs/<name>/ folders (metrics.jsonl + run.json of each training run)")
    pretrain_logs = sorted(at.pretrain.glob(METRICS)) or sorted(at.pretrain.glob(f"*/{METRICS}"))
    if len(pretrain_logs) > 1:
        raise UserError(f"{at.pretrain} holds several runs ({len(pretrain_logs)}); expected one dense pre-training")
    pretrain = pretrain_logs[0].parent if pretrain_logs else None
    branches = sorted(p.parent for p in at.branches.glob(f"*/{METRICS}"))
    eval_csv = at.eval_csv if at.eval_csv.is_file() else None
    routing = sorted(at.routing.glob(f"*/{ROUTING_COUNTS}")) + sorted(at.routing.glob("*.csv"))
    provenance = {name: load_json(root / name) for name in RECORDS if (root / name).is_file()}
    first_batch = read_first_batch(at.first_batch) if at.first_batch.is_file() else None
    configs = sorted([*root.glob("*.yaml"), *root.glob("*.yml"),
                      *(p for p in at.configs.rglob("*") if p.is_file())])
    return RunDir(root, run_dirs, pretrain, branches, eval_csv, routing, provenance, configs, first_batch)


def read_first_batch(path: Path) -> dict:
    """``checks/first_batch.json``, checked: ``{"losses": {"<seed>": {"dense-final": x, ...}}}`` with finite
    numbers. A malformed file is refused, never skipped: skipping it would silently test finding (a)
    against another reference (the dense run's first step) than the one recorded."""
    data = load_json(path)
    losses = data.get("losses") if isinstance(data, dict) else None
    if not isinstance(losses, dict) or not losses:
        raise UserError(f"{path}: expected {{\"losses\": {{\"<seed>\": {{\"dense-final\": loss, ...}}}}}}, "
                        f"got {_short(data)}")
    for seed, per_ckpt in losses.items():
        if not seed.lstrip("-").isdigit():
            raise UserError(f"{path}: losses key {seed!r} is not a seed (an integer)")
        if not isinstance(per_ckpt, dict) or "dense-final" not in per_ckpt:
            raise UserError(f"{path}: losses.{seed} must map checkpoint names (with dense-final) to losses, "
                            f"got {_short(per_ckpt)}")
        for name, value in per_ckpt.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise UserError(f"{path}: losses.{seed}.{name} must be a finite number, got {value!r}")
    return data


def _short(x: object, n: int = 60) -> str:
    text = json.dumps(x, default=str)
    return text if len(text) <= n else text[: n - 3] + "..."


# ============================================================================ findings
def _same_batch(a: dict, b: dict) -> list[str]:
    """run.json keys (of ``run`` and the world size) that differ between two runs' first batches."""
    ra, rb = a.get("run") or {}, b.get("run") or {}
    differ = [k for k in SAME_BATCH_KEYS if ra.get(k) != rb.get(k)]
    if a.get("world_size") != b.get("world_size"):
        differ.append("world_size")
    return differ


def _first_batch_loss(first_batch: dict | None, seed: int | None) -> float | None:
    """``dense-final`` of ``checks/first_batch.json`` (:func:`read_first_batch`) for ``seed``, when recorded."""
    if first_batch is None or str(seed) not in first_batch["losses"]:
        return None
    return float(first_batch["losses"][str(seed)]["dense-final"])


def finding_nu_starts_at_dense(runs: list, tol: float = DEFAULT_START_TOL, first_batch: dict | None = None) -> Finding:
    claim = "naive upcycling (NU) starts at the dense model's loss (first LM loss on the same batch)"
    nu = [r for r in runs if r.method == "NU"]
    dense = [r for r in runs if r.method == "dense"]
    if not nu or (not dense and first_batch is None):
        return Finding("nu_starts_at_dense", claim, None,
                       f"not tested: needs NU runs and the dense model's first-batch loss (checks/first_batch.json "
                       f"or a dense reference run; have {len(nu)} NU, {len(dense)} dense)")
    pairs, skipped = [], []
    for r in nu:
        nu_first = float(r.metrics["lm_loss"].iloc[0])
        recorded = _first_batch_loss(first_batch, r.seed)
        if recorded is not None:
            pairs.append({"nu_run": r.name, "dense": "checks/first_batch.json dense-final", "seed": r.seed,
                          "nu_first_lm_loss": nu_first, "dense_first_lm_loss": recorded,
                          "abs_diff": abs(nu_first - recorded)})
            continue
        match = next((d for d in dense if not _same_batch(r.info, d.info)), None)
        if match is None:
            skipped.append(f"{r.name} (differs from every dense run in "
                           f"{', '.join(sorted({k for d in dense for k in _same_batch(r.info, d.info)}))})")
            continue
        dense_first = float(match.metrics["lm_loss"].iloc[0])
        pairs.append({"nu_run": r.name, "dense": f"first logged step of {match.name}", "seed": r.seed,
                      "nu_first_lm_loss": nu_first, "dense_first_lm_loss": dense_first,
                      "abs_diff": abs(nu_first - dense_first)})
    evidence = {"tolerance": tol, "pairs": pairs, "skipped": skipped}
    if not pairs:
        return Finding("nu_starts_at_dense", claim, None,
                       "not tested: no dense run saw the same first batch as an NU run: " + "; ".join(skipped),
                       evidence)
    worst = max(p["abs_diff"] for p in pairs)
    ok = worst <= tol
    detail = (f"largest |NU - dense| first LM loss {worst:.2e} over {len(pairs)} seed(s) "
              f"{'<=' if ok else '>'} tolerance {tol:g} (e.g. NU {pairs[0]['nu_first_lm_loss']:.4f} vs dense "
              f"{pairs[0]['dense_first_lm_loss']:.4f}, from the {pairs[0]['dense']})")
    if skipped:
        detail += f"; {len(skipped)} NU run(s) without a same-batch dense run left out"
    return Finding("nu_starts_at_dense", claim, ok, detail, evidence)


def _stats(final: pd.DataFrame, method: str, col: str) -> dict:
    r = final[final["method"] == method].iloc[0]
    return {k: float(r[f"{col}_{k}"]) for k in ("mean", "std", "min", "max")} | {"n_seeds": int(r["n_seeds"])}


def finding_fs_starts_worst(final: pd.DataFrame) -> Finding:
    from .plotstyle import method_label

    claim = "from scratch (FS) starts worst (highest first LM loss)"
    methods = final["method"].tolist()
    others = [m for m in methods if m != "FS"]
    if "FS" not in methods or not others:
        return Finding("fs_starts_worst", claim, None, "not tested: needs FS and at least one other method")
    fs = _stats(final, "FS", "first_lm_loss")
    rest = {m: _stats(final, m, "first_lm_loss") for m in others}
    runner_up = max(rest, key=lambda m: rest[m]["max"])
    ok = fs["min"] > rest[runner_up]["max"]
    detail = (f"FS first LM loss {fs['mean']:.4f} (lowest seed {fs['min']:.4f}) "
              f"{'>' if ok else '<='} the highest of the others, {method_label(runner_up)} "
              f"{rest[runner_up]['max']:.4f}")
    return Finding("fs_starts_worst", claim, ok, detail, {"FS": fs, "others": rest})


def finding_du_ends_below_nu(final: pd.DataFrame) -> Finding:
    claim = "Drop-Upcycling r=0.5 (DU-0.5) ends below naive upcycling (NU) (final LM loss, beyond the seed spread)"
    methods = final["method"].tolist()
    if "DU-0.5" not in methods or "NU" not in methods:
        return Finding("du_ends_below_nu", claim, None, "not tested: needs DU-0.5 and NU runs")
    du, nu = _stats(final, "DU-0.5", "final_lm_loss"), _stats(final, "NU", "final_lm_loss")
    ok = du["max"] < nu["min"]
    single = du["n_seeds"] == 1 and nu["n_seeds"] == 1
    detail = (f"DU-0.5 final {du['mean']:.4f} ± {du['std']:.4f} (max {du['max']:.4f}, {du['n_seeds']} seed(s)) vs "
              f"NU {nu['mean']:.4f} ± {nu['std']:.4f} (min {nu['min']:.4f}, {nu['n_seeds']} seed(s)): "
              + ("every DU-0.5 seed ends below every NU seed" if ok else "not below beyond the spread"
                 if du["mean"] < nu["mean"] else "DU-0.5 does not end below NU"))
    if single:
        detail += " (one seed each: no spread measured)"
    return Finding("du_ends_below_nu", claim, ok, detail, {"DU-0.5": du, "NU": nu, "single_seed": single})


def finding_du_ends_below_nu_heldout(study: dict) -> Finding:
    """The same claim on held-out loss with paired seeds: DU-0.5 - NU at the end, by seed, and its 95%
    t-interval; reproduced when the whole interval is below 0 (the study plan's rule)."""
    claim = ("Drop-Upcycling r=0.5 (DU-0.5) ends below naive upcycling (NU) (final held-out loss, paired seeds, "
             "95% interval below 0)")
    gap = study["du_vs_nu"].get("final_gap")
    if not gap:
        return Finding("du_ends_below_nu", claim, None, "not tested: needs paired DU-0.5 and NU held-out logs")
    if gap["low"] is None:
        ok = None
        detail = f"DU-0.5 - NU {gap['mean']:+.4f} with one seed: no interval, not tested"
    else:
        ok = gap["high"] < 0
        detail = (f"DU-0.5 - NU at the end {gap['mean']:+.4f}, 95% t-interval [{gap['low']:+.4f}, {gap['high']:+.4f}] "
                  f"over {gap['n']} paired seeds: " + ("below 0" if ok else "above 0" if gap["low"] > 0
                                                        else "includes 0"))
    return Finding("du_ends_below_nu", claim, ok, detail, {"final_gap": gap})


def finding_nu_routing_collapses(metrics: pd.DataFrame | None) -> Finding:
    from .plotstyle import method_key

    claim = "naive upcycling (NU) routing collapses while FS and DU specialize (routing specialization)"
    if metrics is None or metrics.empty:
        return Finding("nu_routing_collapses", claim, None, "not tested: no routing counts")
    per_model = metrics.groupby("model").agg(specialization=("specialization", "mean"),
                                             entropy=("entropy", "mean")).reset_index()
    per_model["method"] = per_model["model"].map(method_key)
    specs = {m: sorted(g["specialization"].tolist()) for m, g in per_model.groupby("method")}
    others = {m: v for m, v in specs.items() if m == "FS" or m.startswith("DU-")}
    if "NU" not in specs or not others:
        return Finding("nu_routing_collapses", claim, None,
                       f"not tested: needs NU and FS or DU routing counts (have {', '.join(sorted(specs))})")
    nu_max = max(specs["NU"])
    lowest = min(others, key=lambda m: min(others[m]))
    ok = all(nu_max < min(v) for v in others.values())
    detail = (f"mean specialization NU {np.mean(specs['NU']):.3f} (max {nu_max:.3f}) "
              f"{'<' if ok else '>='} the lowest of FS/DU, {lowest} {min(others[lowest]):.3f}; "
              + ", ".join(f"{m} {np.mean(v):.3f}" for m, v in others.items()))
    evidence = {"specialization": specs,
                "entropy_bits": {r.model: float(r.entropy) for r in per_model.itertuples()}}
    return Finding("nu_routing_collapses", claim, ok, detail, evidence)


def findings(runs: list, final: pd.DataFrame, routing_metrics: pd.DataFrame | None,
             start_tol: float = DEFAULT_START_TOL, first_batch: dict | None = None,
             study: dict | None = None) -> list[Finding]:
    """The four verdicts, in the paper's order. With held-out logs (``study``: the CPU study's analysis)
    "DU-0.5 ends below NU" is judged on held-out loss with paired seeds instead of training loss."""
    du_nu = finding_du_ends_below_nu_heldout(study) if study else finding_du_ends_below_nu(final)
    return [finding_nu_starts_at_dense(runs, start_tol, first_batch), finding_fs_starts_worst(final),
            du_nu, finding_nu_routing_collapses(routing_metrics)]


# ============================================================================ tables
def eval_tables(path: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(every metric pivoted checkpoint x task/metric, one primary metric per task for the README)."""
    from .plotstyle import method_key, method_label

    try:
        df = pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not a readable CSV: {e}") from None
    missing = [c for c in ("checkpoint", "task", "metric", "value") if c not in df.columns]
    if missing:
        raise UserError(f"{path} lacks column(s) {', '.join(missing)}")
    if df.empty:
        raise UserError(f"{path} has no rows")
    df["column"] = df["task"].astype(str) + " " + df["metric"].astype(str)
    full = df.pivot_table(index="checkpoint", columns="column", values="value", aggfunc="first").reset_index()
    rank = {m: i for i, m in enumerate(PRIMARY_METRICS)}
    chosen = (df.assign(r=df["metric"].map(lambda m: rank.get(m, len(rank))))
              .sort_values(["task", "r", "metric"]).groupby("task").head(1)[["task", "metric"]])
    primary = df.merge(chosen, on=["task", "metric"])
    primary = primary.assign(column=primary["task"].astype(str) + " (" + primary["metric"].astype(str) + ")")
    short = primary.pivot_table(index="checkpoint", columns="column", values="value", aggfunc="first")
    short.insert(0, "method", [method_label(c.split("__")[0]) for c in short.index])
    order = sorted(short.index, key=lambda c: (method_rank(method_key(c.split("__")[0])), c))
    return full, short.loc[order].reset_index()


def routing_summary(metrics: pd.DataFrame) -> pd.DataFrame:
    """Per model: mean entropy and specialization over layers, unused experts in the last layer."""
    from .plotstyle import method_key, method_label

    rows = []
    for model in sorted(metrics["model"].unique(), key=lambda m: (method_rank(method_key(m)), m)):
        g = metrics[metrics["model"] == model].sort_values("layer")
        rows.append({"model": model, "method": method_label(model), "layers": len(g),
                     "entropy (bits)": float(g["entropy"].mean()),
                     "specialization": float(g["specialization"].mean()),
                     "unused experts (last layer)": int(g["unused_experts"].iloc[-1]),
                     "unused experts (all layers)": " ".join(map(str, g["unused_experts"]))})
    return pd.DataFrame(rows)


def flops_rows(runs: list, pretrain, branches: list | None = None) -> list[dict]:
    """Per method: parameters, FLOPs per token and total training FLOPs, rows shaped like
    :func:`drop_upcycling.flops.plan_table` so :func:`drop_upcycling.flops.plot_plan` draws them.

    Seed cost = the dense pre-training for every upcycled method and for the dense reference (none
    for a method that does not start from the dense seed, FS), plus for a method built from the seed's
    domain branches (BTX) their training (``btx_branches/``): the ``from_dense`` and ``branches``
    columns of the method table."""
    from .configs import ModelConfig
    from .flops import flops_row, human_count

    def row_of(run, method: str, seed: dict[str, float]) -> dict:
        info = run.info
        cfg = ModelConfig.from_hf_dict(info["model"], name=run.name)
        fr = flops_row(cfg, (info.get("run") or {}).get("seq_len") or None)
        tokens = float(run.metrics["tokens"].iloc[-1])
        out = {"model": f"{human_count(fr['total_params'])} params", "method": method, "run": run.name,
               "total_params": fr["total_params"], "active_params": fr["active_params"],
               "flops_per_token_6n": fr["flops_per_token_6n"], "flops_per_token_full": fr["flops_per_token_full"],
               "seed_tokens": seed["tokens"], "tokens": tokens}
        for kind in ("6n", "full"):
            out[f"seed_flops_{kind}"] = seed[kind]
            out[f"train_flops_{kind}"] = fr[f"flops_per_token_{kind}"] * tokens
            out[f"total_flops_{kind}"] = seed[kind] + out[f"train_flops_{kind}"]
        return out

    def cost(run_rows: list[dict]) -> dict[str, float]:
        return {k: sum(r[src] for r in run_rows) for k, src in (("tokens", "tokens"), ("6n", "train_flops_6n"),
                                                                 ("full", "train_flops_full"))}

    none = {"tokens": 0.0, "6n": 0.0, "full": 0.0}
    has_model = [r for r in runs if isinstance(r.info.get("model"), dict)]
    rows, pre_cost = [], none
    if pretrain is not None and isinstance(pretrain.info.get("model"), dict):
        pre = row_of(pretrain, "dense", none)
        pre["model"] = "pre-training"
        rows.append(pre)
        pre_cost = cost([pre])
    branch_rows = [row_of(b, "dense", none) for b in branches or [] if isinstance(b.info.get("model"), dict)]
    btx_cost = cost(branch_rows) if branch_rows else none
    by_method = {}
    for r in has_model:
        by_method.setdefault(r.method, r)
    methods = [m for m in order_methods(list(by_method)) if m != DENSE] + ([DENSE] if DENSE in by_method else [])
    for method in methods:
        row_m = lookup(method)
        seed = none if row_m is not None and not row_m.from_dense else pre_cost
        if row_m is not None and row_m.branches:
            seed = {k: pre_cost[k] + btx_cost[k] for k in seed}
        row = row_of(by_method[method], method, seed)
        if method == DENSE:
            row["model"] = "reference"
        rows.append(row)
    return rows


# ============================================================================ provenance
def _display_path(path: Path) -> str:
    """The run dir relative to the working directory when inside it: reports carry no machine paths."""
    resolved = path.resolve()
    try:
        return resolved.relative_to(Path.cwd().resolve()).as_posix()
    except ValueError:
        return str(resolved)


def _git_commit() -> dict:
    """The commit of the source tree this package runs from (with a dirty flag), when it is a git checkout."""
    src = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "-C", str(src), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(src), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return {"commit": "unknown (not a git checkout)"}
    return {"commit": commit, "dirty": bool(dirty)}


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in ("drop-upcycling", "torch", "transformers", "tokenizers", "lm_eval", "datatrove", "nanotron",
                "numpy", "pandas", "matplotlib"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            continue
    return out


def runs_provenance(runs: list) -> pd.DataFrame:
    rows = []
    for r in runs:
        run, model = r.info.get("run") or {}, r.info.get("model") or {}
        rows.append({"run": r.name, "method": r.method, "seed": r.seed, "steps": int(r.metrics["step"].iloc[-1]),
                     "tokens": int(r.metrics["tokens"].iloc[-1]), "seq_len": run.get("seq_len"),
                     "batch tokens": run.get("global_batch_tokens"), "lr": run.get("lr"),
                     "init": Path(run["init"]).name if run.get("init") else "random",
                     "layers": model.get("num_hidden_layers"), "hidden": model.get("hidden_size"),
                     "experts": model.get("num_local_experts", 0) if model.get("model_type") == "mixtral" else 0,
                     "world size": r.info.get("world_size"), "ep": r.info.get("ep"),
                     "torch": (r.info.get("versions") or {}).get("torch")})
    return pd.DataFrame(rows)


# ============================================================================ the report
def write_report(run_dir: str | Path, out_dir: str | Path, window: int | None = None, last: int | None = None,
                 start_tol: float = DEFAULT_START_TOL, formats: str | None = None) -> dict:
    """Build the whole report into a temp dir and move it to ``out_dir``. Returns findings and paths."""
    from .checkpoint import atomic_dir, write_json

    if start_tol <= 0:
        raise UserError(f"start tolerance must be > 0, got {start_tol}")
    rd = discover(run_dir)
    out_dir = Path(out_dir)
    previous = all((out_dir / m).is_file() for m in REPORT_MARKERS)
    if out_dir.exists() and not previous and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise UserError(f"{out_dir} exists and is not a previous report: choose another --out")
    with atomic_dir(out_dir, overwrite=True) as tmp:
        result = _build(rd, tmp, window, last, start_tol, formats)
        write_json(tmp / "findings.json", result["json"])
        (tmp / "README.md").write_text(result["readme"])
    log.info("report written to %s", out_dir)
    return {"findings": result["findings"], "readme": out_dir / "README.md", "findings_json": out_dir / "findings.json"}


@dataclass
class Analyses:
    """What the analyses of one run folder produced (their figures and CSVs are already written)."""

    curves: dict  # drop_upcycling.curves.analyze_curves' result: curves, final, crossovers
    runs: list  # the compared runs (curves.Run), every seed
    pretrain: object | None  # the dense pre-training run (curves.Run), when the folder has one
    routing: pd.DataFrame | None  # per-layer routing metrics of every model
    evals: pd.DataFrame | None  # one primary metric per task and checkpoint
    flops: list[dict]  # flops_rows
    routing_text: list[str] = field(default_factory=list)  # what text the routing counts came from
    study: dict | None = None  # drop_upcycling.study's result, when the runs logged held-out loss


def _build(rd: RunDir, out: Path, window: int | None, last: int | None, start_tol: float, formats) -> dict:
    """The report's content, into ``out``: figures and CSVs, then the verdicts and the README text.

    Three steps, in this order because each feeds the next: the analyses (:func:`_analyze`: loss
    curves, routing, eval scores, FLOPs; each writes its figure and CSV under ``out`` and keeps its
    table, or None when the run folder lacks its input); the findings, computed from those tables
    alone, never re-read from disk; then the README, one function per section (``_section_*``, in
    reading order), each of which says so when its input is missing instead of leaving the section
    out. Returns the findings, the findings.json payload and the README text.
    """
    a = _analyze(rd, out, window, last, formats)
    found = findings(a.runs, a.curves["final"], a.routing, start_tol, rd.first_batch, a.study)
    provenance = _provenance(rd)
    runs_df = runs_provenance(a.runs + ([a.pretrain] if a.pretrain else []))
    crossovers = a.curves["crossovers"]
    payload = {"findings": [asdict(f) for f in found],
               "final_losses": a.curves["final"].to_dict(orient="records"),
               "crossovers": crossovers.astype(object).where(crossovers.notna(), None).to_dict(orient="records"),
               "runs": runs_df.to_dict(orient="records"), "provenance": provenance}
    if a.study:
        payload |= {"regime": a.study["regime"], "du_vs_nu": a.study["du_vs_nu"],
                    "final_heldout_loss": a.study["final_heldout_loss"], "throughput": a.study["throughput"]}
    lines = [*_section_findings(rd, provenance, found), *_section_study(a.study), *_section_curves(a.curves),
             *_section_eval(a.evals),
             *_section_routing(a.routing, a.routing_text), *_section_compute(a.flops),
             *_section_provenance(provenance, rd.provenance, runs_df)]
    return {"findings": found, "json": jsonable(payload), "readme": "\n".join(lines)}


def _analyze(rd: RunDir, out: Path, window: int | None, last: int | None, formats) -> Analyses:
    """Every analysis the run folder has the inputs for, each writing its figure and CSV under ``out``."""
    from .curves import analyze_curves, read_run
    from .flops import plot_plan
    from .plotstyle import save_figure
    from .routing import analyze_routing, routing_metrics
    from .routing_csv import read_counts

    curves = analyze_curves(rd.run_dirs, out / "curves", window=window, last=last, formats=formats)
    runs = [r for c in curves["curves"].values() for r in c.runs]
    pretrain = read_run(rd.pretrain) if rd.pretrain else None
    if pretrain is not None:
        pretrain.name = rd.pretrain.relative_to(rd.root).as_posix()  # "pretrain/dense", not a run of the comparison

    rmetrics = None
    if rd.routing_csvs:
        counts = read_counts(rd.routing_csvs)
        analyze_routing(rd.routing_csvs, out / "routing", models=_one_model_per_method(counts["model"]),
                        formats=formats)
        rmetrics = routing_metrics(counts)
    evals = None
    if rd.eval_csv:
        full, short = eval_tables(rd.eval_csv)
        full.to_csv(out / "eval_scores.csv", index=False, float_format="%.6g")
        evals = short
    frows = flops_rows(runs, pretrain, [read_run(b) for b in rd.branches])
    if frows:
        pd.DataFrame(frows).to_csv(out / "flops.csv", index=False, float_format="%.6g")
        save_figure(plot_plan(frows, "full"), out, "flops", formats)
    study = None
    if any((p / HELDOUT).is_file() for p in rd.run_dirs):
        from .study import analyze_study

        study = analyze_study(rd.root, out / "study", formats=formats)
    return Analyses(curves, runs, pretrain, rmetrics, evals, frows, routing_text_sources(rd.routing_csvs), study)


def _provenance(rd: RunDir) -> dict:
    """When, from what (run dir, git commit, package versions, config hashes) and what the recipe recorded."""
    return {"generated": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "run_dir": _display_path(rd.root), "git": _git_commit(), "versions": _versions(),
            "config_files": {str(p.relative_to(rd.root)): sha256_file(p) for p in rd.config_files},
            "recipe": rd.provenance}


VERDICT = {True: "**reproduced**", False: "**not reproduced**", None: "not tested"}


def _section_findings(rd: RunDir, provenance: dict, found: list[Finding]) -> list[str]:
    from .curves import markdown_table

    return [f"# Reproduction report: `{rd.root.resolve().name}`", "",
            f"Generated by `drop-upcycling report` on {provenance['generated']} from `{provenance['run_dir']}`. "
            "Every number below is computed from the run's logs; `findings.json` holds the same verdicts.", "",
            "## The paper's findings in this run", "",
            markdown_table(pd.DataFrame({"finding": [f.claim for f in found],
                                         "verdict": [VERDICT[f.reproduced] for f in found],
                                         "evidence": [f.detail for f in found]})), "",
            "A finding counts as reproduced only when it holds beyond the spread across seeds.", ""]


def _section_study(study: dict | None) -> list[str]:
    """The held-out comparison (only for runs that logged held-out loss)."""
    if not study:
        return []
    from .study import summary_markdown

    return [summary_markdown(study), "The study's regime and analysis were fixed before it ran: "
            "`reports/study_plan.md` in the repository. Held-out numbers: `study/study.json`; "
            "per-evaluation losses: `study/heldout_losses.csv`.", ""]


def _section_curves(curves: dict) -> list[str]:
    from .curves import crossover_markdown, final_markdown

    return ["## Loss curves", "", "![LM loss against tokens and training FLOPs](curves/loss_curves.png)", "",
            "LM loss is the next-token cross-entropy without the auxiliary (load-balancing, z) losses. "
            "Final loss: mean of the last logged steps (window in `curves/final_losses_runs.csv`), "
            "mean ± std (min–max) over seeds.", "",
            final_markdown(curves["final"]), "",
            "Crossovers: the token count from which the row's method (A) stays below the column's (B) "
            "until the end of the run (mean smoothed curves; `curves/crossovers.csv` also has the "
            "beyond-the-spread version).", "",
            crossover_markdown(curves["crossovers"]), ""]


def _section_eval(evals: pd.DataFrame | None) -> list[str]:
    from .curves import markdown_table

    if evals is None:
        return ["## Evaluation", "", "No `eval/results.csv` in the run directory.", ""]
    return ["## Evaluation", "", "One metric per task (every metric: `eval_scores.csv`).", "", markdown_table(evals), ""]


def routing_text_sources(csvs: list[Path]) -> list[str]:
    """The ``source`` each ``routing_counts.json`` beside the CSVs records (routing texts or a test split)."""
    sources = []
    for csv in csvs:
        meta = csv.with_suffix(".json")
        if meta.is_file():
            source = load_json(meta).get("source")
            if source and source not in sources:
                sources.append(source)
    return sources


def _section_routing(rmetrics: pd.DataFrame | None, text: list[str]) -> list[str]:
    from .curves import markdown_table

    if rmetrics is None:
        return ["## Routing", "", "No routing counts in the run directory.", ""]
    counted = f"Text counted: {'; '.join(text)}." if text else "The text counted is not recorded."
    return ["## Routing", "", "![Expert shares per domain (Figure 5 layout)](routing/routing_fig5.png)", "",
            counted, "",
            "The figure shows the first seed of each method; the table below has every model.", "",
            "Specialization: mean pairwise L1 distance between the domains' expert distributions "
            "(0 = every domain routed alike, 2 = disjoint experts); entropy of the pooled distribution "
            "in bits. Per layer: `routing/routing_metrics.csv`.", "",
            markdown_table(routing_summary(rmetrics), ".3f"), ""]


def _section_compute(frows: list[dict]) -> list[str]:
    from .curves import markdown_table
    from .plotstyle import method_label

    if not frows:
        return ["## Training compute", "", "No model configs in run.json: FLOPs unknown.", ""]
    table = pd.DataFrame([{"run": f"{r['model']}: {method_label(r['method'])}",
                           "total params": r["total_params"], "active params": r["active_params"],
                           "FLOPs/token (full)": f"{r['flops_per_token_full']:.3e}",
                           "tokens": int(r["tokens"]), "seed FLOPs": f"{r['seed_flops_full']:.3e}",
                           "training FLOPs": f"{r['train_flops_full']:.3e}",
                           "total FLOPs": f"{r['total_flops_full']:.3e}"} for r in frows])
    return ["## Training compute", "", "![Training compute per method](flops.png)", "",
            "Full count (attention, router, experts, LM head; backward = 2 x forward). Seed = the dense "
            "pre-training, charged to every upcycled method and to the dense reference, not to FS; BTX's also "
            "includes its domain branches. "
            "6N figures: `flops.csv`.", "", markdown_table(table), ""]


def _section_provenance(provenance: dict, recorded: dict[str, object], runs_df: pd.DataFrame) -> list[str]:
    from .curves import markdown_table

    lines = ["## Provenance", "",
             f"- git commit: `{provenance['git'].get('commit')}`"
             + (" (uncommitted changes)" if provenance["git"].get("dirty") else ""),
             "- versions: " + ", ".join(f"{k} {v}" for k, v in provenance["versions"].items()),
             *(f"- config `{k}`: sha256 `{v[:16]}…`" for k, v in provenance["config_files"].items()), ""]
    for name, content in recorded.items():
        lines += [f"<details><summary>Recorded by the recipe (<code>{name}</code>)</summary>", "", "```json",
                  json.dumps(content, indent=2, default=str), "```", "", "</details>", ""]
    return [*lines, "Runs (seed, budget, model shape; the full configs are in each run's `run.json`):", "",
            markdown_table(runs_df, ".3g"), ""]


def _one_model_per_method(models: pd.Series) -> list[str]:
    """The figure's columns: the first model (by name, so seed 0) of each method, in the paper's order;
    the metrics keep every model."""
    from .plotstyle import method_key

    first: dict[str, str] = {}
    for m in sorted(set(models)):
        first.setdefault(method_key(m), m)
    return [first[k] for k in order_methods(list(first))]


# ============================================================================ CLI
def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", type=Path, metavar="RUN_DIR",
                        help="a reproduction run: runs/<name>/{metrics.jsonl,run.json} [+ pretrain/, eval/results.csv, "
                             "routing/<name>/routing_counts.csv, provenance.json]")
    parser.add_argument("--out", required=True, type=Path,
                        help="report directory (README.md, findings.json, figures, tables); a previous report there "
                             "is replaced")
    parser.add_argument("--smooth", type=int, metavar="N", help="loss-curve moving average (default: 5%% of the steps)")
    parser.add_argument("--last", type=int, metavar="K", help="final loss = mean of the last K steps (default 5%%)")
    parser.add_argument("--start-tol", type=float, default=DEFAULT_START_TOL,
                        help=f"NU vs dense first-loss tolerance (default {DEFAULT_START_TOL:g})")
    parser.add_argument("--formats", default="png", help="figure formats (PNG always, for the README): png, svg, pdf")


def run(args: argparse.Namespace) -> int:
    from .plotstyle import parse_formats

    formats = ["png", *[f for f in parse_formats(args.formats) if f != "png"]]
    res = write_report(args.run_dir, args.out, args.smooth, args.last, args.start_tol, formats)
    for f in res["findings"]:
        mark = {True: "REPRODUCED", False: "NOT REPRODUCED", None: "not tested"}[f.reproduced]
        print(f"{mark:<15} {f.claim}\n{'':<15} {f.detail}")
    print(f"wrote {res['readme']} and {res['findings_json']}")
    return 0
