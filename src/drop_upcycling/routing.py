"""Routing specialization from count CSVs: metrics and the paper's Figure 5 (``drop-upcycling analyze routing``).

This is the analysis half of the routing study; the counting half, which runs a checkpoint, is
:mod:`.count_routing` (``drop-upcycling routing CKPT``). They meet only in the counts CSV
(:mod:`.routing_csv`, the columns of the authors' released counts), so this module needs pandas and
matplotlib but never torch or the model: the released counts are analysed without either.

Per (model, layer): the entropy of the expert distribution, the experts nobody uses, how much the
domains disagree (specialization) and each domain's favourite expert; and Figure 5.

An expert's *share* is its assignments divided by all assignments of that (model, domain, layer),
so the shares of a layer sum to 1 and uniform routing gives 1/E to every expert.

Shape legend: D domains, E experts.
"""

from __future__ import annotations

import argparse
import itertools
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from .errors import UserError
from .routing_csv import COUNT_COLUMNS, read_counts, write_csv

DEFAULT_UNUSED_THRESHOLD = 0.02  # "almost unused": under 2% of a layer's assignments in every domain


# ============================================================================ shares
def with_shares(counts: pd.DataFrame) -> pd.DataFrame:
    """Add ``share``: assignments / all assignments of the same (model, domain, layer)."""
    out = counts.copy()
    out["share"] = out["assignments"] / out.groupby(["model", "domain", "layer"])["assignments"].transform("sum")
    return out


def share_matrix(counts: pd.DataFrame, model: str, layer: int) -> pd.DataFrame:
    """[domain x expert] shares of one model and layer, domains in the paper's order."""
    from .plotstyle import order_domains

    sub = with_shares(counts[(counts["model"] == model) & (counts["layer"] == layer)])
    if sub.empty:
        raise UserError(f"no counts for model {model} layer {layer}")
    mat = sub.pivot(index="domain", columns="expert", values="share")
    if mat.isna().to_numpy().any():
        r, c = np.argwhere(mat.isna().to_numpy())[0]
        domain, expert = mat.index[r], mat.columns[c]
        raise UserError(f"no counts for model {model}, domain {domain}, layer {layer}, expert {expert}: "
                        "every (domain, expert) of a layer needs a row")
    return mat.loc[order_domains(mat.index)]


# ============================================================================ metrics
def entropy_bits(p: np.ndarray) -> float:
    """Shannon entropy in bits of a distribution (0 log 0 = 0); log2(E) for uniform routing."""
    p = np.asarray(p, dtype=np.float64)
    p = p[p > 0]
    return float(-(p * np.log2(p)).sum())


def layer_metrics(shares_DE: pd.DataFrame, unused_threshold: float = DEFAULT_UNUSED_THRESHOLD) -> dict:
    """Metrics of one (model, layer) from its [domain x expert] share matrix.

    - ``entropy``: bits, of the expert distribution pooled over domains (equal weight per domain);
      ``log2(E)`` is perfectly balanced, ``log2(K)`` is every token sent to the same K experts.
    - ``mean_domain_entropy``: the per-domain entropies averaged (low when each domain is concentrated).
    - ``unused_experts``: experts whose share is below ``unused_threshold`` in every domain.
    - ``specialization``: mean over domain pairs of the L1 distance between their distributions
      (0 = all domains routed alike, 2 = disjoint experts).
    - ``top_expert_<domain>``: each domain's most chosen expert.
    """
    mat = shares_DE.to_numpy(dtype=np.float64)
    pooled = mat.mean(axis=0)
    pairs = list(itertools.combinations(range(mat.shape[0]), 2))
    spec = float(np.mean([np.abs(mat[i] - mat[j]).sum() for i, j in pairs])) if pairs else 0.0
    row = {
        "entropy": entropy_bits(pooled),
        "mean_domain_entropy": float(np.mean([entropy_bits(r) for r in mat])),
        "unused_experts": int((mat < unused_threshold).all(axis=0).sum()),
        "specialization": spec,
    }
    experts = shares_DE.columns.to_numpy()
    for domain, r in zip(shares_DE.index, mat, strict=True):
        row[f"top_expert_{domain}"] = int(experts[int(np.argmax(r))])
    return row


def routing_metrics(counts: pd.DataFrame, unused_threshold: float = DEFAULT_UNUSED_THRESHOLD) -> pd.DataFrame:
    """One row per (model, layer): ``model, layer, num_experts, entropy, mean_domain_entropy,
    unused_experts, specialization, top_expert_<domain>...`` (see :func:`layer_metrics`)."""
    rows = []
    for (model, layer), _ in counts.groupby(["model", "layer"], sort=True):
        mat = share_matrix(counts, model, layer)
        rows.append({"model": model, "layer": int(layer), "num_experts": mat.shape[1],
                     **layer_metrics(mat, unused_threshold)})
    return pd.DataFrame(rows)


def top_k_experts(shares_E: pd.Series | np.ndarray, k: int) -> tuple[int, ...]:
    """The ``k`` experts with the largest share, sorted by id."""
    arr = np.asarray(shares_E, dtype=np.float64)
    return tuple(sorted(int(i) for i in np.argsort(-arr, kind="stable")[:k]))


def shared_top_k(counts: pd.DataFrame, model: str, k: int = 2) -> pd.DataFrame:
    """Per layer: do all domains have the same top-``k`` experts, and which share they take.

    Columns ``layer, same_top_k, experts`` (the common set, or the distinct sets joined by ``|``) and
    ``min_top_k_share`` (the smallest, over domains, of the top-k experts' total share): the paper's
    "every domain goes to the same 2 experts" is ``same_top_k`` with a large ``min_top_k_share``.
    """
    rows = []
    for layer in sorted(counts.loc[counts["model"] == model, "layer"].unique()):
        mat = share_matrix(counts, model, layer)
        sets = {d: top_k_experts(mat.loc[d], k) for d in mat.index}
        distinct = sorted(set(sets.values()))
        share = min(float(mat.loc[d, list(s)].sum()) for d, s in sets.items())
        rows.append({"layer": int(layer), "same_top_k": len(distinct) == 1,
                     "experts": "|".join(",".join(map(str, s)) for s in distinct), "min_top_k_share": share})
    return pd.DataFrame(rows)


# ============================================================================ figure
def default_layers(num_layers: int) -> list[int]:
    """The paper's rows for 24 layers (0, 8, 16, 23); the same spacing for other depths."""
    if num_layers <= 4:
        return list(range(num_layers))
    return sorted({0, num_layers // 3, 2 * num_layers // 3, num_layers - 1})


def plot_routing(counts: pd.DataFrame, layers: Sequence[int] | None = None,
                 models: Sequence[str] | None = None):
    """Figure 5: rows = layers, columns = models, grouped bars (one per domain) for every expert.

    The y axis is the expert's share of the layer's top-k assignments in percent; the dashed line
    is uniform routing (100/E %). Returns the matplotlib figure (save it with
    :func:`drop_upcycling.plotstyle.save_figure`).
    """
    import matplotlib.pyplot as plt

    from .plotstyle import apply_style, method_label, order_domains

    apply_style()
    models, layers = _grid(counts, layers, models)
    domains = order_domains(counts["domain"].unique())
    n_rows, n_cols = len(layers), len(models)
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(4.6 * n_cols + 0.6, 2.5 * n_rows + 1.2),
                             sharey=True, squeeze=False)
    ymax = 0.0
    for c, model in enumerate(models):
        for r, layer in enumerate(layers):
            ax = axes[r][c]
            ymax = max(ymax, _draw_shares(ax, share_matrix(counts, model, layer).reindex(domains)))
            if r == 0:
                ax.set_title(method_label(model), fontsize=11)
            if r == n_rows - 1:
                ax.set_xlabel("expert")
            if c == 0:
                ax.set_ylabel(f"layer {layer}\nshare of assignments (%)")
    # One y scale for all panels (sharey), so heights compare across models and layers; at least 1.5x
    # the uniform share of 8 experts, so that balanced routing does not fill the panel and look peaked.
    axes[0][0].set_ylim(0, max(ymax * 1.08, 100 / 8 * 1.5))
    _legend(fig, domains, n_rows)
    return fig


def _grid(counts: pd.DataFrame, layers: Sequence[int] | None,
          models: Sequence[str] | None) -> tuple[list[str], list[int]]:
    """The figure's columns (models, the paper's order by default) and rows (layers, :func:`default_layers`),
    each checked against the counts so that a typo is an error rather than an empty panel."""
    models = list(models) if models is not None else _model_order(counts["model"].unique())
    unknown = sorted(set(models) - set(counts["model"]))
    if unknown:
        raise UserError(f"no counts for model(s) {', '.join(unknown)}")
    num_layers = int(counts["layer"].max()) + 1
    layers = list(layers) if layers is not None else default_layers(num_layers)
    missing = sorted(set(layers) - set(counts["layer"].unique()))
    if missing:
        raise UserError(f"no counts for layer(s) {', '.join(map(str, missing))} (counts have 0..{num_layers - 1})")
    return models, layers


def _draw_shares(ax, shares_DE: pd.DataFrame) -> float:
    """One panel: per expert, a group of bars (one per domain, in row order) and the uniform line.

    Returns the tallest bar in percent, for the shared y limit.
    """
    from .plotstyle import domain_style

    domains = list(shares_DE.index)
    n_exp = shares_DE.shape[1]
    width = 0.8 / len(domains)
    x = np.arange(n_exp)
    for i, domain in enumerate(domains):
        st = domain_style(domain, i)
        ax.bar(x - 0.4 + width * (i + 0.5), 100 * shares_DE.loc[domain].fillna(0).to_numpy(), width,
               color=st.color, edgecolor="white", linewidth=0.3)
    ax.axhline(100 / n_exp, color="black", linestyle="--", linewidth=1)
    ax.set_xticks(x)
    ax.set_xlim(-0.6, n_exp - 0.4)
    ax.grid(axis="x", visible=False)
    return 100 * float(np.nanmax(shares_DE.to_numpy()))


def _legend(fig, domains: Sequence[str], n_rows: int) -> None:
    """The domains' colours and the uniform line, above the panels, with room kept for it."""
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    from .plotstyle import domain_style

    handles = [Patch(color=domain_style(d, i).color, label=domain_style(d, i).label) for i, d in enumerate(domains)]
    handles.append(Line2D([], [], color="black", linestyle="--", label="uniform routing (1/E)"))
    fig.legend(handles=handles, loc="upper center", ncol=min(len(handles), 6), frameon=False,
               bbox_to_anchor=(0.5, 1.0))
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.5 / (2.5 * n_rows + 1.2)))


def _model_order(models: Iterable[str]) -> list[str]:
    """FS, NU, RNU, BTX, DU, ... (the method table's order, the dense reference after the MoEs), then
    anything else alphabetically."""
    from .methods import method_key, rank

    return sorted(models, key=lambda m: (rank(method_key(m), dense_last=True), m))


def analyze_routing(counts_paths: Sequence[str | Path], out_dir: str | Path, layers: Sequence[int] | None = None,
                    models: Sequence[str] | None = None, formats: str | Sequence[str] | None = None,
                    unused_threshold: float = DEFAULT_UNUSED_THRESHOLD) -> dict[str, list[Path]]:
    """Read counts, write ``routing_metrics.csv`` and the Figure-5 image(s) into ``out_dir``.

    Every input (threshold, formats, counts, layers, models) is checked and the figure drawn before
    the first file is written, so a bad option leaves no metrics behind that look like a finished run.
    """
    import matplotlib.pyplot as plt

    from .plotstyle import parse_formats, save_figure

    if not 0 < unused_threshold < 1:
        raise UserError(f"--unused-threshold must be in (0, 1), got {unused_threshold}")
    formats = parse_formats(formats)
    counts = read_counts(counts_paths)
    metrics = routing_metrics(counts, unused_threshold)
    fig = plot_routing(counts, layers, models)
    try:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        metrics_path = write_csv(metrics, out_dir / "routing_metrics.csv")
    except BaseException:
        plt.close(fig)
        raise
    figures = save_figure(fig, out_dir, "routing_fig5", formats)
    return {"metrics": [metrics_path], "figures": figures}


def format_summary(metrics: pd.DataFrame) -> str:
    """A short human-readable table: per model, mean specialization and unused experts per layer."""
    lines = [f"{'model':<24} {'layers':>6} {'entropy(bits)':>13} {'specialization':>14} {'unused experts by layer'}"]
    for model, g in metrics.groupby("model", sort=False):
        lines.append(f"{model:<24} {len(g):>6} {g['entropy'].mean():>13.2f} {g['specialization'].mean():>14.3f} "
                     f"{' '.join(map(str, g.sort_values('layer')['unused_experts']))}")
    return "\n".join(lines)


# ============================================================================ CLI: analyze routing
def configure_analyze_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--counts", nargs="+", required=True, metavar="CSV",
                        help=f"count files with columns {', '.join(COUNT_COLUMNS)} (or output folders of "
                             "`drop-upcycling routing`)")
    parser.add_argument("--out", required=True, type=Path, help="output directory")
    parser.add_argument("--layers", type=int, nargs="+", help="layers to draw (default: first, 1/3, 2/3, last)")
    parser.add_argument("--models", nargs="+", help="models to draw, in column order (default: all)")
    parser.add_argument("--formats", default="png", help="figure formats, comma-separated: png, svg, pdf")
    parser.add_argument("--unused-threshold", type=float, default=DEFAULT_UNUSED_THRESHOLD,
                        help="an expert is unused when its share is below this in every domain (default 0.02)")


def run_analyze(args: argparse.Namespace) -> int:
    paths = analyze_routing(args.counts, args.out, args.layers, args.models, args.formats, args.unused_threshold)
    print(format_summary(pd.read_csv(paths["metrics"][0])))
    for p in paths["metrics"] + paths["figures"]:
        print(f"wrote {p}")
    return 0
