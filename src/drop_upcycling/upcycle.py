"""Build a Mixtral-style MoE from dense Llama checkpoint(s) by every method the paper compares.

Methods (FACTS.md §1): ``scratch`` (FS), ``naive`` (NU, r = 0), ``noise`` (RNU: add N(0, 0.02) to a
fraction r of the neurons), ``drop`` (Drop-Upcycling: re-initialize a fraction r of the neurons from
the dense weights' statistics) and ``btx`` (Branch-Train-MiX: expert e is source e // (E/4)'s FFN,
non-FFN weights are the mean of the 4 sources).

The method names are the ``upcycle`` column of :data:`drop_upcycling.methods.METHODS`. Each method
that builds experts from the dense FFN is a small function with one signature, ``(dense FFN,
ExpertKey, options) -> expert FFN``, registered in :data:`EXPERT_FNS` under its name; ``scratch``
(nothing from the dense model) and ``btx`` (whole FFNs of four sources) are the two that are not.
The streaming reader/writer around them is written once (:func:`upcycle`). Tensors are read one at
a time with plain reads (:class:`~drop_upcycling.checkpoint.CheckpointReader`: a mapped source would
stay in resident memory) and written as they are built (:class:`~drop_upcycling.checkpoint.PlannedWriter`,
its writes overlapping the building on a second core), one layer of experts at a time, into a temp dir
renamed at the end. Names and shapes come from the config
(:func:`~drop_upcycling.checkpoint.hf_tensor_shapes`), not from a model on the meta device.

Every random draw comes from a generator keyed by (seed, purpose, layer, expert, matrix), so the
output does not depend on processing order, sharding or a later expert-parallel layout. ``scratch``
draws exactly what :meth:`drop_upcycling.model.CausalLM.init_weights` draws for the same seed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from tqdm import tqdm

from . import __version__
from .checkpoint import (
    DTYPES,
    CheckpointReader,
    PlannedWriter,
    StoredTensor,
    copy_tokenizer_files,
    hf_dense_ffn_name,
    hf_expert_name,
    hf_tensor_shapes,
    write_config,
)
from .configs import ModelConfig
from .errors import UserError
from .fsio import atomic_dir, refusal, write_json
from .methods import MOE_METHODS, RATIO_UPCYCLE_METHODS, UPCYCLE_METHODS
from .model import init_tensor, keyed_generator

log = logging.getLogger(__name__)

ROUTER_INITS = ("torch_rand_002", "torch_rand", "torch_rand_mean0", "torch_normal_002", "torch_normal_028")
INDEX_MODES = ("per-matrix", "shared")
STATS_MODES = ("dropped", "full")
BTX_SOURCES = 4
MATRICES = ("w1", "w2", "w3")  # gate, down, up: HF Mixtral expert names
NEURON_AXIS = {"w1": 0, "w2": 1, "w3": 0}  # w1/w3 are [F, D] (rows), w2 is [D, F] (columns)
DENSE_PROJ = {"w1": "gate_proj", "w2": "down_proj", "w3": "up_proj"}


@dataclass(frozen=True)
class UpcycleOptions:
    """Everything that determines the output, recorded in ``OUT/upcycling.json``."""

    method: str = "drop"
    ratio: float = 0.5
    num_experts: int = 8
    top_k: int = 2
    seed: int = 0
    router_init: str = "torch_rand_002"
    index_mode: str = "per-matrix"
    stats: str = "dropped"
    dtype: str = "auto"
    noise_std: float = 0.02

    def validate(self) -> None:
        _choice("method", self.method, UPCYCLE_METHODS)
        _choice("router init", self.router_init, ROUTER_INITS)
        _choice("index mode", self.index_mode, INDEX_MODES)
        _choice("stats", self.stats, STATS_MODES)
        _choice("dtype", self.dtype, ("auto", *DTYPES))
        if not (0.0 <= self.ratio <= 1.0) or math.isnan(self.ratio):
            raise UserError(f"ratio must be in [0, 1], got {self.ratio}")
        if self.num_experts < 1:
            raise UserError(f"number of experts must be >= 1, got {self.num_experts}")
        if not 1 <= self.top_k <= self.num_experts:
            raise UserError(f"top-k must be between 1 and the number of experts ({self.num_experts}), got {self.top_k}")
        if self.method == "btx" and self.num_experts % BTX_SOURCES:
            raise UserError(f"btx needs a number of experts divisible by {BTX_SOURCES}, got {self.num_experts}")
        if not (math.isfinite(self.noise_std) and self.noise_std >= 0):
            raise UserError(f"noise std must be a finite number >= 0, got {self.noise_std}")


def _choice(what: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise UserError(f"{what} must be one of {', '.join(choices)}, got {value!r}")


# ---------------------------------------------------------------------------- the methods
class FFN(NamedTuple):
    """One SwiGLU FFN in HF orientation: w1 = gate [F, D], w2 = down [D, F], w3 = up [F, D].

    Held in the output dtype, so that building an expert costs one copy of it; statistics and random
    draws are computed in fp32."""

    w1: torch.Tensor
    w2: torch.Tensor
    w3: torch.Tensor


@dataclass(frozen=True)
class ExpertKey:
    seed: int
    layer: int
    expert: int

    def generator(self, purpose: str, matrix: str) -> torch.Generator:
        return keyed_generator(self.seed, purpose, self.layer, self.expert, matrix)


def neuron_indices(key: ExpertKey, matrix: str, d_ff: int, ratio: float, index_mode: str) -> torch.Tensor:
    """The int(ratio * d_ff) neurons re-initialized in one matrix of one expert.

    ``per-matrix`` draws an independent set per matrix (the released code and checkpoints);
    ``shared`` draws one set per expert used by w1, w2 and w3 alike (the paper's text).
    """
    count = int(ratio * d_ff)
    which = matrix if index_mode == "per-matrix" else "shared"
    return torch.randperm(d_ff, generator=key.generator("index", which))[:count]


def _assign(t: torch.Tensor, axis: int, idx: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    out = t.clone()
    out.index_copy_(axis, idx, values)
    return out


def _slice_shape(t: torch.Tensor, axis: int, n: int) -> tuple[int, ...]:
    shape = list(t.shape)
    shape[axis] = n
    return tuple(shape)


def naive_expert(ffn: FFN, key: ExpertKey, opts: UpcycleOptions) -> FFN:
    """Sparse Upcycling: every expert is an exact copy of the dense FFN (the very tensors: nothing
    downstream modifies them, and copying 8 experts per layer only cost time)."""
    return ffn


def _mean_std(t: torch.Tensor) -> tuple[float, float]:
    """``np.mean`` and ``np.std(ddof=1)`` of ``t`` in float64, bit for bit, in one pass fewer.

    numpy's single-threaded pairwise sums, because torch's multi-threaded CPU reductions can differ
    in the last bit from run to run under load, which would change every sample drawn from N(mean,
    std): the same seed must give the same bytes. ``np.std`` sums the data again for the mean; this
    is its computation (``numpy/_core/_methods.py: _var``) with that sum shared, about a fifth faster;
    a test checks it equals ``np.mean``/``np.std`` bit for bit.
    """
    a = t.float().numpy()
    total = np.add.reduce(a, axis=None, dtype=np.float64, keepdims=True)
    mean = np.true_divide(total, a.size, out=total)
    if a.size < 2:
        return float(mean.item()), 0.0
    dev = np.subtract(a, mean, dtype=np.float64)
    np.square(dev, out=dev)
    var = np.add.reduce(dev, axis=None, dtype=np.float64) / (a.size - 1)
    return float(mean.item()), float(np.sqrt(var))


def drop_expert(ffn: FFN, key: ExpertKey, opts: UpcycleOptions) -> FFN:
    """Drop-Upcycling: overwrite int(r * d_ff) neurons per matrix with N(mu, sigma) of the dense weights.

    mu/sigma are one scalar pair per matrix per expert: of the replaced slice (``stats=dropped``, the
    released code) or of the whole dense matrix (``stats=full``). Samples are drawn in fp32 and cast
    to the checkpoint dtype.
    """
    d_ff = ffn.w1.shape[0]
    out = {}
    for m in MATRICES:
        dense, axis = getattr(ffn, m), NEURON_AXIS[m]
        idx = neuron_indices(key, m, d_ff, opts.ratio, opts.index_mode)
        if idx.numel() == 0:
            out[m] = dense.clone()
            continue
        reference = dense
        if opts.stats == "dropped":  # bf16 columns (w2) gather 3x faster as fp32; rows gather fine as they are
            reference = (dense.float() if axis else dense).index_select(axis, idx)
        mean, std = _mean_std(reference)
        if not (math.isfinite(mean) and math.isfinite(std)):  # torch.normal would fail with a traceback
            raise UserError(f"{hf_dense_ffn_name(key.layer, DENSE_PROJ[m])} of the dense model holds NaN or "
                            f"infinite values (mean {mean}, std {std}): no statistics to draw neurons from")
        fresh = torch.empty(_slice_shape(dense, axis, idx.numel())).normal_(mean, std, generator=key.generator("drop", m))
        out[m] = _assign(dense, axis, idx, fresh.to(dense.dtype))
    return FFN(**out)


def noise_expert(ffn: FFN, key: ExpertKey, opts: UpcycleOptions) -> FFN:
    """Random noise upcycling (RNU): ADD N(0, noise_std) to int(r * d_ff) neurons per matrix."""
    d_ff = ffn.w1.shape[0]
    out = {}
    for m in MATRICES:
        dense, axis = getattr(ffn, m), NEURON_AXIS[m]
        idx = neuron_indices(key, m, d_ff, opts.ratio, opts.index_mode)
        noise = torch.empty(_slice_shape(dense, axis, idx.numel())).normal_(0.0, opts.noise_std,
                                                                            generator=key.generator("noise", m))
        out[m] = _assign(dense, axis, idx, (dense.index_select(axis, idx).float() + noise).to(dense.dtype))
    return FFN(**out)


ExpertFn = Callable[[FFN, ExpertKey, UpcycleOptions], FFN]
# Keyed by the method table's ``upcycle`` names: a new way to build experts from the dense FFN is a
# table row and its function here.
EXPERT_FNS: dict[str, ExpertFn] = {"naive": naive_expert, "drop": drop_expert, "noise": noise_expert}


def router_weights(method: str, num_experts: int, dim: int, seed: int, layer: int) -> torch.Tensor:
    """A fresh [E, D] router, as the released conversion scripts initialize it (FACTS.md §1.2)."""
    g = keyed_generator(seed, "router", layer)
    shape = (num_experts, dim)
    if method == "torch_rand":
        return torch.rand(shape, generator=g)
    if method == "torch_rand_mean0":
        w = torch.rand(shape, generator=g)
        return w - w.mean()
    if method == "torch_rand_002":
        w = torch.rand(shape, generator=g)
        return (w - w.mean()) * 0.02 * math.sqrt(12)
    if method == "torch_normal_002":
        return torch.empty(shape).normal_(0.0, 0.02, generator=g)
    if method == "torch_normal_028":
        return torch.empty(shape).normal_(0.0, 1 / math.sqrt(12), generator=g)
    raise UserError(f"unknown router init {method!r}")


# ---------------------------------------------------------------------------- sources
class Sources:
    """The dense checkpoint(s) to read: one for most methods, four for BTX. Validated before any work."""

    def __init__(self, paths: list[Path], dense_cfg: ModelConfig | None = None) -> None:
        self.readers = [CheckpointReader(p) for p in paths]
        for r in self.readers:
            if r.config.is_moe or r.config_dict.get("model_type") != "llama":
                raise UserError(
                    f"{r.path} is a {r.config_dict.get('model_type')!r} checkpoint; the source must be a dense Llama"
                )
        first = self.readers[0].config
        for r in self.readers[1:]:
            if r.config.replace(name=first.name) != first:
                raise UserError(f"{r.path} has a different shape from {self.readers[0].path}; btx sources must match")
        self.config = dense_cfg or first.replace(name=self.readers[0].path.name)
        self._expected = hf_tensor_shapes(self.config)
        self.check_tensors()

    def check_tensors(self) -> None:
        """Every expected tensor present with the right shape (from the headers: no data read)."""
        for r in self.readers:
            for name, shape in self._expected.items():
                got = r.shape(name)
                if got != shape:
                    raise UserError(f"tensor {name} in {r.path} has shape {got}, expected {shape}")

    def mean(self, name: str) -> torch.Tensor | StoredTensor:
        """The tensor averaged over sources (in fp32); for a single source, where it is stored: the
        writer copies it file to file, without it ever being in memory."""
        shape = self._expected[name]
        if len(self.readers) == 1:
            return self.readers[0].stored(name, shape)
        return torch.stack([r.get(name, shape, torch.float32) for r in self.readers]).mean(dim=0)

    def ffn(self, layer: int, dtype: torch.dtype, source: int = 0) -> FFN:
        names = [hf_dense_ffn_name(layer, DENSE_PROJ[m]) for m in MATRICES]
        return FFN(*(self.readers[source].get(n, self._expected[n], dtype) for n in names))

    def dtype(self) -> torch.dtype:
        return self.readers[0].dtype()

    def tokenizer_dir(self) -> Path:
        return self.readers[0].path


# ---------------------------------------------------------------------------- the conversion
@dataclass
class UpcycleSummary:
    source: list[str]
    out: str
    dense: dict
    moe: dict
    total_params: int
    active_params: int
    output_bytes: int
    dtype: str
    options: dict

    def lines(self) -> list[str]:
        m = self.moe
        return [
            f"source       {', '.join(self.source)}",
            f"output       {self.out}",
            f"method       {self.options['method']} (ratio {self.options['ratio']}, seed {self.options['seed']}, "
            f"router {self.options['router_init']}, index {self.options['index_mode']}, stats {self.options['stats']})",
            f"shape        {m['num_hidden_layers']} layers, hidden {m['hidden_size']}, ffn {m['intermediate_size']}, "
            f"{m['num_experts']} experts top-{m['num_experts_per_tok']}, vocab {m['vocab_size']}",
            f"parameters   {_count(self.total_params)} total, {_count(self.active_params)} active per token",
            f"output size  {self.output_bytes / 1e6:,.1f} MB ({self.dtype})",
        ]


def _count(n: int) -> str:
    return f"{n / 1e9:.3f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"


def upcycle(
    src: str | Path | None,
    out: str | Path,
    opts: UpcycleOptions,
    *,
    sources: list[str | Path] | None = None,
    overwrite: bool = False,
    dry_run: bool = False,
    max_shard_bytes: int = 1024**3,
    progress: bool = True,
) -> UpcycleSummary:
    """Convert dense checkpoint ``src`` (or four ``sources`` for btx) into an MoE checkpoint at ``out``."""
    opts.validate()
    paths = _source_paths(src, sources, opts.method)
    out = Path(out)
    if any(out.resolve() == p.resolve() for p in paths):
        raise UserError(f"output {out} is the same directory as a source")
    problem = None if dry_run else refusal(out, overwrite)  # early; atomic_dir checks again under the lock
    if problem:
        raise UserError(problem)
    srcs = Sources(paths)
    moe_cfg = srcs.config.as_moe(opts.num_experts, opts.top_k)
    dtype = srcs.dtype() if opts.dtype == "auto" else DTYPES[opts.dtype]
    counts = moe_cfg.param_counts()
    summary = UpcycleSummary(
        source=[str(p) for p in paths], out=str(out), dense=asdict(srcs.config), moe=asdict(moe_cfg),
        total_params=counts["total"], active_params=counts["active"],
        output_bytes=counts["total"] * torch.empty(0, dtype=dtype).element_size(),
        dtype=str(dtype).removeprefix("torch."), options=asdict(opts),
    )
    if dry_run:
        return summary
    with atomic_dir(out, overwrite=overwrite, what="upcycle") as tmp, _one_thread():
        with PlannedWriter(tmp, tensor_plan(moe_cfg), dtype, max_shard_bytes) as writer:
            for name, tensor in _moe_tensors(srcs, moe_cfg, opts, dtype, progress):
                writer.add(name, tensor)
            writer.close()
        write_config(tmp, moe_cfg, dtype)
        copy_tokenizer_files(srcs.tokenizer_dir(), tmp)
        write_json(tmp / "upcycling.json", {**asdict(summary), "drop_upcycling_version": __version__,
                                             "torch_version": torch.__version__})
    log.info("wrote %s (%.1f MB)", out, writer.total_bytes / 1e6)
    return summary


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """Run the conversion on one intra-op thread: it is memory-bound copying and sampling, and with
    two threads on a busy 2-core machine torch's thread hand-offs made it 1.5x slower (measured)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _source_paths(src: str | Path | None, sources: list[str | Path] | None, method: str) -> list[Path]:
    if method == "btx":
        if src is not None:
            raise UserError("btx takes its dense models from --sources; pass only OUT as a positional argument")
        if not sources or len(sources) != BTX_SOURCES:
            raise UserError(f"btx needs exactly {BTX_SOURCES} dense checkpoints in --sources, got {len(sources or [])}")
        return [Path(s) for s in sources]
    if sources:
        raise UserError(f"--sources is only for btx, not {method}")
    if src is None:
        raise UserError(f"{method} needs a source checkpoint SRC")
    return [Path(src)]


def tensor_plan(cfg: ModelConfig) -> list[tuple[str, tuple[int, ...]]]:
    """Every HF tensor of the MoE in the order :func:`_moe_tensors` produces it: embeddings, final norm
    and LM head, then per layer its attention, norms and router, then experts 0..E-1 (w1, w2, w3)."""
    shapes = hf_tensor_shapes(cfg)
    plan = [(n, s) for n, s in shapes.items() if not n.startswith("model.layers.")]
    for layer in range(cfg.num_hidden_layers):
        prefix = f"model.layers.{layer}."
        plan += [(n, s) for n, s in shapes.items() if n.startswith(prefix) and ".experts." not in n]
        plan += [(n, shapes[n]) for e in range(cfg.num_experts) for n in
                 (hf_expert_name(layer, e, m) for m in MATRICES)]
    return plan


def _moe_tensors(srcs: Sources, cfg: ModelConfig, opts: UpcycleOptions, dtype: torch.dtype,
                 progress: bool) -> Iterator[tuple[str, torch.Tensor | StoredTensor]]:
    """Yield every HF tensor of the MoE in :func:`tensor_plan` order, one layer of experts at a time."""
    plan = tensor_plan(cfg)
    for name, shape in plan:
        if not name.startswith("model.layers."):  # embeddings, final norm, LM head
            yield name, _non_ffn(srcs, cfg, opts, name, shape)
    for layer in tqdm(range(cfg.num_hidden_layers), desc=f"upcycle ({opts.method})", unit="layer",
                      disable=not progress):
        prefix = f"model.layers.{layer}."
        for name, shape in plan:
            if not name.startswith(prefix) or ".experts." in name:
                continue
            if name.endswith("block_sparse_moe.gate.weight"):
                yield name, _router(cfg, opts, layer, name)
            else:
                yield name, _non_ffn(srcs, cfg, opts, name, shape)
        yield from _experts(srcs, cfg, opts, layer, dtype)


def _non_ffn(srcs: Sources, cfg: ModelConfig, opts: UpcycleOptions, name: str,
             shape: tuple[int, ...]) -> torch.Tensor | StoredTensor:
    if opts.method == "scratch":
        return init_tensor(name, shape, cfg, opts.seed)
    return srcs.mean(name)  # a copy for one source, the average of the four for btx


def _router(cfg: ModelConfig, opts: UpcycleOptions, layer: int, name: str) -> torch.Tensor:
    if opts.method == "scratch":  # HF's default init, like every other from-scratch tensor
        return init_tensor(name, (cfg.num_experts, cfg.hidden_size), cfg, opts.seed)
    return router_weights(opts.router_init, cfg.num_experts, cfg.hidden_size, opts.seed, layer)


def _experts(srcs: Sources, cfg: ModelConfig, opts: UpcycleOptions, layer: int,
             dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    if opts.method == "scratch":
        for e in range(cfg.num_experts):
            for m in MATRICES:
                stacked = f"model.layers.{layer}.block_sparse_moe.experts.{m}"
                shape = (1, cfg.hidden_size, cfg.intermediate_size) if m == "w2" else (1, cfg.intermediate_size, cfg.hidden_size)
                yield hf_expert_name(layer, e, m), init_tensor(stacked, shape, cfg, opts.seed, expert_offset=e)[0]
        return
    if opts.method == "btx":
        per_source = cfg.num_experts // BTX_SOURCES
        for e in range(cfg.num_experts):
            ffn = srcs.ffn(layer, dtype, source=e // per_source)
            for m in MATRICES:
                yield hf_expert_name(layer, e, m), getattr(ffn, m)
        return
    dense = srcs.ffn(layer, dtype)
    make = EXPERT_FNS[opts.method]
    for e in range(cfg.num_experts):
        expert = make(dense, ExpertKey(opts.seed, layer, e), opts)
        for m in MATRICES:
            yield hf_expert_name(layer, e, m), getattr(expert, m)


# ---------------------------------------------------------------------------- CLI
def configure_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("paths", nargs="+", metavar="[SRC] OUT",
                   help="dense Llama checkpoint dir and output dir (btx: only OUT, sources via --sources)")
    p.add_argument("--method", default="drop", choices=UPCYCLE_METHODS, help=_method_help())
    p.add_argument("--ratio", type=float, default=None,
                   help="fraction r of FFN neurons re-initialized (drop) or perturbed (noise); default 0.5")
    p.add_argument("--num-experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--router-init", default="torch_rand_002", choices=ROUTER_INITS,
                   help="router initialization (not used by scratch, which uses HF's normal(0, 0.02))")
    p.add_argument("--index-mode", default="per-matrix", choices=INDEX_MODES,
                   help="per-matrix: independent neuron sets for w1/w2/w3 (released checkpoints); "
                        "shared: one set per expert (paper text)")
    p.add_argument("--stats", default="dropped", choices=STATS_MODES,
                   help="statistics of the replaced slice (dropped, released code) or the whole matrix (full)")
    p.add_argument("--noise-std", type=float, default=0.02, help="std of the noise added by --method noise")
    p.add_argument("--dtype", default="auto", choices=("auto", *DTYPES), help="output dtype; auto = source dtype")
    p.add_argument("--sources", nargs="+", default=None, metavar="DIR", help="btx: the four dense checkpoints")
    p.add_argument("--max-shard-size", type=float, default=1.0, metavar="GB", help="max shard size in GB")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.add_argument("--dry-run", action="store_true", help="print shapes, parameters and output size; write nothing")


def _method_help() -> str:
    """``scratch (FS), naive (NU), ...``: each --method with the key prefix of the methods it builds."""
    first = {}
    for m in MOE_METHODS:
        first.setdefault(m.upcycle, m.prefix)
    return ", ".join(f"{name} ({prefix})" for name, prefix in first.items()) + "; default drop"


def run(args: argparse.Namespace) -> int:
    if len(args.paths) > 2:
        raise UserError(f"expected SRC OUT, got {len(args.paths)} paths")
    src, out = (None, args.paths[0]) if len(args.paths) == 1 else args.paths
    if not (math.isfinite(args.max_shard_size) and args.max_shard_size > 0):
        raise UserError(f"--max-shard-size must be a positive number of GB, got {args.max_shard_size}")
    if args.ratio is not None and args.method not in RATIO_UPCYCLE_METHODS:
        raise UserError(f"--ratio applies to {' and '.join(sorted(RATIO_UPCYCLE_METHODS))}, not {args.method}")
    default_ratio = 0.5 if args.method in RATIO_UPCYCLE_METHODS else 0.0
    opts = UpcycleOptions(
        method=args.method, ratio=default_ratio if args.ratio is None else args.ratio, num_experts=args.num_experts,
        top_k=args.top_k, seed=args.seed, router_init=args.router_init, index_mode=args.index_mode,
        stats=args.stats, dtype=args.dtype, noise_std=args.noise_std,
    )
    summary = upcycle(src, out, opts, sources=args.sources, overwrite=args.overwrite, dry_run=args.dry_run,
                      max_shard_bytes=int(args.max_shard_size * 1e9))
    print("\n".join(summary.lines()))
    if args.dry_run:
        problem = refusal(out, args.overwrite)
        print("dry run: nothing written" + (f"; the real run would refuse: {problem}" if problem else ""))
        print(json.dumps({"total_params": summary.total_params, "active_params": summary.active_params,
                          "output_bytes": summary.output_bytes, "would_refuse": problem}))
    return 0
