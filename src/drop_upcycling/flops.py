"""Parameters and training FLOPs of the dense and MoE shapes, and the paper's training-cost table.

Two FLOPs-per-token figures for training (forward + backward), both counting 2 FLOPs per
multiply-add:

- ``6n``: the usual ``6 * N_active`` approximation (Kaplan et al. 2020), N = active parameters
  including embeddings, LM head, norms and routers (:meth:`ModelConfig.param_counts`).
- ``full``: every matrix multiply of one training step, counted per token:
  attention projections (q, k, v, o), attention scores ``QK^T`` and values ``AV``, the router,
  the active experts' (or dense MLP's) three projections and the LM head; backward = 2 x forward
  (gradients with respect to inputs and weights). Not counted: embedding lookups and element-wise
  work (norms, softmax, SiLU, RoPE, the losses, optimizer updates): well under 1% at these shapes.

Attention convention: by default every query is charged for all ``S`` keys of its sequence,
as Chinchilla and ``torch.utils.flop_counter`` do (and as a masked dense kernel executes);
``causal=True`` charges only the unmasked keys, on average ``(S + 1) / 2`` per query. ``S`` is the
training sequence length (``max_position_embeddings`` of the config unless given).

A *training plan* (:class:`TrainingPlan`) turns per-token costs into the paper's Table-1-style
totals: an upcycled MoE costs its dense seed's pre-training plus the MoE training; from scratch
(FS) costs only the MoE training.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .configs import MODEL_CONFIGS, ModelConfig, get_model_config, load_yaml, model_config_from_mapping
from .errors import UserError
from .methods import MOE_METHODS, lookup

ROW_FIELDS = ["model", "total_params", "active_params", "flops_per_token_6n", "flops_per_token_full", "seq_len"]


# ============================================================================ per token
def forward_flops_per_token(cfg: ModelConfig, seq_len: int | None = None, causal: bool = False) -> dict[str, float]:
    """Forward FLOPs per token by component (see the module docstring for what is counted)."""
    s = seq_len or cfg.max_position_embeddings
    if s < 1:
        raise UserError(f"sequence length must be >= 1, got {s}")
    d, f, v, n = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, cfg.num_hidden_layers
    q_dim = cfg.num_attention_heads * cfg.head_dim
    kv_dim = cfg.num_key_value_heads * cfg.head_dim
    keys = (s + 1) / 2 if causal else s
    experts = cfg.num_experts_per_tok if cfg.is_moe else 1
    return {
        "attention_proj": n * 2 * (d * q_dim + 2 * d * kv_dim + q_dim * d),
        "attention_scores": n * 2 * 2 * keys * q_dim,  # QK^T and AV: q_dim MACs per key, each
        "router": n * 2 * d * cfg.num_experts if cfg.is_moe else 0,
        "ffn": n * experts * 2 * 3 * d * f,
        "lm_head": 2 * d * v,
    }


def training_flops_per_token(cfg: ModelConfig, seq_len: int | None = None, causal: bool = False) -> float:
    """Full count for one training token: 3 x forward (backward computes input and weight gradients)."""
    return 3 * float(sum(forward_flops_per_token(cfg, seq_len, causal).values()))


def flops_row(cfg: ModelConfig, seq_len: int | None = None, causal: bool = False,
              tokens: float | None = None) -> dict:
    """One output row: ``model, total_params, active_params, flops_per_token_6n, flops_per_token_full,
    seq_len`` (+ ``training_flops_6n``/``training_flops_full`` for ``tokens`` training tokens)."""
    params = cfg.param_counts()
    row = {
        "model": cfg.name,
        "total_params": params["total"],
        "active_params": params["active"],
        "flops_per_token_6n": 6.0 * params["active"],
        "flops_per_token_full": training_flops_per_token(cfg, seq_len, causal),
        "seq_len": seq_len or cfg.max_position_embeddings,
    }
    if tokens is not None:
        row["tokens"] = tokens
        row["training_flops_6n"] = row["flops_per_token_6n"] * tokens
        row["training_flops_full"] = row["flops_per_token_full"] * tokens
    return row


# ============================================================================ training plan
@dataclass
class TrainingPlan:
    """Tokens per phase, FACTS.md §4: dense seeds pre-trained on 1T tokens, every MoE trained on 500B.

    ``reference_tokens`` is the pre-training length of the dense reference the headline compares
    against (13B). FACTS.md does not state it; 2.1T is an assumption (LLM-jp-3's pre-training length
    as we understand it, not verified here) — set it in the plan YAML. The headline ratio scales
    inversely with it.
    """

    dense_tokens: float = 1.0e12
    moe_tokens: float = 5.0e11
    # The table's MoE methods but BTX, whose domain branches' budget the plan does not model.
    methods: list[str] = field(default_factory=lambda: [m.key for m in MOE_METHODS if not m.branches])
    moe_models: list[str] = field(default_factory=lambda: ["moe-8x152m", "moe-8x1.5b", "moe-8x3.7b"])
    headline_moe: str = "moe-8x3.7b"
    headline_method: str = "DU-0.5"
    reference: str = "dense-13b"
    reference_tokens: float = 2.1e12
    seq_len: int = 4096

    @classmethod
    def from_yaml(cls, path: str | Path) -> TrainingPlan:
        data = load_yaml(path)
        data = data.get("plan", data)
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        if unknown:
            raise UserError(f"{path}: unknown plan field(s) {', '.join(unknown)} (known: {', '.join(sorted(known))})")
        plan = cls(**data)
        for name in ("dense_tokens", "moe_tokens", "reference_tokens"):
            value = getattr(plan, name)
            try:  # PyYAML reads 1.0e11 (no exponent sign) as a string
                number = float(value)
            except (TypeError, ValueError):
                number = -1.0
            if number < 0:
                raise UserError(f"{path}: {name} must be a non-negative number, got {value!r}")
            setattr(plan, name, number)
        return plan


def _dense_seed(moe: ModelConfig) -> ModelConfig:
    name = moe.name.replace("moe-8x", "dense-") if moe.name.startswith("moe-8x") else f"{moe.name}-dense"
    return moe.as_dense().replace(name=name)


def plan_table(plan: TrainingPlan | None = None, causal: bool = False) -> list[dict]:
    """Table-1-style rows: per MoE size and method, the tokens and training FLOPs of each phase.

    Upcycled methods (everything but FS: the method table's ``from_dense``) add the dense seed's
    pre-training to the MoE training.
    The dense seeds and the reference are rows of their own (method ``dense``).
    """
    plan = plan or TrainingPlan()
    rows = []
    for moe_name in plan.moe_models:
        moe = get_model_config(moe_name)
        if not moe.is_moe:
            raise UserError(f"{moe_name} is not a MoE config")
        dense = _dense_seed(moe)
        d_row = flops_row(dense, plan.seq_len, causal)
        m_row = flops_row(moe, plan.seq_len, causal)
        rows.append(_plan_row(dense.name, "dense", d_row, plan.dense_tokens, None, 0.0))
        for method in plan.methods:
            row_m = lookup(method)
            seed_tokens = 0.0 if row_m is not None and not row_m.from_dense else plan.dense_tokens
            rows.append(_plan_row(moe.name, method, m_row, plan.moe_tokens, d_row, seed_tokens))
    ref = get_model_config(plan.reference)
    rows.append(_plan_row(ref.name, "dense", flops_row(ref, plan.seq_len, causal), plan.reference_tokens, None, 0.0))
    return rows


def _plan_row(model: str, method: str, row: dict, tokens: float, seed_row: dict | None, seed_tokens: float) -> dict:
    out = {"model": model, "method": method, "total_params": row["total_params"],
           "active_params": row["active_params"], "seed_tokens": seed_tokens, "tokens": tokens}
    for kind in ("6n", "full"):
        seed = seed_row[f"flops_per_token_{kind}"] * seed_tokens if seed_row else 0.0
        out[f"seed_flops_{kind}"] = seed
        out[f"train_flops_{kind}"] = row[f"flops_per_token_{kind}"] * tokens
        out[f"total_flops_{kind}"] = seed + out[f"train_flops_{kind}"]
    return out


def headline(plan: TrainingPlan | None = None, causal: bool = False) -> dict:
    """The paper's comparison: total training FLOPs of the headline MoE (8x3.7B DU-0.5, dense seed
    included) over those of the dense reference (13B), under both counts."""
    plan = plan or TrainingPlan()
    rows = plan_table(TrainingPlan(**{**asdict(plan), "moe_models": [plan.headline_moe],
                                      "methods": [plan.headline_method]}), causal)
    moe, ref = rows[1], rows[-1]
    return {
        "moe": f"{plan.headline_method} {moe['model']}", "reference": ref["model"],
        "moe_active_params": moe["active_params"], "reference_params": ref["total_params"],
        **{f"moe_flops_{k}": moe[f"total_flops_{k}"] for k in ("6n", "full")},
        **{f"reference_flops_{k}": ref[f"total_flops_{k}"] for k in ("6n", "full")},
        **{f"ratio_{k}": moe[f"total_flops_{k}"] / ref[f"total_flops_{k}"] for k in ("6n", "full")},
    }


# ============================================================================ figure
def plot_plan(rows: Sequence[dict], kind: str = "6n"):
    """Total training FLOPs per (model, method) of :func:`plan_table`: one panel per MoE size (the
    dense reference joins the last), linear axis, the dense seed's pre-training and the MoE training
    stacked, coloured by method. Returns the figure."""
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    from .plotstyle import OKABE_ITO, apply_style, method_label, method_style

    if kind not in ("6n", "full"):
        raise UserError(f"kind must be 6n or full, got {kind!r}")
    apply_style()
    groups: list[list[dict]] = []
    for i, r in enumerate(rows):
        starts_group = r["method"] == "dense" and i + 1 < len(rows) and rows[i + 1]["method"] != "dense"
        if starts_group or not groups:
            groups.append([])
        groups[-1].append(r)
    heights = [len(g) for g in groups]
    fig, axes = plt.subplots(len(groups), 1, figsize=(9, 0.42 * sum(heights) + 1.0 * len(groups)),
                             gridspec_kw={"height_ratios": heights}, squeeze=False)
    for ax, group in zip(axes[:, 0], groups, strict=True):
        y = list(range(len(group)))[::-1]
        seed = [r[f"seed_flops_{kind}"] for r in group]
        train = [r[f"train_flops_{kind}"] for r in group]
        ax.barh(y, seed, color=OKABE_ITO["grey"], alpha=0.45)
        ax.barh(y, train, left=seed, color=[method_style(r["method"]).color for r in group])
        ax.set_yticks(y, [f"{r['model']}: {method_label(r['method'])}" for r in group])
        ax.grid(axis="y", visible=False)
        ax.set_xlabel(f"training compute (FLOPs, {'6N approximation' if kind == '6n' else 'full count'})")
    fig.legend(handles=[Patch(color=OKABE_ITO["grey"], alpha=0.45, label="dense seed pre-training"),
                        Patch(color=OKABE_ITO["black"], label="training of the model itself (colour = method)")],
               loc="upper center", ncol=2, frameon=False, bbox_to_anchor=(0.5, 1.0))
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    return fig


# ============================================================================ formatting
def human_count(x: float) -> str:
    """Counts with B/M/T suffixes (parameters, tokens): 0.152B, 500B, 2.1T."""
    for scale, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= scale:
            return f"{x / scale:.4g}{suffix}"
    return f"{x:.4g}"


def _cell(column: str, x: object) -> str:
    if not isinstance(x, (int, float)) or column in ("seq_len",):
        return str(x)
    return f"{x:.3e}" if "flops" in column else human_count(float(x))


def format_table(rows: Sequence[dict], columns: Sequence[str]) -> str:
    """Left-aligned text table: counts with B/T suffixes, FLOPs in scientific notation."""
    cells = [[_cell(c, r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(lines)


def to_csv(rows: Sequence[dict]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


# ============================================================================ CLI
def configure_parser(parser: argparse.ArgumentParser) -> None:
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--model", action="append", metavar="NAME",
                       help=f"a registered shape ({', '.join(MODEL_CONFIGS)}) or a checkpoint dir; repeatable "
                            "(default: every dense and MoE size)")
    which.add_argument("--config", type=Path, metavar="YAML", help="a YAML file with a model: section")
    parser.add_argument("--tokens", type=float, help="also report total training FLOPs for this many tokens")
    parser.add_argument("--seq-len", type=int, help="sequence length for the attention term (default: the config's)")
    parser.add_argument("--causal", action="store_true",
                        help="charge attention only for unmasked (causal) keys instead of all S keys")
    parser.add_argument("--plan", metavar="paper|YAML",
                        help="print the Table-1-style training-cost table and the 8x3.7B vs 13B headline "
                             "('paper': FACTS.md §4 token counts; or a YAML with TrainingPlan fields)")
    parser.add_argument("--format", choices=("table", "json", "csv"), default="table")
    parser.add_argument("--out", type=Path, metavar="DIR",
                        help="also write the rows as flops.json/flops.csv (with --plan: flops_plan.* and a figure)")
    parser.add_argument("--formats", default="png", help="figure formats with --plan --out: png, svg, pdf")


def _selected_configs(args: argparse.Namespace) -> list[ModelConfig]:
    if args.config is not None:
        data = load_yaml(args.config)
        if "model" not in data:
            raise UserError(f"{args.config} has no model: section")
        return [model_config_from_mapping(data["model"], name=args.config.stem, source=args.config)]
    if args.model:
        return [get_model_config(m) for m in args.model]
    return [c for c in MODEL_CONFIGS.values() if not c.name.startswith("tiny-")]


def run(args: argparse.Namespace) -> int:
    if args.tokens is not None and args.tokens < 0:
        raise UserError(f"--tokens must be >= 0, got {args.tokens}")
    if args.seq_len is not None and args.seq_len < 1:
        raise UserError(f"--seq-len must be >= 1, got {args.seq_len}")
    if args.plan is not None:
        plan = TrainingPlan() if args.plan == "paper" else TrainingPlan.from_yaml(args.plan)
        if args.seq_len:
            plan.seq_len = args.seq_len
        _print_plan(plan, args.causal, args.format)
        if args.out is not None:
            _write_outputs(args.out, "flops_plan", plan_table(plan, args.causal),
                           {"plan": asdict(plan), "headline": headline(plan, args.causal)})
            from .plotstyle import save_figure

            for path in save_figure(plot_plan(plan_table(plan, args.causal)), args.out, "flops_plan", args.formats):
                print(f"wrote {path}")
        return 0
    rows = [flops_row(c, args.seq_len, args.causal, args.tokens) for c in _selected_configs(args)]
    if args.out is not None:
        _write_outputs(args.out, "flops", rows, None)
    if args.format == "json":
        print(json.dumps(rows, indent=2))
    elif args.format == "csv":
        print(to_csv(rows), end="")
    else:
        cols = [*ROW_FIELDS, *(["tokens", "training_flops_6n", "training_flops_full"] if args.tokens else [])]
        print(format_table(rows, cols))
    return 0


def _write_outputs(out_dir: Path, stem: str, rows: list[dict], extra: dict | None) -> None:
    """``stem.json`` (rows, plus ``extra`` keys) and ``stem.csv``, each via temp file + rename."""
    from .fsio import write_json, write_text

    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / f"{stem}.json", {"rows": rows, **(extra or {})})
    write_text(out_dir / f"{stem}.csv", to_csv(rows))
    print(f"wrote {out_dir / stem}.json and .csv")


def _print_plan(plan: TrainingPlan, causal: bool, fmt: str) -> int:
    rows = plan_table(plan, causal)
    head = headline(plan, causal)
    if fmt == "json":
        print(json.dumps({"plan": asdict(plan), "rows": rows, "headline": head}, indent=2))
        return 0
    if fmt == "csv":
        print(to_csv(rows), end="")
        return 0
    cols = ["model", "method", "total_params", "active_params", "seed_tokens", "tokens",
            "total_flops_6n", "total_flops_full"]
    print(format_table(rows, cols))
    print()
    print(f"headline: {head['moe']} ({human_count(head['moe_active_params'])} active, seed pre-training included) vs "
          f"{head['reference']} ({human_count(head['reference_params'])} params, {human_count(plan.reference_tokens)} tokens): "
          f"{head['ratio_6n']:.3f} of its training FLOPs by 6N, {head['ratio_full']:.3f} by the full count")
    return 0
