"""The CPU study's analysis (``drop-upcycling analyze study RUN_DIR --out DIR [--ablation-out DIR]``).

Reads what the runs of a reproduction folder logged with held-out evaluation on
(``runs/<label>/heldout.jsonl``, :mod:`drop_upcycling.heldout`; ``ablation/runs/<label>/`` for the
r x index-mode ablation) and never imports the trainer. The analysis is the one the study's plan
fixed before the run (``reports/study_plan.md``):

- **final held-out loss** per method, mean and spread over seeds, and the paired DU-0.5 - NU
  difference at the end with a 95% t-interval over seeds;
- **the crossover**: the gap ``g_s(t) = L(DU-0.5, s, t) - L(NU, s, t)`` per seed ``s`` (same router,
  same data order, same held-out tokens); *measured* when the seed-mean gap goes below 0 and stays
  there, otherwise *extrapolated* from a line ``g = a + b ln t`` fitted to the second half of the
  budget (the zero ``exp(-a / b)`` when ``b < 0``): the estimate from the seed-mean gap, the interval
  from the seeds' own fits; "no crossover in sight" when the seed-mean slope is not negative;
- **the experts over training**: mean pairwise cosine similarity of the experts (per layer, then
  averaged) and routing specialization from the held-out routing counts;
- **the ablation**: final held-out loss against r for each index set.

Outputs: ``study.json`` (every number above), ``heldout_losses.csv``, ``du_minus_nu.csv``,
``experts_over_training.csv`` and the figures ``heldout_curves.png``, ``du_minus_nu.png``,
``experts_over_training.png``; with ``--ablation-out``: ``r_sweep.csv``, ``r_sweep.png`` and a
``README.md`` there.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from .configs import ModelConfig
from .errors import UserError
from .fsio import load_json
from .layout import HELDOUT, METRICS, RUN_JSON, ReproLayout

DU, NU = "DU-0.5", "NU"
# Two-sided 95% critical values of Student's t by degrees of freedom (standard tables).
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}


# ============================================================================ reading
@dataclass
class HeldoutRun:
    """One run's held-out rows and what it was (method, seed, model, initialization options)."""

    label: str
    method: str
    seed: int
    path: Path
    rows: list[dict]
    info: dict  # run.json
    upcycling: dict | None  # the init checkpoint's upcycling.json options, when it has one

    @property
    def model(self) -> ModelConfig:
        return ModelConfig.from_hf_dict(self.info["model"], name=self.label)

    @property
    def final_tokens(self) -> int:
        return int(self.rows[-1]["tokens"])

    def tokens_per_s(self) -> float | None:
        """Median training throughput from metrics.jsonl (held-out evaluations excluded)."""
        path = self.path / METRICS
        if not path.is_file():
            return None
        rates = [json.loads(line)["tokens_per_s"] for line in path.read_text().splitlines() if line.strip()]
        return float(np.median(rates)) if rates else None


def read_heldout_run(path: str | Path) -> HeldoutRun:
    path = Path(path)
    info = load_json(path / RUN_JSON)
    file = path / HELDOUT
    if not file.is_file():
        raise UserError(f"{path} has no {HELDOUT}: train with heldout_every_tokens > 0")
    rows = [json.loads(line) for line in file.read_text().splitlines() if line.strip()]
    if not rows:
        raise UserError(f"{file} is empty")
    run = info.get("run", {})
    init = run.get("init")
    upcycling = None
    if init and (Path(init) / "upcycling.json").is_file():
        upcycling = load_json(Path(init) / "upcycling.json").get("options")
    return HeldoutRun(path.name, str(run.get("method") or path.name), int(run.get("seed", 0)), path, rows, info,
                      upcycling)


def runs_with_heldout(folder: Path) -> list[HeldoutRun]:
    """Every run under ``folder`` (one subfolder each) that logged held-out rows."""
    if not folder.is_dir():
        return []
    return [read_heldout_run(p) for p in sorted(folder.iterdir()) if (p / HELDOUT).is_file()]


def loss_table(runs: list[HeldoutRun]) -> pd.DataFrame:
    """Long format: ``label, method, seed, step, tokens, domain, loss`` (domain ``mean`` = the mean over domains)."""
    rows = []
    for r in runs:
        for row in r.rows:
            for domain, loss in {**row["loss"], "mean": row["mean"]}.items():
                rows.append({"label": r.label, "method": r.method, "seed": r.seed, "step": row["step"],
                             "tokens": row["tokens"], "domain": domain, "loss": loss})
    return pd.DataFrame(rows)


# ============================================================================ statistics
def t_interval(values: list[float] | np.ndarray) -> dict:
    """Mean and two-sided 95% t-interval over independent values (seeds); no interval with one value."""
    x = np.asarray(values, dtype=np.float64)
    n = len(x)
    mean = float(x.mean())
    if n < 2:
        return {"mean": mean, "low": None, "high": None, "n": n}
    half = T_975.get(n - 1, 1.96) * float(x.std(ddof=1)) / math.sqrt(n)
    return {"mean": mean, "low": mean - half, "high": mean + half, "n": n}


def final_losses(runs: list[HeldoutRun]) -> pd.DataFrame:
    """Per method: seeds, mean, std, min, max of the final held-out loss (mean over domains)."""
    df = pd.DataFrame([{"method": r.method, "seed": r.seed, "loss": r.rows[-1]["mean"]} for r in runs])
    out = df.groupby("method")["loss"].agg(["count", "mean", "std", "min", "max"]).reset_index()
    return out.rename(columns={"count": "seeds"})


def paired_gaps(runs: list[HeldoutRun], a: str = DU, b: str = NU) -> pd.DataFrame:
    """``seed, tokens, gap`` = held-out loss of ``a`` minus ``b`` for every seed both ran, at common evaluations."""
    table = loss_table([r for r in runs if r.method in (a, b)])
    if table.empty:
        return pd.DataFrame(columns=["seed", "tokens", "gap"])
    mean = table[table["domain"] == "mean"].pivot_table(index=["seed", "tokens"], columns="method", values="loss")
    if a not in mean or b not in mean:
        return pd.DataFrame(columns=["seed", "tokens", "gap"])
    gap = (mean[a] - mean[b]).dropna().rename("gap").reset_index()
    return gap.sort_values(["seed", "tokens"]).reset_index(drop=True)


def log_line(tokens: np.ndarray, gap: np.ndarray) -> tuple[float, float]:
    """Least-squares ``gap = a + b ln(tokens)``: returns (a, b)."""
    b, a = np.polyfit(np.log(tokens), gap, 1)
    return float(a), float(b)


def _zero(a: float, b: float) -> float | None:
    return math.exp(-a / b) if b < 0 and -a / b < 700 else None


def crossover(gaps: pd.DataFrame) -> dict:
    """The DU-0.5 - NU crossover as the plan defines it (module docstring); JSON-ready."""
    if gaps.empty:
        return {"crossover_tokens": None, "extrapolated_crossover": None,
                "method": "not computed: no paired DU-0.5 and NU held-out logs"}
    mean = gaps.groupby("tokens")["gap"].mean()
    tokens, values = mean.index.to_numpy(dtype=np.float64), mean.to_numpy()
    per_seed = {}
    for seed, g in gaps.groupby("seed"):
        t, v = g["tokens"].to_numpy(dtype=np.float64), g["gap"].to_numpy()
        per_seed[int(seed)] = {"final_gap": float(v[-1]), "measured_crossover_tokens": _stays_below_zero(t, v)}
    final = t_interval(gaps[gaps["tokens"] == gaps["tokens"].max()]["gap"].to_numpy())
    result = {"final_gap": final, "per_seed": per_seed, "seeds": len(per_seed)}
    measured = _stays_below_zero(tokens, values)
    if measured is not None:
        return {**result, "crossover_tokens": measured, "extrapolated_crossover": None,
                "method": "measured: the first held-out evaluation after which the seed-mean DU-0.5 - NU gap "
                          "stays below 0 until the end of the budget"}
    half = tokens >= tokens.max() / 2
    if half.sum() < 3:
        return {**result, "crossover_tokens": None, "extrapolated_crossover": None,
                "method": f"not extrapolated: {int(half.sum())} evaluations in the second half of the budget, "
                          "fewer than the 3 a trend needs"}
    a, b = log_line(tokens[half], values[half])
    for seed, g in gaps.groupby("seed"):
        t, v = g["tokens"].to_numpy(dtype=np.float64), g["gap"].to_numpy()
        keep = t >= t.max() / 2
        sa, sb = log_line(t[keep], v[keep])
        per_seed[int(seed)].update(slope_per_ln_token=sb, extrapolated_zero_tokens=_zero(sa, sb))
    result["fit"] = {"form": "gap = a + b ln(tokens), evaluations of the second half of the budget",
                     "a": a, "b": b, "from_tokens": float(tokens[half].min()), "to_tokens": float(tokens.max())}
    zero = _zero(a, b)
    if zero is None:
        return {**result, "crossover_tokens": None, "extrapolated_crossover": None,
                "method": f"no crossover in sight: the seed-mean gap's fitted slope over the second half is "
                          f"{b:+.4f} per e-fold of tokens (not shrinking)"}
    zeros = [s["extrapolated_zero_tokens"] for s in per_seed.values()]
    finite = [z for z in zeros if z is not None]
    low = min(finite) if finite else None
    high = max(finite) if finite and len(finite) == len(zeros) else None  # a seed that never crosses: unbounded
    return {**result, "crossover_tokens": None,
            "extrapolated_crossover": {"tokens": zero, "low": low, "high": high},
            "method": "extrapolated: zero of gap = a + b ln(tokens) fitted to the seed-mean gap over the second "
                      "half of the budget; low/high = the lowest/highest zero of the same fit per seed "
                      "(high null: some seed's gap is not shrinking)"}


def _stays_below_zero(tokens: np.ndarray, gap: np.ndarray) -> float | None:
    from .curves import first_stays_below

    return first_stays_below(tokens, gap, np.zeros_like(gap))


# ============================================================================ experts over training
def expert_trajectories(runs: list[HeldoutRun]) -> pd.DataFrame:
    """``label, method, seed, tokens, expert_cosine, specialization, specialization_<domain>``.

    ``expert_cosine``: the layers' mean pairwise cosine similarity of the experts, averaged over
    layers. ``specialization``: :func:`drop_upcycling.routing.layer_metrics`' mean pairwise L1
    distance between the domains' expert distributions, averaged over layers; per domain, the L1
    distance of its distribution to the domains' mean distribution.
    """
    from .routing import layer_metrics

    rows = []
    for r in runs:
        for row in r.rows:
            if "routing" not in row:
                continue
            domains = list(row["routing"])
            counts_DLE = np.array([row["routing"][d] for d in domains], dtype=np.float64)
            shares_DLE = counts_DLE / counts_DLE.sum(axis=2, keepdims=True).clip(min=1)
            spec = [layer_metrics(pd.DataFrame(shares_DLE[:, layer, :], index=domains))["specialization"]
                    for layer in range(shares_DLE.shape[1])]
            pooled_LE = shares_DLE.mean(axis=0)
            out = {"label": r.label, "method": r.method, "seed": r.seed, "tokens": row["tokens"],
                   "expert_cosine": float(np.mean(row["expert_cosine"])), "specialization": float(np.mean(spec))}
            for i, d in enumerate(domains):
                out[f"specialization_{d}"] = float(np.abs(shares_DLE[i] - pooled_LE).sum(axis=1).mean())
            rows.append(out)
    return pd.DataFrame(rows)


# ============================================================================ ablation
def ablation_table(runs: list[HeldoutRun]) -> pd.DataFrame:
    """``r, index_mode, seed, tokens, initial_heldout_loss, final_heldout_loss, label`` of Drop-Upcycling runs."""
    rows = []
    for r in runs:
        opts = r.upcycling or {}
        if opts.get("method") != "drop":
            raise UserError(f"{r.path}: its init {r.info.get('run', {}).get('init')} is not a Drop-Upcycling "
                            "checkpoint with upcycling.json (the ablation reads r and the index set from it)")
        rows.append({"r": float(opts["ratio"]), "index_mode": opts["index_mode"], "seed": r.seed,
                     "tokens": r.final_tokens, "initial_heldout_loss": r.rows[0]["mean"],
                     "final_heldout_loss": r.rows[-1]["mean"], "label": r.label})
    return pd.DataFrame(rows).sort_values(["index_mode", "r", "seed"]).reset_index(drop=True)


# ============================================================================ figures
def plot_heldout(table: pd.DataFrame):
    """Mean held-out loss against tokens: one line per method (seed mean), a band over seeds."""
    import matplotlib.pyplot as plt

    from .methods import order_methods
    from .plotstyle import apply_style, method_style

    apply_style()
    fig, (ax, zoom) = plt.subplots(1, 2, figsize=(11, 4.2))
    mean = table[table["domain"] == "mean"]
    for method in order_methods(mean["method"].unique()):
        m = mean[mean["method"] == method].groupby("tokens")["loss"].agg(["mean", "min", "max", "count"])
        st = method_style(method)
        label = f"{st.label} ({int(m['count'].max())} seed{'s' if m['count'].max() > 1 else ''})"
        for a in (ax, zoom):
            x = m.index.to_numpy() / 1e6
            a.plot(x, m["mean"], color=st.color, linestyle=st.linestyle, marker=st.marker, markersize=3, label=label)
            if m["count"].max() > 1:
                a.fill_between(x, m["min"], m["max"], color=st.color, alpha=0.2, linewidth=0)
    tmax = mean["tokens"].max()
    late = mean[(mean["tokens"] >= tmax / 2) & (mean["method"] != "FS")]  # FS ends far above: zoom on the rest
    zoom.set_xlim(tmax / 2e6, tmax / 1e6 * 1.01)
    zoom.set_ylim(late["loss"].min() - 0.01, late["loss"].max() + 0.01)
    for a, title in ((ax, "whole MoE phase"), (zoom, "second half")):
        a.set_xlabel("MoE training tokens (millions)")
        a.set_ylabel("held-out LM loss (mean over 4 domains)")
        a.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_gap(gaps: pd.DataFrame, cross: dict):
    """DU-0.5 - NU held-out gap per seed, the seed mean, the fitted trend and zero."""
    import matplotlib.pyplot as plt

    from .plotstyle import OKABE_ITO, apply_style

    apply_style()
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for seed, g in gaps.groupby("seed"):
        ax.plot(g["tokens"] / 1e6, g["gap"], color=OKABE_ITO["grey"], linewidth=1, alpha=0.8,
                label="per seed" if seed == gaps["seed"].min() else None)
    mean = gaps.groupby("tokens")["gap"].mean()
    ax.plot(mean.index / 1e6, mean.to_numpy(), color=OKABE_ITO["vermillion"], marker="o", markersize=3,
            label="seed mean")
    fit = cross.get("fit")
    if fit:
        t = np.linspace(fit["from_tokens"], fit["to_tokens"], 50)
        ax.plot(t / 1e6, fit["a"] + fit["b"] * np.log(t), color=OKABE_ITO["blue"], linestyle="--",
                label=f"fit a + b ln t (b = {fit['b']:+.3f})")
    ax.axhline(0, color=OKABE_ITO["black"], linewidth=0.8)
    positive = mean[mean.index > 0]
    if len(positive):
        ax.set_ylim(min(-0.02, positive.min() * 1.2), max(0.02, positive.max() * 1.2))
    ax.set_xlabel("MoE training tokens (millions)")
    ax.set_ylabel("held-out loss: DU-0.5 minus NU")
    ax.set_title("DU-0.5 - NU (below 0: DU-0.5 ahead)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_experts(traj: pd.DataFrame):
    """Expert similarity and routing specialization against tokens, one line per method (seed mean)."""
    import matplotlib.pyplot as plt

    from .methods import order_methods
    from .plotstyle import apply_style, method_style

    apply_style()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for method in order_methods(traj["method"].unique()):
        m = traj[traj["method"] == method].groupby("tokens")[["expert_cosine", "specialization"]].mean()
        st = method_style(method)
        for ax, col in zip(axes, ("expert_cosine", "specialization"), strict=True):
            ax.plot(m.index / 1e6, m[col], color=st.color, linestyle=st.linestyle, marker=st.marker, markersize=3,
                    label=st.label)
    axes[0].set_ylabel("mean pairwise cosine similarity of experts")
    axes[1].set_ylabel("routing specialization (mean pairwise L1 between domains)")
    for ax in axes:
        ax.set_xlabel("MoE training tokens (millions)")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_ablation(table: pd.DataFrame):
    import matplotlib.pyplot as plt

    from .plotstyle import OKABE_ITO, apply_style

    apply_style()
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for mode, color, marker in (("per-matrix", OKABE_ITO["blue"], "o"), ("shared", OKABE_ITO["orange"], "s")):
        m = table[table["index_mode"] == mode].groupby("r")["final_heldout_loss"].mean()
        label = {"per-matrix": "per-matrix (released code)", "shared": "shared (paper text)"}[mode]
        ax.plot(m.index, m.to_numpy(), color=color, marker=marker, label=label)
    ax.set_xlabel("re-initialization ratio r")
    ax.set_ylabel("final held-out LM loss")
    ax.set_title("Drop-Upcycling: r and the index set")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


# ============================================================================ the whole analysis
def regime(root: Path, runs: list[HeldoutRun]) -> dict:
    """Tokens per parameter of the seed and of the MoE phase, and seeds per method (the findings' ``regime``)."""
    at = ReproLayout(root)
    pre = at.pretrain_run
    dense_tokens = dense_params = None
    if (pre / METRICS).is_file():
        last = pre.joinpath(METRICS).read_text().strip().splitlines()[-1]
        dense_tokens = int(json.loads(last)["tokens"])
        dense_params = ModelConfig.from_hf_dict(load_json(pre / RUN_JSON)["model"]).param_counts()["total"]
    moe = [r for r in runs if r.model.is_moe]
    moe_tokens = max((r.final_tokens for r in moe), default=None)
    active = moe[0].model.param_counts()["active"] if moe else None
    seeds: dict[str, int] = {}
    for r in runs:
        seeds[r.method] = seeds.get(r.method, 0) + 1
    return {"dense_params": dense_params, "dense_tokens": dense_tokens,
            "dense_tokens_per_param": dense_tokens / dense_params if dense_tokens and dense_params else None,
            "moe_tokens": moe_tokens, "moe_active_params": active,
            "moe_tokens_per_active_param": moe_tokens / active if moe_tokens and active else None,
            "moe_to_dense_tokens": moe_tokens / dense_tokens if moe_tokens and dense_tokens else None,
            "seeds": seeds, "heldout_loss": bool(runs)}


def throughput(runs: list[HeldoutRun], matmul: dict | None) -> dict:
    """Training tokens/s and FLOP/s per run, and their share of the machine's matmul rate when measured."""
    from .flops import training_flops_per_token

    per_run = {}
    for r in runs:
        rate = r.tokens_per_s()
        if rate is None:
            continue
        seq = int(r.info["run"].get("seq_len", 128))
        per_run[r.label] = {"tokens_per_s": rate,
                            "flops_per_s": rate * training_flops_per_token(r.model, seq, causal=True)}
    out: dict = {"runs": per_run}
    if per_run:
        flops = [v["flops_per_s"] for v in per_run.values()]
        out["median_run_flops_per_s"] = float(np.median(flops))
    if matmul and per_run:
        concurrent = int(matmul.get("concurrent_runs", 1))
        out["machine_matmul_flops_per_s"] = matmul["flops_per_s"]
        out["share_of_matmul_rate"] = concurrent * out["median_run_flops_per_s"] / matmul["flops_per_s"]
        out["matmul"] = matmul
    return out


def analyze_study(root: str | Path, out_dir: str | Path, ablation_out: str | Path | None = None,
                  formats: str | None = None) -> dict:
    """Everything the module docstring lists, written under ``out_dir`` (and ``ablation_out``); returns study.json."""
    from .fsio import jsonable, write_json, write_text
    from .plotstyle import save_figure

    root, out = Path(root), Path(out_dir)
    at = ReproLayout(root)
    runs = runs_with_heldout(at.runs)
    if not runs:
        raise UserError(f"{root}: no run under runs/ logged held-out loss (heldout.jsonl)")
    out.mkdir(parents=True, exist_ok=True)
    table = loss_table(runs)
    table.to_csv(out / "heldout_losses.csv", index=False, float_format="%.6g")
    save_figure(plot_heldout(table), out, "heldout_curves", formats)
    gaps = paired_gaps(runs)
    gaps.to_csv(out / "du_minus_nu.csv", index=False, float_format="%.6g")
    cross = crossover(gaps)
    if not gaps.empty:
        save_figure(plot_gap(gaps, cross), out, "du_minus_nu", formats)
    traj = expert_trajectories(runs)
    if not traj.empty:
        traj.to_csv(out / "experts_over_training.csv", index=False, float_format="%.6g")
        save_figure(plot_experts(traj), out, "experts_over_training", formats)
    matmul_file = at.matmul_rate
    result = {"regime": regime(root, runs), "final_heldout_loss": final_losses(runs).to_dict(orient="records"),
              "du_vs_nu": cross, "throughput": throughput(runs, load_json(matmul_file) if matmul_file.is_file() else None),
              "experts_final": _experts_final(traj)}
    ablation = runs_with_heldout(at.ablation / "runs")
    if ablation and ablation_out is not None:
        result["ablation"] = write_ablation(ablation, Path(ablation_out), result["du_vs_nu"], formats)
    write_json(out / "study.json", jsonable(result))
    write_text(out / "summary.md", summary_markdown(result))
    return result


def _experts_final(traj: pd.DataFrame) -> list[dict]:
    if traj.empty:
        return []
    first = traj.sort_values("tokens").groupby(["method", "seed"]).first().groupby("method")[
        ["expert_cosine", "specialization"]].mean()
    last = traj.sort_values("tokens").groupby(["method", "seed"]).last().groupby("method")[
        ["expert_cosine", "specialization"]].mean()
    return [{"method": m, "cosine_start": first.loc[m, "expert_cosine"], "cosine_end": last.loc[m, "expert_cosine"],
             "specialization_start": first.loc[m, "specialization"],
             "specialization_end": last.loc[m, "specialization"]} for m in last.index]


def write_ablation(runs: list[HeldoutRun], out: Path, du_vs_nu: dict, formats: str | None) -> dict:
    """``r_sweep.csv``, ``r_sweep.png`` and ``README.md`` of the r x index-mode ablation in ``out``."""
    from .fsio import write_text
    from .plotstyle import save_figure

    out.mkdir(parents=True, exist_ok=True)
    table = ablation_table(runs)
    table.to_csv(out / "r_sweep.csv", index=False, float_format="%.6g")
    save_figure(plot_ablation(table), out, "r_sweep", formats)
    best = table.loc[table["final_heldout_loss"].idxmin()]
    summary = {"rows": len(table), "tokens": int(table["tokens"].max()),
               "best": {"r": float(best["r"]), "index_mode": best["index_mode"],
                        "final_heldout_loss": float(best["final_heldout_loss"])}}
    write_text(out / "README.md", ablation_markdown(table, summary, du_vs_nu))
    return summary


# ============================================================================ text
def _tokens(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x / 1e9:.3g}B" if x >= 1e9 else f"{x / 1e6:.3g}M"


def summary_markdown(result: dict) -> str:
    """The study's numbers as the report shows them (Markdown)."""
    from .curves import markdown_table

    reg, cross = result["regime"], result["du_vs_nu"]
    lines = ["## The CPU study: held-out loss, DU-0.5 vs NU", "",
             f"Regime: the dense seed saw {_tokens(reg['dense_tokens'])} tokens "
             f"({reg['dense_tokens_per_param']:.1f} per parameter); every MoE {_tokens(reg['moe_tokens'])} "
             f"({reg['moe_to_dense_tokens']:.2f}x the seed's tokens, {reg['moe_tokens_per_active_param']:.1f} per "
             f"active parameter). Seeds: "
             + ", ".join(f"{m} {n}" for m, n in reg["seeds"].items()) + ".", "",
             "![Held-out loss](study/heldout_curves.png)", "",
             markdown_table(pd.DataFrame(result["final_heldout_loss"])), ""]
    fg = cross.get("final_gap")
    if fg:
        interval = (f"95% t-interval [{fg['low']:+.4f}, {fg['high']:+.4f}]" if fg["low"] is not None else
                    "one seed, no interval")
        lines += [f"DU-0.5 minus NU at the end (paired by seed, {fg['n']} seeds): {fg['mean']:+.4f}, {interval}.", ""]
    lines += ["![DU-0.5 minus NU](study/du_minus_nu.png)", "", f"Crossover: {cross['method']}."]
    if cross.get("crossover_tokens") is not None:
        lines.append(f"Measured at {_tokens(cross['crossover_tokens'])} tokens.")
    ex = cross.get("extrapolated_crossover")
    if ex:
        lines.append(f"Extrapolated: {_tokens(ex['tokens'])} tokens (seeds: {_tokens(ex['low'])} to "
                     f"{_tokens(ex['high']) if ex['high'] is not None else 'unbounded'}).")
    lines += ["", "![Experts over training](study/experts_over_training.png)", ""]
    if result.get("experts_final"):
        lines += [markdown_table(pd.DataFrame(result["experts_final"]), floatfmt=".3f"), ""]
    tp = result["throughput"]
    if tp.get("median_run_flops_per_s"):
        share = tp.get("share_of_matmul_rate")
        lines += [f"Throughput: median {np.median([v['tokens_per_s'] for v in tp['runs'].values()]):.0f} tokens/s per "
                  f"run, {tp['median_run_flops_per_s'] / 1e9:.1f} GFLOP/s"
                  + (f"; with {tp['matmul']['concurrent_runs']} runs at once, {share:.0%} of the machine's measured "
                     f"matmul rate ({tp['machine_matmul_flops_per_s'] / 1e9:.1f} GFLOP/s)." if share else "."), ""]
    return "\n".join(lines)


def ablation_markdown(table: pd.DataFrame, summary: dict, du_vs_nu: dict) -> str:
    from .curves import markdown_table

    wide = table.pivot_table(index="r", columns="index_mode", values="final_heldout_loss").reset_index()
    spread = du_vs_nu.get("final_gap") or {}
    return "\n".join([
        "# Ablation: the re-initialization ratio r and the index set", "",
        "Drop-Upcycling from the CPU study's dense seed at r in {0, 0.125, 0.25, 0.5, 0.75, 1.0}, with the "
        "re-initialized neurons drawn per matrix (the authors' released code) or one set shared by the "
        "three matrices of an expert (the paper's text), seed 0, trained for "
        f"{_tokens(summary['tokens'])} tokens (a quarter of the study's MoE budget, same schedule shape). "
        "r = 0 is naive upcycling under both index sets. Generated by `drop-upcycling analyze study`; "
        "the plan: `reports/study_plan.md`.", "",
        "![final held-out loss against r](r_sweep.png)", "",
        "Final held-out LM loss (mean over the four domains):", "",
        markdown_table(wide), "",
        f"Lowest: r = {summary['best']['r']:g}, {summary['best']['index_mode']} "
        f"({summary['best']['final_heldout_loss']:.4f}). One seed per cell: differences smaller than the "
        "seed spread of the main study"
        + (f" (its DU-0.5 - NU end gap has a 95% interval of width {spread['high'] - spread['low']:.4f})"
           if spread.get("low") is not None else "")
        + " are not effects.", "",
        "Full table: `r_sweep.csv` (`r, index_mode, seed, tokens, initial_heldout_loss, final_heldout_loss`).", ""])


# ============================================================================ CLI
def configure_analyze_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", help="a reproduction folder whose runs logged held-out loss (--scale study)")
    parser.add_argument("--out", required=True, help="output folder (study.json, CSVs, figures)")
    parser.add_argument("--ablation-out", default=None, help="the r x index-mode ablation's report folder")
    parser.add_argument("--formats", default=None, help="figure formats, e.g. png,svg (default png)")


def run_analyze(args: argparse.Namespace) -> int:
    result = analyze_study(args.run_dir, args.out, args.ablation_out, args.formats)
    print(summary_markdown(result))
    return 0
