"""Routing specialization: count top-k expert choices per domain, measure them, draw Figure 5.

Two halves that meet in one CSV format, the columns of the authors' released counts
(``model, domain, layer, expert, assignments, distinct_tokens``):

- counting (:func:`count_routing`, ``drop-upcycling routing CKPT``): feed each domain's text
  through a MoE checkpoint in fixed-length chunks and count, per layer and expert, how many top-k
  slots chose the expert (``assignments``) and how many different vocabulary ids it saw
  (``distinct_tokens``);
- analysis (:func:`routing_metrics`, :func:`plot_routing`, ``drop-upcycling analyze routing``):
  per (model, layer) the entropy of the expert distribution, the experts nobody uses, how much the
  domains disagree (specialization) and each domain's favourite expert; and the paper's Figure 5.

An expert's *share* is its assignments divided by all assignments of that (model, domain, layer),
so the shares of a layer sum to 1 and uniform routing gives 1/E to every expert.

Shape legend: T tokens, K top-k, E experts, L layers, V vocabulary.
"""

from __future__ import annotations

import argparse
import itertools
import logging
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from .errors import UserError
from .fsio import atomic_file

log = logging.getLogger(__name__)

COUNT_COLUMNS = ["model", "domain", "layer", "expert", "assignments", "distinct_tokens"]
DEFAULT_UNUSED_THRESHOLD = 0.02  # "almost unused": under 2% of a layer's assignments in every domain
DEFAULT_CHUNK = 2048  # tokens per forward pass, as in the paper's analysis (FACTS.md §6)
# The paper's "about 205k tokens" per domain: the released counts hold 413,696 top-2 assignments per
# (model, domain, layer), i.e. 206,848 tokens = 101 chunks of 2048.
DEFAULT_TOKENS_PER_DOMAIN = 101 * DEFAULT_CHUNK


# ============================================================================ reading counts
def read_counts(paths: str | Path | Sequence[str | Path]) -> pd.DataFrame:
    """Concatenate count CSVs, checking columns, types and that every (model, domain, layer) is complete.

    A malformed file is a :class:`UserError` naming the file and the problem.
    """
    if isinstance(paths, (str, Path)):
        paths = [paths]
    if not paths:
        raise UserError("no counts CSV given")
    frames = []
    for path in map(Path, paths):
        if path.is_dir():  # the --out folder of `drop-upcycling routing`
            path = path / "routing_counts.csv"
        if not path.is_file():
            raise UserError(f"counts file {path} does not exist")
        try:
            df = pd.read_csv(path)
        except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
            raise UserError(f"{path} is not a readable CSV: {e}") from None
        missing = [c for c in COUNT_COLUMNS if c not in df.columns]
        if missing:
            raise UserError(f"{path} lacks column(s) {', '.join(missing)} (expected {', '.join(COUNT_COLUMNS)})")
        frames.append(_validate(df[COUNT_COLUMNS].copy(), path).assign(_file=str(path)))
    counts = pd.concat(frames, ignore_index=True)
    dup = counts.duplicated(["model", "domain", "layer", "expert"])
    if dup.any():
        row = counts[dup].iloc[0]
        raise UserError(f"duplicate counts for model {row.model}, domain {row.domain}, layer {row.layer}, "
                        f"expert {row.expert} (the same model in two files?)")
    _check_complete(counts)
    return counts.drop(columns="_file")


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
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    from .plotstyle import apply_style, domain_style, method_label, order_domains

    apply_style()
    models = list(models) if models is not None else _model_order(counts["model"].unique())
    unknown = sorted(set(models) - set(counts["model"]))
    if unknown:
        raise UserError(f"no counts for model(s) {', '.join(unknown)}")
    num_layers = int(counts["layer"].max()) + 1
    layers = list(layers) if layers is not None else default_layers(num_layers)
    missing = sorted(set(layers) - set(counts["layer"].unique()))
    if missing:
        raise UserError(f"no counts for layer(s) {', '.join(map(str, missing))} (counts have 0..{num_layers - 1})")
    domains = order_domains(counts["domain"].unique())
    n_rows, n_cols = len(layers), len(models)
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(4.6 * n_cols + 0.6, 2.5 * n_rows + 1.2),
                             sharey=True, squeeze=False)
    ymax = 0.0
    for c, model in enumerate(models):
        for r, layer in enumerate(layers):
            ax = axes[r][c]
            mat = share_matrix(counts, model, layer).reindex(domains)
            n_exp = mat.shape[1]
            width = 0.8 / len(domains)
            x = np.arange(n_exp)
            for i, domain in enumerate(domains):
                st = domain_style(domain, i)
                ax.bar(x - 0.4 + width * (i + 0.5), 100 * mat.loc[domain].fillna(0).to_numpy(), width,
                       color=st.color, edgecolor="white", linewidth=0.3)
            ax.axhline(100 / n_exp, color="black", linestyle="--", linewidth=1)
            ymax = max(ymax, 100 * float(np.nanmax(mat.to_numpy())))
            ax.set_xticks(x)
            ax.set_xlim(-0.6, n_exp - 0.4)
            ax.grid(axis="x", visible=False)
            if r == 0:
                ax.set_title(method_label(model), fontsize=11)
            if r == n_rows - 1:
                ax.set_xlabel("expert")
            if c == 0:
                ax.set_ylabel(f"layer {layer}\nshare of assignments (%)")
    axes[0][0].set_ylim(0, max(ymax * 1.08, 100 / 8 * 1.5))
    handles = [Patch(color=domain_style(d, i).color, label=domain_style(d, i).label) for i, d in enumerate(domains)]
    handles.append(Line2D([], [], color="black", linestyle="--", label="uniform routing (1/E)"))
    fig.legend(handles=handles, loc="upper center", ncol=min(len(handles), 6), frameon=False,
               bbox_to_anchor=(0.5, 1.0))
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.5 / (2.5 * n_rows + 1.2)))
    return fig


def _model_order(models: Iterable[str]) -> list[str]:
    """FS, NU, RNU, DU, ... (the paper's column order), then anything else alphabetically."""
    from .plotstyle import method_key

    rank = {k: i for i, k in enumerate(["FS", "NU", "RNU-0.5", "BTX", "DU-0.5", "DU-1.0", "dense"])}
    return sorted(models, key=lambda m: (rank.get(method_key(m), len(rank)), m))


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
        metrics_path = _write_csv_atomic(metrics, out_dir / "routing_metrics.csv")
    except BaseException:
        plt.close(fig)
        raise
    figures = save_figure(fig, out_dir, "routing_fig5", formats)
    return {"metrics": [metrics_path], "figures": figures}


def _write_csv_atomic(df: pd.DataFrame, path: Path, float_format: str | None = "%.6g") -> Path:
    with atomic_file(path) as tmp:
        df.to_csv(tmp, index=False, float_format=float_format)
    return path


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


# ============================================================================ counting
class RoutingCounter:
    """Accumulates top-k assignment counts and the distinct token ids each expert saw, per layer."""

    def __init__(self, num_layers: int, num_experts: int, vocab_size: int) -> None:
        import torch

        self.num_layers, self.num_experts, self.vocab_size = num_layers, num_experts, vocab_size
        self.assignments_LE = torch.zeros(num_layers, num_experts, dtype=torch.int64)
        self.seen_LEV = torch.zeros(num_layers, num_experts, vocab_size, dtype=torch.bool)
        self.tokens = 0

    def update(self, input_ids, expert_ids_per_layer) -> None:
        """``input_ids`` [B, S] (or [T]); ``expert_ids_per_layer``: L tensors [T, K], T = B*S in the same order."""
        import torch

        if len(expert_ids_per_layer) != self.num_layers:
            raise ValueError(f"expected {self.num_layers} layers of expert ids, got {len(expert_ids_per_layer)}")
        tok_T = input_ids.reshape(-1).cpu()
        self.tokens += tok_T.numel()
        for layer, ids_TK in enumerate(expert_ids_per_layer):
            ids_TK = ids_TK.cpu()
            if ids_TK.shape[0] != tok_T.numel():
                raise ValueError(f"layer {layer}: {ids_TK.shape[0]} routed tokens for {tok_T.numel()} inputs")
            self.assignments_LE[layer] += torch.bincount(ids_TK.reshape(-1), minlength=self.num_experts)
            for k in range(ids_TK.shape[1]):
                self.seen_LEV[layer].index_put_((ids_TK[:, k], tok_T), torch.tensor(True))

    def rows(self, model: str, domain: str) -> list[dict]:
        distinct_LE = self.seen_LEV.sum(dim=-1)
        return [
            {"model": model, "domain": domain, "layer": layer, "expert": e,
             "assignments": int(self.assignments_LE[layer, e]), "distinct_tokens": int(distinct_LE[layer, e])}
            for layer in range(self.num_layers) for e in range(self.num_experts)
        ]


def count_routing(model, chunks: Iterable, model_name: str, domain: str, batch_size: int = 1,
                  progress: bool = False) -> pd.DataFrame:
    """Count one domain: ``chunks`` yields 1-D token-id tensors (one forward pass each, batched when
    consecutive chunks have the same length). Returns rows with :data:`COUNT_COLUMNS`."""
    import torch

    cfg = model.config
    if not cfg.is_moe:
        raise UserError(f"{model_name} is a dense model: routing counts need a MoE checkpoint")
    counter = RoutingCounter(cfg.num_hidden_layers, cfg.num_experts, cfg.vocab_size)
    device = next(model.parameters()).device
    bar = _progress(progress, desc=f"{model_name} {domain}", unit="tok")
    with torch.inference_mode():
        for batch in _batches(chunks, batch_size):
            ids_BS = torch.stack(batch).to(device)
            if int(ids_BS.max()) >= cfg.vocab_size or int(ids_BS.min()) < 0:
                raise UserError(f"token id out of range for vocab size {cfg.vocab_size}: wrong tokenizer?")
            out = model(ids_BS, return_expert_ids=True)
            counter.update(ids_BS, out.expert_ids)
            bar.update(ids_BS.numel())
    bar.close()
    if counter.tokens == 0:
        raise UserError(f"domain {domain} gave no tokens")
    return pd.DataFrame(counter.rows(model_name, domain), columns=COUNT_COLUMNS)


def _batches(chunks: Iterable, batch_size: int) -> Iterator[list]:
    batch: list = []
    for chunk in chunks:
        if batch and (len(batch) == batch_size or chunk.shape[0] != batch[0].shape[0]):
            yield batch
            batch = []
        batch.append(chunk.reshape(-1).long())
    if batch:
        yield batch


def _progress(enabled: bool, **kwargs):
    from tqdm.auto import tqdm

    return tqdm(disable=not enabled, **kwargs)


def chunk_length(cfg, requested: int = DEFAULT_CHUNK) -> int:
    """Tokens per forward pass: the paper's 2048, or the model's context if that is shorter.

    A non-positive request is refused: clamping it to 1 would route one token at a time, without
    context, and count something else than the paper.
    """
    if requested < 1:
        raise UserError(f"--chunk-len must be >= 1, got {requested}")
    return min(requested, cfg.max_position_embeddings)


def count_checkpoint(model, domain_chunks: dict[str, Iterable], model_name: str, batch_size: int = 1,
                     progress: bool = True) -> pd.DataFrame:
    """Count every domain of ``domain_chunks`` (domain -> iterable of 1-D token-id tensors) on one model."""
    frames = []
    for domain, chunks in domain_chunks.items():
        df = count_routing(model, chunks, model_name, domain, batch_size=batch_size, progress=progress)
        log.info("%s: %d assignments per layer", domain, int(df[df["layer"] == 0]["assignments"].sum()))
        frames.append(df)
    if not frames:
        raise UserError("no domains to count")
    return pd.concat(frames, ignore_index=True)


def write_counts(counts: pd.DataFrame, out_dir: str | Path, metadata: dict | None = None) -> Path:
    """``out_dir/routing_counts.csv`` (+ ``routing_counts.json`` provenance), each written atomically."""
    from .checkpoint import write_json

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = _write_csv_atomic(counts[COUNT_COLUMNS], out_dir / "routing_counts.csv", float_format=None)
    if metadata is not None:
        write_json(out_dir / "routing_counts.json", metadata)
    return path


# ============================================================================ CLI: routing CKPT
def read_jsonl_texts(files: Sequence[Path]) -> Iterator[str]:
    """The ``text`` field of every record, file by file (``.jsonl`` or ``.jsonl.gz``), streamed."""
    import gzip
    import json

    for path in files:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rt", encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    text = json.loads(line)["text"]
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise UserError(f"{path}:{n} is not a JSON record with a 'text' field") from None
                yield text


def token_chunks(texts: Iterable[str], tokenizer, chunk_len: int, max_tokens: int | None,
                 eos_id: int | None = None, encode_batch: int = 64) -> Iterator:
    """Documents -> token ids (``eos_id`` after each, as in training) -> consecutive ``chunk_len``
    chunks, stopping after ``max_tokens`` tokens (the last chunk may be shorter). Streams: only one
    batch of documents and one chunk are held at a time."""
    import torch

    if chunk_len < 1:
        raise UserError(f"chunk length must be >= 1, got {chunk_len}")
    buffer: list[int] = []
    emitted = 0

    def encoded() -> Iterator[list[int]]:
        batch: list[str] = []
        for text in texts:
            batch.append(text)
            if len(batch) == encode_batch:
                yield from (e.ids for e in tokenizer.encode_batch(batch))
                batch = []
        if batch:
            yield from (e.ids for e in tokenizer.encode_batch(batch))

    for ids in encoded():
        buffer.extend(ids)
        if eos_id is not None:
            buffer.append(eos_id)
        while len(buffer) >= chunk_len:
            take = chunk_len if max_tokens is None else min(chunk_len, max_tokens - emitted)
            yield torch.tensor(buffer[:take], dtype=torch.long)
            emitted += take
            del buffer[:take]
            if max_tokens is not None and emitted >= max_tokens:
                return
    if buffer and (max_tokens is None or emitted < max_tokens):
        take = len(buffer) if max_tokens is None else min(len(buffer), max_tokens - emitted)
        yield torch.tensor(buffer[:take], dtype=torch.long)


def _load_tokenizer(tokenizer_dir: Path, model_vocab: int):
    from tokenizers import Tokenizer

    from .data_pipeline import EOS_TOKEN, check_vocab

    check_vocab(tokenizer_dir, model_vocab)
    tokenizer = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    return tokenizer, tokenizer.token_to_id(EOS_TOKEN)


def _domain_sources(args: argparse.Namespace, ckpt: Path, vocab_size: int, chunk_len: int) -> tuple[dict, dict]:
    """(domain -> iterator of token chunks, provenance) for the test split chosen by the options.

    Text: ``--splits`` (a folder of ``<domain>.jsonl``, or one with ``test/``), else ``--data`` (a
    prepared data directory), else the project's prepared data (:func:`drop_upcycling.data.prepare_all`,
    built or reused). Tokenizer: ``--tokenizer``, else the checkpoint's own, else the prepared one.
    When the tokenizer is the prepared data's, the already tokenized test shards are read
    (:func:`drop_upcycling.data.iter_domain_sequences`, whole windows only); otherwise the test
    documents are tokenized here (:func:`token_chunks`).
    """
    from .data_pipeline import jsonl_files, sha256_file, split_domains

    budget = args.tokens_per_domain
    prepared = None
    if args.splits is None:
        from . import data

        if args.data is not None:
            prepared = data.PreparedData.load(args.data)
        else:
            prepared = data.prepare_all(corpus=args.corpus, cache_dir=args.cache_dir,
                                        vocab_size=args.vocab_size or vocab_size)
    if args.tokenizer is not None:
        tokenizer_dir = args.tokenizer
    elif (ckpt / "tokenizer.json").is_file():
        tokenizer_dir = ckpt
    elif prepared is not None:
        tokenizer_dir = Path(prepared.tokenizer_dir)
    else:
        raise UserError(f"{ckpt} has no tokenizer.json: pass --tokenizer DIR")
    if not (tokenizer_dir / "tokenizer.json").is_file():
        raise UserError(f"{tokenizer_dir} has no tokenizer.json")
    tokenizer, eos_id = _load_tokenizer(tokenizer_dir, vocab_size)
    tok_sha = sha256_file(tokenizer_dir / "tokenizer.json")
    meta = {"tokenizer": str(tokenizer_dir.resolve()), "tokenizer_sha256": tok_sha}

    if prepared is not None:
        domains = list(args.domains or prepared.domains)
        unknown = [d for d in domains if d not in prepared.domains]
        if unknown:
            raise UserError(f"unknown domain(s) {', '.join(unknown)} (prepared data has {', '.join(prepared.domains)})")
        meta["data"] = str(Path(prepared.root).resolve())
        if tok_sha == sha256_file(Path(prepared.tokenizer_dir) / "tokenizer.json"):
            from .data import iter_domain_sequences

            meta["source"] = "prepared test shards"
            return {d: iter_domain_sequences(prepared, "test", d, chunk_len, max_tokens=budget) for d in domains}, meta
        from .data import iter_documents

        meta["source"] = "prepared test documents, tokenized with the checkpoint's tokenizer"
        return {d: token_chunks(iter_documents(prepared, "test", d), tokenizer, chunk_len, budget, eos_id)
                for d in domains}, meta

    split_dir = args.splits / "test" if (args.splits / "test").is_dir() else args.splits
    if not split_dir.is_dir():
        raise UserError(f"{split_dir} is not a directory of <domain>.jsonl files")
    domains = list(args.domains or split_domains(split_dir))
    missing = [d for d in domains if not jsonl_files(split_dir, d)]
    if missing or not domains:
        raise UserError(f"{split_dir} has no <domain>.jsonl for: {', '.join(missing) or 'any domain'}")
    meta.update(source="JSONL documents", split_dir=str(split_dir.resolve()))
    return {d: token_chunks(read_jsonl_texts(jsonl_files(split_dir, d)), tokenizer, chunk_len, budget, eos_id)
            for d in domains}, meta


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", type=Path, metavar="CKPT", help="a Mixtral (MoE) checkpoint directory")
    parser.add_argument("--out", required=True, type=Path, help="output directory (routing_counts.csv/.json)")
    parser.add_argument("--tokens-per-domain", type=int, default=DEFAULT_TOKENS_PER_DOMAIN,
                        help=f"tokens fed per domain (default {DEFAULT_TOKENS_PER_DOMAIN:,}, as in the released counts)")
    parser.add_argument("--tokenizer", type=Path, metavar="DIR",
                        help="tokenizer dir (default: the checkpoint's, else the prepared data's)")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--data", type=Path, metavar="DIR",
                        help="a prepared data directory (drop-upcycling data ...); its test split is used")
    source.add_argument("--splits", type=Path, metavar="DIR",
                        help="a folder of <domain>.jsonl test documents (or one holding test/)")
    parser.add_argument("--corpus", type=Path, metavar="DIR",
                        help="corpus folder, when neither --data nor --splits is given (data is prepared once, cached)")
    parser.add_argument("--cache-dir", type=Path, metavar="DIR", help="cache for the prepared data")
    parser.add_argument("--vocab-size", type=int,
                        help="tokenizer size when preparing data (default: the model's vocab, as training does)")
    parser.add_argument("--domains", nargs="+", help="domains to count (default: every domain of the split)")
    parser.add_argument("--chunk-len", type=int, default=DEFAULT_CHUNK,
                        help="tokens per forward pass (default 2048, capped at the model's max positions)")
    parser.add_argument("--batch-size", type=int, default=1, help="chunks per forward pass")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    parser.add_argument("--model-name", help="the model column (default: the checkpoint folder's name)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing routing_counts.csv")


def run(args: argparse.Namespace) -> int:
    import torch

    from . import __version__
    from .checkpoint import CheckpointReader, load_model
    from .parallel import resolve_device

    if args.tokens_per_domain < 1:
        raise UserError(f"--tokens-per-domain must be >= 1, got {args.tokens_per_domain}")
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.chunk_len < 1:
        raise UserError(f"--chunk-len must be >= 1, got {args.chunk_len}")
    if args.vocab_size is not None and args.vocab_size < 1:
        raise UserError(f"--vocab-size must be >= 1, got {args.vocab_size}")
    device = resolve_device(args.device)
    if (args.out / "routing_counts.csv").exists() and not args.overwrite:
        raise UserError(f"{args.out / 'routing_counts.csv'} exists (pass --overwrite to replace it)")
    cfg = CheckpointReader(args.checkpoint).config
    if not cfg.is_moe:
        raise UserError(f"{args.checkpoint} is a dense model: routing counts need a MoE checkpoint")
    chunk_len = chunk_length(cfg, args.chunk_len)
    chunks, source_meta = _domain_sources(args, args.checkpoint, cfg.vocab_size, chunk_len)
    name = args.model_name or args.checkpoint.resolve().name
    model = load_model(args.checkpoint, dtype=getattr(torch, args.dtype), device=device).eval()
    log.info("counting %s: %d domains x %d tokens in %d-token chunks (%s)", name, len(chunks),
             args.tokens_per_domain, chunk_len, source_meta["source"])
    counts = count_checkpoint(model, chunks, name, batch_size=args.batch_size)
    per_layer = counts[counts["layer"] == 0].groupby("domain")["assignments"].sum() // cfg.num_experts_per_tok
    tokens = {d: int(per_layer[d]) for d in chunks}
    short = {d: n for d, n in tokens.items() if n < args.tokens_per_domain}
    if short:
        log.warning("fewer tokens than requested (test split too small or whole windows only): %s", short)
    meta = {
        "model": name, "checkpoint": str(args.checkpoint.resolve()), "num_experts": cfg.num_experts,
        "top_k": cfg.num_experts_per_tok, "num_layers": cfg.num_hidden_layers, "chunk_len": chunk_len,
        "tokens_per_domain_requested": args.tokens_per_domain, "tokens_per_domain": tokens,
        **source_meta, "dtype": args.dtype, "drop_upcycling_version": __version__,
    }
    path = write_counts(counts, args.out, meta)
    print(f"wrote {path} ({len(counts)} rows); next: drop-upcycling analyze routing --counts {path} --out DIR")
    return 0
