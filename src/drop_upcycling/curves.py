"""Loss curves of training runs: LM loss against tokens and training FLOPs, final losses, crossovers.

Reads only files a run leaves behind (never the trainer): ``RUN/metrics.jsonl`` (one JSON object per
optimizer step with at least ``step``, ``tokens`` and ``lm_loss``) and ``RUN/run.json`` (``seed``,
``run.method``, ``run.seq_len`` and the model's HF ``config.json`` dict under ``model``).

- The plotted and tabulated loss is ``lm_loss``, the next-token cross-entropy, never ``loss``
  (which adds the load-balancing and z losses and so differs between dense and MoE runs).
- Smoothing is a trailing moving average over the last ``smooth`` logged steps (``min_periods=1``):
  causal, so a smoothed value only uses the past and a crossover is never announced early by
  looking ahead.
- Training FLOPs of a run = tokens x :func:`drop_upcycling.flops.training_flops_per_token` of its
  model at its sequence length; the dense seed's pre-training is not included (see the report's
  FLOPs table for totals with it).
- Runs with the same method and different seeds are aggregated: the smoothed curves are
  interpolated onto the first run's token grid (clipped to the range all share), then averaged;
  the band is min-max (or mean +- std) across seeds.
- Final loss of a run = mean raw ``lm_loss`` over its last ``last`` logged steps.
- Crossover of an ordered pair (A, B) = the first token count from which A's mean smoothed loss is
  below B's at every later logged point ("never" when A does not end below B);
  ``crossover_beyond_spread_tokens`` asks the same of A's upper band edge against B's lower one.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from .configs import load_json
from .errors import UserError
from .fsio import write_text
from .layout import METRICS, RUN_JSON
from .methods import order_methods  # the paper's order for tables and legends, from the method table

log = logging.getLogger(__name__)

REQUIRED_KEYS = ("step", "tokens", "lm_loss")


# ============================================================================ reading runs
@dataclass
class Run:
    """One training run: its per-step metrics and what run.json says about it."""

    path: Path
    name: str
    method: str
    seed: int | None
    flops_per_token: float | None
    metrics: pd.DataFrame  # step, tokens, lm_loss, loss (float), flops
    info: dict = field(default_factory=dict)  # run.json as read


def read_metrics(path: str | Path) -> pd.DataFrame:
    """``metrics.jsonl`` -> DataFrame with ``step, tokens, lm_loss`` (+ ``loss`` when logged).

    Any problem (missing, empty, a line that is not JSON or lacks a key, steps not increasing) is one
    :class:`UserError` naming the file and line.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path} does not exist (expected the metrics.jsonl of a training run)")
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{n} is not valid JSON ({e.msg})") from None
            if not isinstance(rec, dict):
                raise UserError(f"{path}:{n} is not a JSON object")
            missing = [k for k in REQUIRED_KEYS if k not in rec]
            if missing:
                raise UserError(f"{path}:{n} lacks {', '.join(missing)}")
            try:
                rows.append({"step": int(rec["step"]), "tokens": float(rec["tokens"]),
                             "lm_loss": float(rec["lm_loss"]),
                             "loss": float(rec["loss"]) if rec.get("loss") is not None else math.nan})
            except (TypeError, ValueError):
                raise UserError(f"{path}:{n}: step, tokens and lm_loss must be numbers") from None
    if not rows:
        raise UserError(f"{path} holds no metrics (empty file: did the run log any step?)")
    df = pd.DataFrame(rows)
    if not (np.diff(df["step"].to_numpy()) > 0).all() or not (np.diff(df["tokens"].to_numpy()) > 0).all():
        raise UserError(f"{path}: step and tokens must increase line by line (two runs appended to one file?)")
    return df


def read_run(path: str | Path) -> Run:
    """A run directory (``metrics.jsonl`` + ``run.json``) -> :class:`Run`.

    The method comes from ``run.json``'s ``run.method``, else from the folder name
    (:func:`drop_upcycling.methods.method_key`); FLOPs per token from its model config.
    """
    from .configs import ModelConfig
    from .flops import training_flops_per_token
    from .methods import method_key

    path = Path(path)
    if not path.is_dir():
        raise UserError(f"{path} is not a run directory")
    metrics = read_metrics(path / METRICS)
    info_path = path / RUN_JSON
    if not info_path.is_file():
        raise UserError(f"{path} has no run.json (written by drop-upcycling train)")
    info = load_json(info_path)
    if not isinstance(info, dict):
        raise UserError(f"{info_path} is not a JSON object")
    run_cfg = info.get("run") or {}
    method = method_key(str(run_cfg.get("method") or path.resolve().name))
    flops = None
    if isinstance(info.get("model"), dict):
        cfg = ModelConfig.from_hf_dict(info["model"], name=path.name)
        flops = training_flops_per_token(cfg, run_cfg.get("seq_len") or None)
    else:
        log.warning("%s: run.json has no model config; the FLOPs axis leaves this run out", path)
    metrics["flops"] = metrics["tokens"] * flops if flops else math.nan
    seed = info.get("seed", run_cfg.get("seed"))
    return Run(path=path, name=path.resolve().name, method=method, seed=None if seed is None else int(seed),
               flops_per_token=flops, metrics=metrics, info=info)


def read_runs(paths: Sequence[str | Path], dense: str | Path | None = None) -> list[Run]:
    """Read several runs; ``dense`` (optional) is a dense reference run, its method forced to ``dense``."""
    if not paths and dense is None:
        raise UserError("no run directories given")
    runs = [read_run(p) for p in paths]
    if dense is not None:
        ref = read_run(dense)
        ref.method = "dense"
        runs.append(ref)
    seen: dict[tuple[str, int | None], str] = {}
    for r in runs:
        key = (r.method, r.seed)
        if key in seen and r.seed is not None:
            raise UserError(f"runs {seen[key]} and {r.path} have the same method {r.method} and seed {r.seed}")
        seen[key] = str(r.path)
    return runs


# ============================================================================ numbers
def smooth(values: np.ndarray | pd.Series, window: int) -> np.ndarray:
    """Trailing moving average over the last ``window`` points (fewer at the start)."""
    if window < 1:
        raise UserError(f"smoothing window must be >= 1, got {window}")
    return pd.Series(np.asarray(values, dtype=np.float64)).rolling(window, min_periods=1).mean().to_numpy()


def auto_window(n_points: int) -> int:
    """Default smoothing: 5% of the logged steps, at least 1."""
    return max(1, n_points // 20)


def auto_last(n_points: int) -> int:
    """Default final-loss window: the last 5% of the logged steps, at least 1."""
    return max(1, n_points // 20)


@dataclass
class MethodCurve:
    """A method's seeds on one token grid: mean, band and per-seed smoothed and raw curves."""

    method: str
    runs: list[Run]
    tokens: np.ndarray
    flops: np.ndarray
    smoothed_ST: np.ndarray  # [seeds, points]

    @property
    def mean(self) -> np.ndarray:
        return self.smoothed_ST.mean(axis=0)

    def band(self, kind: str = "minmax") -> tuple[np.ndarray, np.ndarray]:
        if kind == "std":
            std = self.smoothed_ST.std(axis=0, ddof=1) if len(self.runs) > 1 else np.zeros_like(self.mean)
            return self.mean - std, self.mean + std
        return self.smoothed_ST.min(axis=0), self.smoothed_ST.max(axis=0)


def method_curves(runs: Sequence[Run], window: int | None = None) -> dict[str, MethodCurve]:
    """Group runs by method and put each group's smoothed LM loss on one token grid."""
    groups: dict[str, list[Run]] = {}
    for r in runs:
        groups.setdefault(r.method, []).append(r)
    out = {}
    for method in order_methods(list(groups)):
        members = sorted(groups[method], key=lambda r: (r.seed is None, r.seed, r.name))
        lo = max(float(r.metrics["tokens"].iloc[0]) for r in members)
        hi = min(float(r.metrics["tokens"].iloc[-1]) for r in members)
        if lo > hi:
            raise UserError(f"the {method} runs cover disjoint token ranges; cannot average their seeds")
        grid = members[0].metrics["tokens"].to_numpy()
        grid = grid[(grid >= lo) & (grid <= hi)]
        rows = []
        for r in members:
            w = window or auto_window(len(r.metrics))
            rows.append(np.interp(grid, r.metrics["tokens"].to_numpy(), smooth(r.metrics["lm_loss"], w)))
        fpt = members[0].flops_per_token
        out[method] = MethodCurve(method, members, grid, grid * fpt if fpt else np.full(len(grid), np.nan),
                                  np.vstack(rows))
    return out


def run_table(runs: Sequence[Run], last: int | None = None) -> pd.DataFrame:
    """One row per run: first and final LM loss (mean of the last ``last`` steps), tokens and FLOPs."""
    rows = []
    for r in runs:
        m = r.metrics
        k = min(last or auto_last(len(m)), len(m))
        rows.append({"run": r.name, "method": r.method, "seed": r.seed, "steps": int(m["step"].iloc[-1]),
                     "tokens": float(m["tokens"].iloc[-1]), "flops_per_token": r.flops_per_token,
                     "training_flops": float(m["flops"].iloc[-1]), "first_lm_loss": float(m["lm_loss"].iloc[0]),
                     "final_lm_loss": float(m["lm_loss"].iloc[-k:].mean()), "final_window": k})
    df = pd.DataFrame(rows)
    rank = {m: i for i, m in enumerate(order_methods(df["method"].tolist()))}
    return df.sort_values(["method", "seed"], key=lambda s: s.map(rank) if s.name == "method" else s,
                          kind="stable").reset_index(drop=True)


def final_table(runs_df: pd.DataFrame) -> pd.DataFrame:
    """Per method across seeds: ``n_seeds``, mean / std (ddof=1; 0 for one seed) / min / max of the
    final and of the first LM loss, and the spread (max - min) of the final loss."""
    from .plotstyle import method_label

    rows = []
    for method in order_methods(runs_df["method"].tolist()):
        g = runs_df[runs_df["method"] == method]
        row = {"method": method, "label": method_label(method), "n_seeds": len(g),
               "seeds": " ".join(str(s) for s in g["seed"].tolist()), "tokens": float(g["tokens"].max())}
        for col in ("final_lm_loss", "first_lm_loss"):
            v = g[col].to_numpy(dtype=np.float64)
            row.update({f"{col}_mean": float(v.mean()), f"{col}_std": float(v.std(ddof=1)) if len(v) > 1 else 0.0,
                        f"{col}_min": float(v.min()), f"{col}_max": float(v.max())})
        row["final_lm_loss_spread"] = row["final_lm_loss_max"] - row["final_lm_loss_min"]
        rows.append(row)
    return pd.DataFrame(rows)


def first_stays_below(tokens: np.ndarray, a: np.ndarray, b: np.ndarray) -> float | None:
    """The first token count from which ``a < b`` at every later point; None when ``a`` does not end below."""
    below = np.asarray(a) < np.asarray(b)
    if len(below) == 0 or not below[-1]:
        return None
    above = np.flatnonzero(~below)
    i = 0 if len(above) == 0 else int(above[-1]) + 1
    return float(tokens[i])


def crossover_table(curves: dict[str, MethodCurve], band: str = "minmax") -> pd.DataFrame:
    """For each ordered pair (A, B): when A's mean smoothed loss starts staying below B's (tokens, or
    empty for "never"), and the same for A's upper band edge against B's lower one (beyond the spread).
    Curves are compared on A's token grid, B interpolated, over the range both cover."""
    rows = []
    for a, b in ((a, b) for a in curves for b in curves if a != b):
        ca, cb = curves[a], curves[b]
        keep = (ca.tokens >= cb.tokens[0]) & (ca.tokens <= cb.tokens[-1])
        t = ca.tokens[keep]
        if len(t) == 0:
            rows.append({"a": a, "b": b, "crossover_tokens": None, "crossover_beyond_spread_tokens": None,
                         "note": "no common token range"})
            continue
        b_mean = np.interp(t, cb.tokens, cb.mean)
        a_hi = ca.band(band)[1][keep]
        b_lo = np.interp(t, cb.tokens, cb.band(band)[0])
        cross = first_stays_below(t, ca.mean[keep], b_mean)
        beyond = first_stays_below(t, a_hi, b_lo)
        note = "never" if cross is None else ("from the start" if cross == t[0] else "")
        rows.append({"a": a, "b": b, "crossover_tokens": cross, "crossover_beyond_spread_tokens": beyond,
                     "note": note})
    return pd.DataFrame(rows, columns=["a", "b", "crossover_tokens", "crossover_beyond_spread_tokens", "note"])


# ============================================================================ figure
def plot_curves(curves: dict[str, MethodCurve], band: str = "minmax", window: int | None = None):
    """Two panels sharing the y axis: LM loss against training tokens and against training FLOPs.

    Thin transparent lines are the raw per-step losses of every seed; the thick line is the mean of
    the smoothed curves; the shaded band spans the seeds (when there are several). The dense run is
    the black dashed reference. The y axis starts a little below the lowest loss and is cut above
    the highest loss seen after the first 10% of tokens, so that the early spike of from-scratch
    training does not flatten the rest (only when a start lies over half that range above it; the cut
    is written on the axis).
    """
    import matplotlib.pyplot as plt
    from matplotlib.ticker import EngFormatter

    from .plotstyle import apply_style, method_style

    apply_style()
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.2), sharey=True)
    have_flops = all(np.isfinite(c.flops).all() for c in curves.values())
    lows, late_highs, starts = [], [], []
    for c in curves.values():
        st = method_style(c.method)
        lo, hi = c.band(band)
        seeds = f", {len(c.runs)} seeds" if len(c.runs) > 1 else ""
        for ax, x_key, x in ((axes[0], "tokens", c.tokens), (axes[1], "flops", c.flops)):
            if x_key == "flops" and not have_flops:
                continue
            for r in c.runs:
                ax.plot(r.metrics[x_key], r.metrics["lm_loss"], color=st.color, alpha=0.22, linewidth=0.7)
            if len(c.runs) > 1:
                ax.fill_between(x, lo, hi, color=st.color, alpha=0.18, linewidth=0)
            ax.plot(x, c.mean, color=st.color, linestyle=st.linestyle, linewidth=2.2,
                    label=f"{st.label}{seeds}" if ax is axes[0] else None)
        for r in c.runs:
            loss, tok = r.metrics["lm_loss"].to_numpy(), r.metrics["tokens"].to_numpy()
            lows.append(np.nanmin(loss))
            starts.append(loss[0])
            late = loss[tok >= tok[0] + 0.1 * (tok[-1] - tok[0])]
            late_highs.append(np.nanmax(late if len(late) else loss))
    low, top = min(lows), max(late_highs)
    pad = 0.06 * max(top - low, 1e-3)
    # Cut only when some run starts far above everything later (from-scratch training): by over half
    # the range the rest of the curves span.
    cut = max(starts) > top + 0.5 * (top - low)
    top_cut = top + 2 * pad if cut else max(max(starts), top) + pad
    for ax in axes:
        ax.set_ylim(low - pad, top_cut)
    if cut:
        axes[0].text(0.99, 0.98, f"y axis cut at {top_cut:.2f}; highest start {max(starts):.2f}",
                     transform=axes[0].transAxes, ha="right", va="top", fontsize=9, color="0.3")
    axes[0].set_xlabel("training tokens")
    axes[0].xaxis.set_major_formatter(EngFormatter(sep=""))
    axes[0].set_ylabel("LM loss (cross-entropy, nats/token)")
    axes[0].set_title("LM loss against training tokens")
    if have_flops:
        axes[1].set_xlabel("training compute of the run (FLOPs, full count)")
        axes[1].xaxis.set_major_formatter(EngFormatter(sep=""))
        axes[1].set_title("LM loss against training FLOPs")
    else:
        axes[1].text(0.5, 0.5, "no model config in run.json:\nFLOPs unknown", ha="center", va="center",
                     transform=axes[1].transAxes)
    axes[1].tick_params(labelleft=True)
    smoothing = f"moving average of {window} steps" if window else "moving average of 5% of the steps"
    spread = "min-max" if band == "minmax" else "mean ± std"
    fig.legend(loc="lower center", ncol=min(4, len(curves)), frameon=False, bbox_to_anchor=(0.5, 0.0))
    fig.suptitle(f"thick: mean of smoothed curves ({smoothing}); thin: raw per step; band: {spread} over seeds",
                 fontsize=10, color="0.3", y=0.99)
    rows = -(-len(curves) // 4)
    fig.tight_layout(rect=(0, 0.01 + 0.055 * rows, 1, 1))  # makes room for the suptitle itself
    return fig


# ============================================================================ markdown
def markdown_table(df: pd.DataFrame, floatfmt: str = ".4f") -> str:
    """A GitHub-markdown table (no tabulate dependency); floats with ``floatfmt``, NaN/None as ``-``."""
    def cell(x: object) -> str:
        if x is None or (isinstance(x, float) and math.isnan(x)):
            return "-"
        if isinstance(x, (float, np.floating)):
            return format(float(x), floatfmt)
        return str(x).replace("|", "\\|")

    head = "| " + " | ".join(map(str, df.columns)) + " |"
    sep = "|" + "|".join("---" for _ in df.columns) + "|"
    body = ["| " + " | ".join(cell(x) for x in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join([head, sep, *body])


def _tokens(x: float | None) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "never"
    for scale, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= scale:
            return f"{x / scale:.4g}{suffix}"
    return f"{x:.4g}"


def final_markdown(final: pd.DataFrame) -> str:
    """Final/first loss per method as ``mean ± std (min–max)``."""
    def fmt(r: pd.Series, col: str) -> str:
        if r["n_seeds"] == 1:
            return f"{r[f'{col}_mean']:.4f}"
        return (f"{r[f'{col}_mean']:.4f} ± {r[f'{col}_std']:.4f} "
                f"({r[f'{col}_min']:.4f}–{r[f'{col}_max']:.4f})")

    df = pd.DataFrame({"method": final["label"], "seeds": final["n_seeds"],
                       "tokens": [_tokens(t) for t in final["tokens"]],
                       "first LM loss": [fmt(r, "first_lm_loss") for _, r in final.iterrows()],
                       "final LM loss": [fmt(r, "final_lm_loss") for _, r in final.iterrows()]})
    return markdown_table(df)


def crossover_markdown(cross: pd.DataFrame) -> str:
    """Rows A, columns B: the token count from which A stays below B ("never", "start")."""
    from .plotstyle import method_label

    methods = order_methods(list(cross["a"]) + list(cross["b"]))
    if len(methods) < 2:
        return "(one method only: no crossovers)"
    table = []
    for a in methods:
        row = {"A stays below B from": method_label(a)}
        for b in methods:
            if a == b:
                row[b] = ""
                continue
            r = cross[(cross["a"] == a) & (cross["b"] == b)].iloc[0]
            row[b] = "start" if r["note"] == "from the start" else _tokens(r["crossover_tokens"])
        table.append(row)
    return markdown_table(pd.DataFrame(table))


# ============================================================================ entry point
def analyze_curves(run_dirs: Sequence[str | Path], out_dir: str | Path, dense: str | Path | None = None,
                   window: int | None = None, last: int | None = None, band: str = "minmax",
                   formats: str | Sequence[str] | None = None) -> dict:
    """Read runs; write ``loss_curves.<fmt>``, ``final_losses.csv``/``.md`` (per method),
    ``final_losses_runs.csv`` (per run) and ``crossovers.csv``/``.md`` into ``out_dir``.

    Returns ``{"runs", "final", "crossovers"}`` (DataFrames) and ``"figures"``/``"tables"`` (paths).
    """
    from .plotstyle import save_figure

    if band not in ("minmax", "std"):
        raise UserError(f"band must be minmax or std, got {band!r}")
    if last is not None and last < 1:
        raise UserError(f"--last must be >= 1, got {last}")
    runs = read_runs(run_dirs, dense)
    curves = method_curves(runs, window)
    runs_df = run_table(runs, last)
    final = final_table(runs_df)
    cross = crossover_table(curves, band)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tables = [write_text(out_dir / "final_losses_runs.csv", runs_df.to_csv(index=False, float_format="%.6g")),
              write_text(out_dir / "final_losses.csv", final.to_csv(index=False, float_format="%.6g")),
              write_text(out_dir / "final_losses.md", final_markdown(final) + "\n"),
              write_text(out_dir / "crossovers.csv", cross.to_csv(index=False, float_format="%.6g")),
              write_text(out_dir / "crossovers.md", crossover_markdown(cross) + "\n")]
    figures = save_figure(plot_curves(curves, band, window), out_dir, "loss_curves", formats)
    return {"runs": runs_df, "final": final, "crossovers": cross, "curves": curves, "figures": figures,
            "tables": tables}




def configure_analyze_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("runs", nargs="+", type=Path, metavar="RUN_DIR",
                        help="training run directories (metrics.jsonl + run.json); same method + other seed = seeds")
    parser.add_argument("--out", required=True, type=Path, help="output directory")
    parser.add_argument("--dense", type=Path, metavar="RUN_DIR", help="the dense reference run (drawn dashed black)")
    parser.add_argument("--smooth", type=int, metavar="N",
                        help="moving-average window in logged steps (default: 5%% of the steps)")
    parser.add_argument("--last", type=int, metavar="K",
                        help="final loss = mean of the last K logged steps (default: the last 5%%)")
    parser.add_argument("--band", choices=("minmax", "std"), default="minmax", help="seed band (default min-max)")
    parser.add_argument("--formats", default="png", help="figure formats, comma-separated: png, svg, pdf")


def run_analyze(args: argparse.Namespace) -> int:
    res = analyze_curves(args.runs, args.out, args.dense, args.smooth, args.last, args.band, args.formats)
    print(final_markdown(res["final"]))
    print()
    print(crossover_markdown(res["crossovers"]))
    for p in res["tables"] + res["figures"]:
        print(f"wrote {p}")
    return 0
