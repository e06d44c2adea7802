"""The trainer: dense or MoE, data x expert parallel, resumable bit for bit.

``torchrun --nproc_per_node=N -m drop_upcycling.train CONFIG.yaml [--ep N] [--steps N] [--out DIR]
[--save-every N] [--resume]`` (or ``drop-upcycling train ...``). Each of the ``N = dp_size * ep_size``
ranks reads its own tokens; under expert parallelism each rank holds ``E / ep_size`` experts and MoE
layers exchange tokens with :class:`~drop_upcycling.moe.AllToAllDispatcher` (see :mod:`.parallel`).

A step (:meth:`Trainer.train_step`): ``accum`` micro-batches forward/backward, gradient reduction
over the two groups, clipping by the global norm, AdamW (FACTS.md §4: betas 0.9/0.95, eps 1e-8,
weight decay 0.1 on matrices, and on norm weights with ``weight_decay_1d``), linear warmup then cosine
to ``min_lr``. With ``param_dtype: bf16`` the model holds bf16 weights and AdamW updates an fp32
master copy (:class:`MasterWeights`). ``zero_stage`` 1 or 2 shards the AdamW state, the fp32 weights
(and at 2 the summed gradients) over the ranks that replicate them (:mod:`drop_upcycling.sharding`);
``activation_checkpointing`` recomputes each decoder layer in the backward. One JSON line per step
goes to ``OUT/metrics.jsonl``.

Checkpoints go to ``OUT/checkpoints/step-XXXXXXXX`` with a ``latest`` pointer, keeping the last K;
each is an HF model plus the trainer's state, in the format :mod:`drop_upcycling.checkpoint` writes
and reads (:func:`~drop_upcycling.checkpoint.save_checkpoint`). ``--dry-run`` prints the plan of
:mod:`drop_upcycling.memory` (layout, peak memory per GPU, FLOPs; ``--format json``: one JSON object)
instead of training.

The run folder holds one run: rank 0 claims it (:func:`drop_upcycling.fsio.claim`) for the whole
run, a folder with history is only continued (``--resume``, from the newest complete checkpoint,
with the same config unless ``--allow-config-change``) or explicitly discarded (``--restart``),
never silently started over. ``drop-upcycling train --nproc N`` runs torchrun itself and ends with
the failing rank's one-line error.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import dataclasses
import json
import logging
import math
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch.profiler import record_function

from .checkpoint import (
    checkpoint_problem,
    load_checkpoint,
    load_model,
    save_checkpoint,
    sharding_problem,
    training_state,
)
from .configs import ModelConfig, TrainConfig
from .errors import UserError
from .fsio import claim, make_parent, remove_orphans, truncate_jsonl, write_json, write_text, writing
from .heldout import HELDOUT_SPLIT, HeldoutSet, due, evaluate_heldout, load_heldout
from .layout import CHECKPOINTS, HELDOUT, LATEST, METRICS, RUN_JSON, checkpoint_dir
from .model import CausalLM, causal_lm_loss, compile_for_training
from .moe import AllToAllDispatcher
from .parallel import (
    ParallelEnv,
    accumulation_steps,
    all_reduce_mean,
    clip_gradients,
    init_parallel,
    reduce_gradients,
    validate_layout,
)
from .sharding import ZeroSharding

if TYPE_CHECKING:
    from .data import TokenSequenceReader

log = logging.getLogger(__name__)


# ============================================================================ data, model and optimizer
def build_reader(run: TrainConfig, cfg: ModelConfig, rank: int, world_size: int
                 ) -> tuple[TokenSequenceReader, Path | None]:
    """(reader of this rank's sequences, tokenizer dir for the checkpoints) over what ``run.data`` names:
    token shards built by ``drop-upcycling data tokenize`` (``shards: DIR``, checked against their
    manifest) or the built-in corpus, prepared into the data cache on first use (tokenizer + shards).

    Either way the data's tokenizer must be the init checkpoint's (when it has one) and its ids must fit
    the model, or the run stops here in one line; rank 0 says how often the run repeats the data when
    its budget exceeds it.
    """
    from . import data as data_mod

    data = run.data  # the fields were checked where the config was read (configs.DATA_SPECS)
    weights = data.get("weights")
    domains = list(weights) if weights else None
    source = data_source(run, cfg)
    if data.get("shards") is not None:
        shards = source
        files = shards.files_by_domain(data.get("split", "train"), domains)
        shards.check_fits(cfg.vocab_size, run.init, files)
        tokenizer_dir = shards.tokenizer_dir or _init_tokenizer_dir(run.init)
    else:
        prepared = source
        data_mod.check_vocab(prepared.tokenizer_dir, cfg.vocab_size)
        data_mod.check_init_tokenizer(prepared.tokenizer_sha256, f"the corpus's tokenizer {prepared.tokenizer_dir}",
                                      run.init)
        files = prepared.files_by_domain(data.get("split", "train"), domains)
        tokenizer_dir = Path(prepared.tokenizer_dir)
    reader = data_mod.TokenSequenceReader(files, run.seq_len, weights=weights, seed=run.seed, rank=rank,
                                          world_size=world_size)
    note = data_mod.epochs_note(reader, run.total_steps * (run.global_batch_tokens // run.seq_len))
    if note and rank == 0:
        log.warning(note)
    return reader, tokenizer_dir


def data_source(run: TrainConfig, cfg: ModelConfig):
    """What ``run.data`` names: a :class:`~drop_upcycling.data.TokenShards` folder, or the built-in corpus
    as a :class:`~drop_upcycling.data.PreparedData` (prepared into the data cache on first use)."""
    from . import data as data_mod

    data = run.data
    if data.get("shards") is not None:
        return data_mod.TokenShards.load(data["shards"])
    return data_mod.prepare_all(corpus=data.get("corpus"), cache_dir=data.get("cache_dir"),
                                vocab_size=data.get("vocab_size", cfg.vocab_size), seed=data.get("seed", 0),
                                max_docs_per_domain=data.get("max_docs_per_domain"), pinned=data.get("pinned", True))


def build_heldout(run: TrainConfig, cfg: ModelConfig, rank: int, world_size: int) -> HeldoutSet | None:
    """This rank's share of the fixed held-out sequences (:mod:`drop_upcycling.heldout`), when the run asks."""
    if not run.heldout_every_tokens:
        return None
    weights = run.data.get("weights")
    files = data_source(run, cfg).files_by_domain(HELDOUT_SPLIT, list(weights) if weights else None)
    return load_heldout(files, run.seq_len, run.heldout_sequences, rank, world_size)


def _init_tokenizer_dir(init: str | None) -> Path | None:
    """The init checkpoint, when it carries a tokenizer (for the checkpoints of a run from shards without one)."""
    return Path(init) if init is not None and (Path(init) / "tokenizer.json").is_file() else None


def _expert_slice(cfg: ModelConfig, env: ParallelEnv) -> dict[str, Any]:
    """The :class:`~drop_upcycling.model.CausalLM` arguments that make it hold this rank's experts."""
    num_local = cfg.num_experts // env.ep_size if cfg.is_moe else None
    return {
        "num_local": num_local,
        "expert_offset": env.ep_rank * num_local if cfg.is_moe else 0,
        "dispatcher": AllToAllDispatcher(cfg.num_experts, env.expert_pg) if cfg.is_moe and env.ep_size > 1 else None,
    }


def build_model(cfg: ModelConfig, run: TrainConfig, env: ParallelEnv) -> CausalLM:
    """This rank's model: its slice of the experts, read from ``run.init`` or drawn from ``run.seed``."""
    expert_slice = _expert_slice(cfg, env)
    if run.init is None:
        model = CausalLM(cfg, **expert_slice)
        model.init_weights(run.seed)
        return model.to(env.device)
    model = load_model(run.init, device=env.device, **expert_slice)
    if model.config != cfg:
        raise UserError(f"checkpoint {run.init} has a different model shape than the run")
    return model


def build_optimizer(model: torch.nn.Module, run: TrainConfig) -> torch.optim.AdamW:
    """AdamW over ``model``'s parameters (the fp32 master's under ``param_dtype: bf16``).

    Weight decay on matrices; on the 1-D parameters (the RMSNorm weights; the model has no biases) only
    with ``run.weight_decay_1d``. Exempting them is what HF Trainer and Megatron do, and our default;
    moe-recipes, the authors' trainer, builds ``torch.optim.AdamW(model.parameters(), weight_decay=...)``
    and so decays every parameter, which the paper recipes reproduce. Both groups always exist, so the
    optimizer's layout (and a checkpoint's) does not depend on the choice.

    ``run.adamw_impl``: ``"loop"`` is torch's single-tensor loop (``foreach`` is bitwise the same and
    no faster on CPU); ``"fused"`` is torch's fused kernel, equal to the loop to fp32 rounding and
    about 3x faster on CPU, where the loop takes 6-13% of a small model's step (the CPU study's).
    """
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    return adamw(decay, no_decay, run)


def adamw(decay: list[torch.Tensor], no_decay: list[torch.Tensor], run: TrainConfig) -> torch.optim.AdamW:
    """:func:`build_optimizer`'s AdamW over tensors already split by weight decay (matrices, 1-D
    parameters); the sharded step passes the pieces of its shard (:mod:`drop_upcycling.sharding`)."""
    decay_1d = run.weight_decay if run.weight_decay_1d else 0.0
    groups = [{"params": decay, "weight_decay": run.weight_decay}, {"params": no_decay, "weight_decay": decay_1d}]
    impl = {"fused": {"fused": True}, "loop": {"foreach": False, "fused": False}}[run.adamw_impl]
    return torch.optim.AdamW(groups, lr=run.lr, betas=(run.beta1, run.beta2), eps=run.eps, **impl)


def lr_at(step: int, run: TrainConfig) -> float:
    """lr for 0-based optimizer step ``step``: linear warmup to ``lr``, then cosine to ``min_lr``.

    The warmup's first value is ``run.warmup_start_lr``. None (our default): ``lr / warmup_steps``, so
    no step is taken at lr 0 and step ``warmup_steps - 1`` is at ``lr``. A value ``v``: ``v + (lr - v)
    * step / warmup_steps``, reaching ``lr`` at step ``warmup_steps``, which is moe-recipes'
    ``WarmupCosineAnnealingLR`` (its ``eta_min``, the min lr, is the start: 2e-5 in the paper's runs).
    The cosine is the same in both (moe-recipes decays over ``lr_decay_iters`` = the run's steps).
    """
    total = run.total_steps
    if step < run.warmup_steps:
        if run.warmup_start_lr is None:
            return run.lr * (step + 1) / run.warmup_steps
        return run.warmup_start_lr + (run.lr - run.warmup_start_lr) * step / run.warmup_steps
    progress = min(1.0, (step - run.warmup_steps) / max(1, total - run.warmup_steps))
    return run.min_lr + 0.5 * (run.lr - run.min_lr) * (1.0 + math.cos(math.pi * progress))


class MasterWeights:
    """``param_dtype: bf16``: a bf16 model for the forward and backward, its fp32 master for AdamW.

    What DeepSpeed's bf16 mode (the authors' trainer) does: the weights the model computes with are bf16;
    an fp32 copy of them is what the optimizer updates, and the bf16 weights are that copy rounded after
    every step. An update below bf16's resolution (lr 2e-5 late in the cosine) then accumulates in the
    master instead of being rounded away. The micro-batches' bf16 gradients are summed into fp32
    gradients of the master (DeepSpeed's ``grad_accum_dtype: fp32``), which the reduction, the clipping
    and AdamW then read. The master is a :class:`~drop_upcycling.model.CausalLM` holding the same experts,
    so checkpoints save it (its fp32 weights, or their bf16 rounding, which is the bf16 model exactly) and
    resume loads it, as they do an fp32 model.
    """

    def __init__(self, master: CausalLM, env: ParallelEnv) -> None:
        self.master = master
        self.model = empty_bf16_model(master.config, env)
        self.round_to_model()

    @torch.no_grad()
    def round_to_model(self) -> None:
        """The model's bf16 weights := the master's, rounded (after each step and after a resume)."""
        for p, m in zip(self.model.parameters(), self.master.parameters(), strict=True):
            p.copy_(m)

    def accumulate_grads(self) -> None:
        """Add the model's bf16 gradients (one micro-batch) to the master's fp32 ones, and free them."""
        for p, m in zip(self.model.parameters(), self.master.parameters(), strict=True):
            if p.grad is None:
                continue
            if m.grad is None:
                m.grad = p.grad.float()
            else:
                m.grad.add_(p.grad)
            p.grad = None


def empty_bf16_model(cfg: ModelConfig, env: ParallelEnv) -> CausalLM:
    """This rank's model in bf16, its weights not yet set (the caller copies them from an fp32 master)."""
    with torch.device("meta"):
        model = CausalLM(cfg, **_expert_slice(cfg, env))
    model = model.to_empty(device=env.device).to(torch.bfloat16)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model


def check_compiler(device: torch.device) -> None:
    """The ``compile`` key on CPU needs the C++ compiler inductor builds its kernels with: say so in one
    line before the first step, not in a traceback from inside the first compiled forward."""
    if device.type != "cpu":
        return
    from torch._inductor.cpp_builder import get_cpp_compiler

    try:
        get_cpp_compiler()
    except Exception as exc:  # inductor raises its own error types for a missing compiler
        raise UserError(f"compile: true needs a C++ compiler for torch.compile on CPU (g++ or clang++ on PATH, or "
                        f"$CXX); none found ({exc.__class__.__name__}); set compile: false") from None


# ============================================================================ the loop
STEP_PHASES = ("forward", "backward", "gradients", "optimizer", "metrics")  # Trainer.train_step's profiler labels


@dataclass
class StepStats:
    loss: float
    lm_loss: float
    aux_loss: float | None
    grad_norm: float
    expert_load: list[list[float]]


class Trainer:
    """Holds the run's pieces; :meth:`train` runs steps until ``run.total_steps``."""

    def __init__(self, run: TrainConfig, env: ParallelEnv, resume_from: Path | None = None,
                 reader: TokenSequenceReader | None = None) -> None:
        """``reader``: this rank's sequences instead of the corpus ``run.data`` names (benchmarks; such a
        trainer saves checkpoints without a tokenizer)."""
        self.run, self.env = run, env
        self.cfg = run.model_config()
        self.out = Path(run.out)
        self.accum = accumulation_steps(run, env.world_size)
        if reader is not None:
            self.reader, self.tokenizer_dir = reader, None
        else:
            # Rank 0 first: it prepares the data cache on first use, the others then find it ready.
            if not env.is_main:
                env.barrier()
            self.reader, self.tokenizer_dir = build_reader(run, self.cfg, env.data_rank, env.world_size)
            if env.is_main:
                env.barrier()
        self.heldout = build_heldout(run, self.cfg, env.rank, env.world_size) if reader is None else None
        if env.device.type == "cpu":
            reuse_freed_memory()
        torch.manual_seed(run.seed + env.rank)
        self._build_weights()
        self.model.activation_checkpointing = run.activation_checkpointing
        if run.compile:
            check_compiler(env.device)
            compile_for_training(self.model)
        self.step, self.tokens = 0, 0
        self.autocast = _autocast(run, env)
        if resume_from is not None:
            self._resume(resume_from)

    def _build_weights(self) -> None:
        """The model, the weights AdamW updates, and AdamW.

        ``self.model`` is the module that runs; ``self.master`` the fp32 weights AdamW updates and
        checkpoints hold, the same module unless ``param_dtype`` is bf16 (:class:`MasterWeights`). Under
        ``zero_stage`` >= 1 the fp32 weights AdamW updates are this rank's shards (``self.zero``,
        :class:`~drop_upcycling.sharding.ZeroSharding`) and ``self.master`` is None: a bf16 model's full
        fp32 copy, built to start from, is let go once its shards are taken.
        """
        run, env = self.run, self.env
        self.master: CausalLM | None = build_model(self.cfg, run, env)
        self.bf16: MasterWeights | None = None
        self.zero: ZeroSharding | None = None
        if run.zero_stage:
            self.model = empty_bf16_model(self.cfg, env) if run.param_dtype == "bf16" else self.master
            self.zero = ZeroSharding(self.model, self.master, env, run.zero_stage)
            self.master = None
            self.optimizer = adamw(*self.zero.param_groups(), run)
            return
        self.bf16 = MasterWeights(self.master, env) if run.param_dtype == "bf16" else None
        self.model = self.bf16.model if self.bf16 is not None else self.master
        self.optimizer = build_optimizer(self.master, run)

    def _resume(self, path: Path) -> None:
        state = load_checkpoint(path, self.master if self.zero is None else self.model, self.optimizer, self.reader,
                                self.env, zero=self.zero, fused=self.run.adamw_impl == "fused")
        if self.bf16 is not None:
            self.bf16.round_to_model()
        self.step, self.tokens = state["step"], state["tokens"]
        if self.env.is_main:
            log.info("resumed from %s (step %d)", path, self.step)
            truncate_jsonl(self.out / METRICS, self.step)
            truncate_jsonl(self.out / HELDOUT, self.step)

    def train_step(self) -> StepStats:
        """One optimizer step over the global batch; returns its metrics, the same on every rank.

        Each of the ``accum`` micro-batches back-propagates ``1 / accum`` of this rank's share of the
        global-batch loss (:func:`~drop_upcycling.model.causal_lm_loss` over all ranks), so after
        :func:`~drop_upcycling.parallel.reduce_gradients` every rank holds the gradient of the
        global-batch loss. The metrics (loss terms, per-layer expert load) stay on the device, summed
        over the micro-batches, and are averaged over the ranks once at the end (NCCL reduces device
        tensors only), after the optimizer step.

        The phases are labelled for ``torch.profiler`` (:data:`STEP_PHASES`; benchmarks/bench_train.py
        reads them): ``forward`` (model and loss), ``backward``, ``gradients`` (reduction and clipping),
        ``optimizer``, ``metrics``. Under ``zero_stage`` >= 1 the reduction, clipping and update are
        :class:`~drop_upcycling.sharding.ZeroSharding`'s, on this rank's shards.
        """
        run, env, cfg = self.run, self.env, self.cfg
        lr = lr_at(self.step, run)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        sums = torch.zeros(3, dtype=torch.float64, device=env.device)  # loss, lm_loss, aux_loss
        counts = torch.zeros(cfg.num_hidden_layers if cfg.is_moe else 0, max(cfg.num_experts, 1), dtype=torch.float64,
                             device=env.device)  # token copies per (layer, expert)
        for _ in range(self.accum):
            ids = self.reader.next_batch(run.micro_batch_size).to(env.device)
            with record_function("forward"), self.autocast:
                out = self.model(ids, return_expert_ids=cfg.is_moe)
                losses = causal_lm_loss(out.logits, ids, out.router_logits, cfg,
                                        group=env.world_pg if env.world_size > 1 else None,
                                        aux_loss_scope=run.aux_loss_scope, compiled=run.compile,
                                        routed=out.routed or None)
            with record_function("backward"):
                (losses.loss / self.accum).backward()
                if self.bf16 is not None:
                    self.bf16.accumulate_grads()
                if self.zero is not None:
                    self.zero.after_backward()
            aux = losses.aux_loss if losses.aux_loss is not None else torch.zeros((), device=env.device)
            sums += torch.stack([losses.loss.detach(), losses.lm_loss.detach(), aux.detach()]).double()
            for layer, ids_TK in enumerate(out.expert_ids):
                counts[layer] += torch.bincount(ids_TK.reshape(-1), minlength=cfg.num_experts).double()
        with record_function("gradients"):
            if self.zero is not None:
                grad_norm = self.zero.reduce_and_clip(run.grad_clip)
            else:
                reduce_gradients(self.master, env)
                grad_norm = clip_gradients(self.master, env, run.grad_clip)
        with record_function("optimizer"):
            self.optimizer.step()
            if self.zero is not None:
                self.zero.publish()  # the shards' gradients stay where they are (views), cleared there
            else:
                self.optimizer.zero_grad(set_to_none=True)
            if self.bf16 is not None:
                self.bf16.round_to_model()
        with record_function("metrics"):
            sums = all_reduce_mean(sums, env.world_pg) / self.accum
            if counts.numel() and env.world_size > 1:
                dist.all_reduce(counts, group=env.world_pg)
            load = (counts / counts.sum(-1, keepdim=True).clamp_min(1)).tolist()
            sums = sums.tolist()
        return StepStats(loss=sums[0], lm_loss=sums[1], aux_loss=sums[2] if cfg.is_moe else None,
                         grad_norm=grad_norm, expert_load=[[round(x, 5) for x in row] for row in load])

    def train(self) -> Path:
        run, env = self.run, self.env
        total = run.total_steps
        metrics = self.out / METRICS
        writer = _tensorboard(self.out, run) if env.is_main else None
        bar = _progress(total, self.step, env.is_main)
        try:  # the bar ends its line before an error message is printed
            with open(metrics, "a") if env.is_main else contextlib.nullcontext() as f:
                if self.step == 0:
                    self.evaluate_heldout()
                while self.step < total:
                    t0 = time.perf_counter()
                    stats = self.train_step()
                    self.step += 1
                    self.tokens += run.global_batch_tokens
                    row = {"step": self.step, "tokens": self.tokens, "lr": lr_at(self.step - 1, run), "loss": stats.loss,
                           "lm_loss": stats.lm_loss, "aux_loss": stats.aux_loss, "grad_norm": stats.grad_norm,
                           "tokens_per_s": run.global_batch_tokens / (time.perf_counter() - t0),
                           "expert_load": stats.expert_load}
                    if env.is_main:
                        f.write(json.dumps(row) + "\n")
                        f.flush()
                        _log_scalars(writer, row)
                        bar.update(1)
                        bar.set_postfix(loss=f"{stats.loss:.4f}", tok_s=f"{row['tokens_per_s']:.0f}")
                    if due(self.tokens - run.global_batch_tokens, self.tokens, run.heldout_every_tokens) or (
                            self.step == total):
                        self.evaluate_heldout()
                    if (run.save_every and self.step % run.save_every == 0) or self.step == total:
                        self.save()
        finally:
            bar.close()
            if writer is not None:
                writer.close()
        return checkpoint_dir(self.out, total)

    def evaluate_heldout(self) -> None:
        """One row of ``heldout.jsonl`` at the current step (all ranks evaluate their share; rank 0 writes)."""
        if self.heldout is None:
            return
        env = self.env
        row = evaluate_heldout(self.model, self.cfg, self.heldout, self.run.micro_batch_size,
                               env.world_pg if env.world_size > 1 else None,
                               env.expert_pg if self.cfg.is_moe and env.ep_size > 1 else None, self.autocast)
        if env.is_main:
            with open(self.out / HELDOUT, "a") as f:
                f.write(json.dumps({"step": self.step, "tokens": self.tokens, **row}) + "\n")
            log.info("held-out loss at step %d: %.4f (%s)", self.step, row["mean"],
                     ", ".join(f"{d} {v:.3f}" for d, v in row["loss"].items()))

    def save(self) -> Path:
        """Checkpoint the current step from all ranks; rank 0 then points ``latest`` at it and prunes."""
        path = checkpoint_dir(self.out, self.step)
        save_checkpoint(path, self.step, self.tokens, self.master if self.zero is None else self.model, self.optimizer,
                        self.reader, self.run, self.env, self.tokenizer_dir, zero=self.zero)
        if self.env.is_main:
            _set_latest(self.out, path)
            _prune(self.out, self.run.keep_last)
        self.env.barrier()
        return path


def reuse_freed_memory() -> None:
    """Have glibc keep freed memory for reuse rather than give it back to the OS (Linux; else a no-op).

    A step allocates and frees the same activations and gradients of a few MB each, every step.
    glibc serves blocks above its mmap threshold with fresh mappings and trims the top of the heap
    on free, so each step page-faults and zero-fills those megabytes anew: about 9,000 page faults
    per step for the CPU study's model in one process, about 100 with the thresholds raised (blocks
    up to 32 MiB, glibc's limit, then come from the heap). What is computed does not change; the
    process keeps its peak heap, as a caching allocator would.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc
        return
    m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
    mallopt(m_mmap_threshold, 32 << 20)
    mallopt(m_trim_threshold, 1 << 30)


def _autocast(run: TrainConfig, env: ParallelEnv):
    """bf16 autocast for ``dtype: bf16``, for ``auto`` on GPU, and wherever the weights are bf16
    (``param_dtype: bf16``, which :meth:`TrainConfig.check` allows only with ``dtype`` bf16 or auto)."""
    bf16 = run.dtype == "bf16" or (run.dtype == "auto" and env.device.type == "cuda") or run.param_dtype == "bf16"
    if not bf16:
        return contextlib.nullcontext()
    return torch.autocast(env.device.type, dtype=torch.bfloat16)


def _progress(total: int, initial: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, desc="train", unit="step", dynamic_ncols=True)


def _tensorboard(out: Path, run: TrainConfig):
    if not run.tensorboard:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise UserError("tensorboard: true needs the tensorboard package") from None
    return SummaryWriter(str(out / "tensorboard"))


def _log_scalars(writer, row: dict) -> None:
    if writer is None:
        return
    for key in ("loss", "lm_loss", "aux_loss", "grad_norm", "lr", "tokens_per_s"):
        if row[key] is not None:
            writer.add_scalar(f"train/{key}", row[key], row["step"])


# ============================================================================ run metadata
def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in ("torch", "nanotron", "transformers", "safetensors", "tokenizers", "drop-upcycling"):
        with contextlib.suppress(PackageNotFoundError):
            out[pkg] = version(pkg)
    return out


def write_run_json(out: Path, run: TrainConfig, cfg: ModelConfig, env: ParallelEnv, resumed: dict | None) -> None:
    """``run.json``: the run as started; each resume appends its step, layout and accepted config changes."""
    now = {"world_size": env.world_size, "dp": env.dp_size, "ep": env.ep_size, "device": str(env.device),
           "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "versions": _versions()}
    path = out / RUN_JSON
    if resumed is not None and path.is_file():
        record = json.loads(path.read_text())
        record.setdefault("resumes", []).append({**resumed, **now})
    else:
        record = {"seed": run.seed, "run": run.as_dict(), "model": cfg.to_hf_dict(), **now,
                  "resume": resumed is not None, "resumes": [{**resumed, **now}] if resumed is not None else []}
    write_json(path, record)


# ============================================================================ the run folder
def _set_latest(out: Path, final: Path) -> None:
    write_text(out / CHECKPOINTS / LATEST, final.name + "\n")


def _prune(out: Path, keep_last: int) -> None:
    """Keep the newest ``keep_last`` checkpoints; remove what a killed save left behind (only rank 0
    saves, it holds the run folder, and it is not saving now: every temp there is an orphan)."""
    steps = sorted(p for p in (out / CHECKPOINTS).glob("step-*") if p.is_dir())
    for old in steps[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    remove_orphans(out / CHECKPOINTS, everything=True)


HISTORY = (METRICS, RUN_JSON, CHECKPOINTS, "tensorboard")
# Run fields that do not change what the run computes: where it is written, how often it saves, the
# expert-parallel layout (same function to fp32 rounding), the plan-only sizes, recomputing activations;
# init is only read at step 0. (zero_stage is not one: it changes what a checkpoint holds.)
_FREE_FIELDS = {"out", "save_every", "keep_last", "ep", "nodes", "gpus_per_node", "tensorboard", "init",
                "activation_checkpointing"}
_FREE_DATA_FIELDS = {"corpus", "cache_dir"}  # locations: the corpus itself is checked by sha256


def _logged_steps(out: Path) -> int:
    path = out / METRICS
    return sum(1 for line in path.read_text().splitlines() if line.strip()) if path.is_file() else 0


def _has_history(out: Path) -> bool:
    return any((out / name).exists() for name in HISTORY)


def resume_point(out: Path) -> Path | None:
    """The checkpoint ``--resume`` continues from: the one ``latest`` names when it is complete, else
    the newest complete one. None when the folder has no history (nothing to lose by starting at 0);
    a UserError when it has history but no complete checkpoint."""
    ckpts = out / CHECKPOINTS
    pointer = ckpts / LATEST
    named = pointer.read_text().strip() if pointer.is_file() else None
    problem = checkpoint_problem(ckpts / named) if named else None
    if named and problem is None:
        return ckpts / named
    complete = [p for p in sorted(ckpts.glob("step-*"), reverse=True) if checkpoint_problem(p) is None]
    if complete:
        if named:
            log.warning("%s names %s, which %s: resuming from %s, the newest complete checkpoint", pointer, named,
                        problem, complete[0].name)
        return complete[0]
    if not _has_history(out):
        return None
    if named:
        why = f"{pointer} names {named}, which {problem}"
    elif ckpts.is_dir():
        why = f"{ckpts} holds no complete checkpoint"
    else:
        why = f"{ckpts} does not exist"
    raise UserError(f"cannot resume {out}: {why} ({_logged_steps(out)} steps logged); pass --restart to discard "
                    "its metrics and checkpoints and train from step 0")


def config_changes(saved: dict[str, Any], now: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Fields of the run config that differ from the checkpoint's and change what the run computes.

    A field the checkpoint's config lacks was added to TrainConfig since; its default is what that
    run computed with (a new field's default keeps the old behavior).
    """
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig) if f.default is not dataclasses.MISSING}
    changes = {}
    for key in sorted(set(saved) | set(now)):
        if key in _FREE_FIELDS:
            continue
        old, new = saved.get(key, defaults.get(key)), now.get(key)
        if key == "data":
            old, new = ({k: v for k, v in (d or {}).items() if k not in _FREE_DATA_FIELDS} for d in (old, new))
        if json.dumps(old, sort_keys=True) != json.dumps(new, sort_keys=True):
            changes[key] = {"from": old, "to": new}
    return changes


def prepare_run_dir(out: Path, run: TrainConfig, world: int, resume: bool, restart: bool,
                    allow_change: bool) -> tuple[Path | None, dict | None]:
    """Rank 0, holding the run folder: (checkpoint to resume from, the resume record for run.json).

    A folder with history is continued only with ``--resume`` and discarded only with ``--restart``;
    a resume with another config is refused unless ``allow_change``.
    """
    if restart:
        gone = [name for name in HISTORY if (out / name).exists()]
        for name in gone:
            path = out / name
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        if gone:
            log.info("--restart: removed %s from %s", ", ".join(gone), out)
        return None, None
    if not resume:
        if _has_history(out):
            raise UserError(f"{out} already holds a run ({_logged_steps(out)} steps logged): pass --resume to continue "
                            "it, --restart to discard it, or another --out")
        return None, None
    path = resume_point(out)
    if path is None:
        log.info("nothing to resume in %s: starting from step 0", out)
        return None, None
    state = training_state(path, world)
    problem = sharding_problem(state, run.zero_stage, run.ep)
    if problem:
        raise UserError(f"cannot resume from {path}: {problem}")
    changes = config_changes(state.get("run", {}), run.as_dict())
    if changes and not allow_change:
        listed = ", ".join(f"{k} {v['from']!r} -> {v['to']!r}" for k, v in changes.items())
        raise UserError(f"the config differs from the one {path} was trained with ({listed}); pass "
                        "--allow-config-change to continue with it (recorded in run.json)")
    return path, {"step": state["step"], "from": path.name, "changes": changes}


def _claim_run_dir(out: Path, stack: contextlib.ExitStack) -> None:
    """Create the run folder and hold it until the run ends (one writer per run folder)."""
    make_parent(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"cannot write {out}: it is a file, not a run folder")
    with writing(out):
        out.mkdir(exist_ok=True)
        stack.enter_context(claim(out, "train"))


# ============================================================================ CLI
def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="training YAML (see recipes/configs/)")
    parser.add_argument("--ep", type=int, help="expert-parallel size (world = dp x ep)")
    parser.add_argument("--steps", type=int, help="optimizer steps (overrides train_tokens)")
    parser.add_argument("--out", help="output directory (metrics.jsonl, checkpoints/)")
    parser.add_argument("--save-every", type=int, dest="save_every", help="checkpoint every N steps")
    parser.add_argument("--init", help="HF checkpoint to start from")
    history = parser.add_mutually_exclusive_group()
    history.add_argument("--resume", action="store_true",
                         help="continue OUT's run from its newest complete checkpoint (refused if it has none)")
    history.add_argument("--restart", action="store_true",
                         help="discard OUT's metrics, checkpoints and run.json and train from step 0")
    parser.add_argument("--allow-config-change", action="store_true", dest="allow_config_change",
                        help="--resume with a config that differs from the checkpoint's (recorded in run.json)")
    parser.add_argument("--nproc", type=int, help="start N processes with torchrun (one line for a failing rank)")
    parser.add_argument("--dry-run", action="store_true", help="print the plan (layout, memory, FLOPs) and exit")
    parser.add_argument("--nodes", type=int, help="nodes (plan only; torchrun decides the real world size)")
    parser.add_argument("--gpus-per-node", type=int, dest="gpus_per_node", help="GPUs per node (plan only)")
    parser.add_argument("--format", choices=("text", "json"), default="text",
                        help="--dry-run: the plan as text (default) or as one JSON object")


def load_run(args: argparse.Namespace) -> TrainConfig:
    overrides = {k: getattr(args, k, None) for k in ("ep", "steps", "out", "save_every", "init", "nodes",
                                                      "gpus_per_node")}
    return TrainConfig.from_yaml(args.config, **overrides)


def run(args: argparse.Namespace) -> int:
    train_run = load_run(args)
    if args.dry_run:
        from .memory import format_plan, plan

        p = plan(train_run)
        print(json.dumps(p) if args.format == "json" else format_plan(p))
        return 0
    if args.nproc is not None:
        return launch(args)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    try:
        return _train(train_run, args, world)
    except UserError as e:
        if world > 1:  # torchrun interleaves the ranks' output: say which one failed
            raise UserError(f"rank {os.environ.get('RANK', '?')}: {e}") from None
        raise


def _train(train_run: TrainConfig, args: argparse.Namespace, world: int) -> int:
    cfg = train_run.model_config()
    validate_layout(world, train_run.ep, cfg.num_experts)
    accumulation_steps(train_run, world)
    out = Path(train_run.out)
    with contextlib.ExitStack() as stack:
        resume_from, resumed = None, None
        if int(os.environ.get("RANK", "0")) == 0:  # before the process group: a refusal costs nothing
            _claim_run_dir(out, stack)
            resume_from, resumed = prepare_run_dir(out, train_run, world, args.resume, args.restart,
                                                   args.allow_config_change)
        env = init_parallel(ep_size=train_run.ep, num_experts=cfg.num_experts)
        stack.callback(env.destroy)
        chosen = env.broadcast_str(str(resume_from) if resume_from else "")
        trainer = Trainer(train_run, env, resume_from=Path(chosen) if chosen else None)
        with writing(out, roots=[out]):
            if env.is_main:
                write_run_json(out, train_run, cfg, env, resumed)
            final = trainer.train()
        if env.is_main:
            print(f"trained {trainer.step} steps; final checkpoint {final}")
    return 0


# ============================================================================ the launcher
_RANK_ERROR = re.compile(r"drop-upcycling train: error: (.*)")


def launch(args: argparse.Namespace) -> int:
    """``train --nproc N``: torchrun as a child process. Its output passes through until a rank reports
    a one-line error; torchrun's traceback about that rank is then dropped and the line ends the run."""
    if "LOCAL_RANK" in os.environ:
        raise UserError("--nproc starts torchrun itself: run it without torchrun")
    if args.nproc < 1:
        raise UserError(f"--nproc must be >= 1, got {args.nproc}")
    forward = [args.config]
    for flag, key in (("--ep", "ep"), ("--steps", "steps"), ("--out", "out"), ("--save-every", "save_every"),
                      ("--init", "init")):
        if getattr(args, key) is not None:
            forward += [flag, str(getattr(args, key))]
    forward += [f for f, key in (("--resume", "resume"), ("--restart", "restart"),
                                 ("--allow-config-change", "allow_config_change")) if getattr(args, key)]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}",
           "-m", "drop_upcycling.train", *forward]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE)
    failure, pending = None, b""
    try:
        for chunk in iter(lambda: os.read(proc.stderr.fileno(), 1 << 16), b""):
            *parts, pending = re.split(rb"(?<=[\r\n])", pending + chunk)  # \r: keep progress bars live
            for part in parts:
                text = part.decode(errors="replace")
                m = _RANK_ERROR.search(text)
                if m and failure is None:
                    failure = m.group(1).strip()
                elif failure is None:
                    sys.stderr.write(text)
                    sys.stderr.flush()
        proc.wait()
    except BaseException:  # Ctrl-C or SIGTERM: stop torchrun, which stops the ranks
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait()
        raise
    if failure is None:
        sys.stderr.write(pending.decode(errors="replace"))
    if proc.returncode and failure is not None:
        raise UserError(failure)
    return proc.returncode


def main(argv: list[str] | None = None) -> int:
    """``python -m drop_upcycling.train`` (what torchrun runs): the ``drop-upcycling train`` command."""
    from .cli import main as cli_main

    return cli_main(["train", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
