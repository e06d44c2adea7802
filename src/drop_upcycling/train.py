"""The trainer: dense or MoE, data x expert parallel, resumable bit for bit.

``torchrun --nproc_per_node=N -m drop_upcycling.train CONFIG.yaml [--ep N] [--steps N] [--out DIR]
[--save-every N] [--resume]`` (or ``drop-upcycling train ...``). Each of the ``N = dp * ep`` ranks
reads its own tokens; under expert parallelism each rank holds ``E / ep`` experts and MoE layers
exchange tokens with :class:`~drop_upcycling.moe.AllToAllDispatcher` (see :mod:`.parallel`).

A step: ``accum`` micro-batches forward/backward (each rank's loss is its share of the global-batch
loss, :func:`~drop_upcycling.parallel.data_parallel_loss`), gradient reduction over the two groups,
clipping by the global norm, AdamW (FACTS.md §4: betas 0.9/0.95, eps 1e-8, weight decay 0.1 on
matrices, not on norm weights), linear warmup then cosine to ``min_lr``. One JSON line per step
goes to ``OUT/metrics.jsonl``.

Checkpoints (``OUT/checkpoints/step-XXXXXXXX``, a ``latest`` pointer, keep-last-K) hold an HF model
(each expert-parallel rank writes its own experts' file into a shared temp dir; rank 0 writes the
index; transformers loads it) plus ``trainer/``: AdamW moments per HF tensor name (so any EP size
reloads them), each rank's data position and RNG state, and the step. Everything is safetensors or
JSON, written into a temp dir and renamed.

The run folder holds one run: rank 0 claims it (:func:`drop_upcycling.fsio.claim`) for the whole
run, a folder with history is only continued (``--resume``, from the newest complete checkpoint,
with the same config unless ``--allow-config-change``) or explicitly discarded (``--restart``),
never silently started over. ``drop-upcycling train --nproc N`` runs torchrun itself and ends with
the failing rank's one-line error.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
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
from typing import Any

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file

from .checkpoint import (
    INDEX_FILE,
    CheckpointReader,
    copy_tokenizer_files,
    hf_expert_name,
    load_state_into,
    to_hf,
    write_config,
)
from .configs import ModelConfig, TrainConfig
from .errors import UserError
from .fsio import atomic_dir, claim, make_parent, remove_orphans, write_json, write_text, writing
from .model import CausalLM
from .moe import AllToAllDispatcher
from .parallel import (
    ParallelEnv,
    all_reduce_mean,
    clip_gradients,
    data_parallel_loss,
    init_parallel,
    is_expert_param,
    reduce_gradients,
    validate_layout,
)

log = logging.getLogger(__name__)
CHECKPOINTS = "checkpoints"
LATEST = "latest"


# ============================================================================ data
def build_reader(run: TrainConfig, cfg: ModelConfig, rank: int, world_size: int):
    """(reader, tokenizer dir): :class:`drop_upcycling.data.TokenSequenceReader` over the corpus that
    ``run.data`` names, prepared into the data cache on first use (tokenizer + token shards)."""
    return _corpus_reader(dict(run.data), run, cfg, rank, world_size)


def _corpus_reader(data: dict[str, Any], run: TrainConfig, cfg: ModelConfig, rank: int, world_size: int):
    """:class:`drop_upcycling.data.TokenSequenceReader` over the prepared corpus (prepared on first use)."""
    from . import data as data_mod

    # The fields were checked where the config was read (configs.DATA_SPECS).
    prepared = data_mod.prepare_all(corpus=data.get("corpus"), cache_dir=data.get("cache_dir"),
                                    vocab_size=data.get("vocab_size", cfg.vocab_size), seed=data.get("seed", 0),
                                    max_docs_per_domain=data.get("max_docs_per_domain"),
                                    pinned=data.get("pinned", True))
    data_mod.check_vocab(prepared.tokenizer_dir, cfg.vocab_size)
    weights = data.get("weights")
    files = prepared.files_by_domain(data.get("split", "train"), list(weights) if weights else None)
    reader = data_mod.TokenSequenceReader(files, run.seq_len, weights=weights, seed=run.seed, rank=rank,
                                          world_size=world_size)
    return reader, Path(prepared.tokenizer_dir)


# ============================================================================ model and optimizer
def build_model(cfg: ModelConfig, run: TrainConfig, env: ParallelEnv) -> CausalLM:
    """This rank's model: its expert slice, from ``run.init`` (read straight from safetensors) or random."""
    num_local = cfg.num_experts // env.ep_size if cfg.is_moe else None
    offset = env.ep_rank * num_local if cfg.is_moe else 0
    dispatcher = AllToAllDispatcher(cfg.num_experts, env.expert_pg) if cfg.is_moe and env.ep_size > 1 else None
    kwargs = {"num_local_experts": num_local, "expert_offset": offset, "dispatcher": dispatcher}
    if run.init is None:
        model = CausalLM(cfg, **kwargs)
        model.init_weights(run.seed)
        return model.to(env.device)
    return _load_weights(Path(run.init), cfg, env, kwargs)


def _load_weights(path: Path, cfg: ModelConfig, env: ParallelEnv, kwargs: dict) -> CausalLM:
    reader = CheckpointReader(path)
    if reader.config != cfg:
        raise UserError(f"checkpoint {path} has a different model shape than the run")
    with torch.device("meta"):
        model = CausalLM(cfg, **kwargs)
    model = model.to_empty(device=env.device).float()
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    load_state_into(model, reader)
    return model


def build_optimizer(model: torch.nn.Module, run: TrainConfig) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices only (norm weights are 1-D), as HF Trainer and Megatron do."""
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": run.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=run.lr, betas=(run.beta1, run.beta2), eps=run.eps, foreach=False)


def lr_at(step: int, run: TrainConfig) -> float:
    """lr for 0-based optimizer step ``step``: linear warmup to ``lr``, then cosine to ``min_lr``."""
    total = run.total_steps
    if step < run.warmup_steps:
        return run.lr * (step + 1) / run.warmup_steps
    progress = min(1.0, (step - run.warmup_steps) / max(1, total - run.warmup_steps))
    return run.min_lr + 0.5 * (run.lr - run.min_lr) * (1.0 + math.cos(math.pi * progress))


# ============================================================================ checkpoints
def checkpoint_dir(out: Path, step: int) -> Path:
    return out / CHECKPOINTS / f"step-{step:08d}"


def latest_checkpoint(out: Path) -> Path | None:
    pointer = out / CHECKPOINTS / LATEST
    if not pointer.is_file():
        return None
    path = out / CHECKPOINTS / pointer.read_text().strip()
    return path if path.is_dir() else None


def _broadcast_str(value: str | None, env: ParallelEnv) -> str:
    obj = [value]
    if env.world_size > 1:
        dist.broadcast_object_list(obj, src=0, group=env.world_pg)
    return obj[0]


def _model_file(ep_rank: int, ep_size: int) -> str:
    return f"model-{ep_rank + 1:05d}-of-{ep_size:05d}.safetensors"


def _hf_tensors(model: CausalLM, tensors: dict[str, torch.Tensor], expert_only: bool, suffix: str = ""):
    """(HF name + suffix, tensor) for this rank's share: its experts, plus the rest when not ``expert_only``."""
    for name, t in tensors.items():
        if model.config.tie_word_embeddings and name == "lm_head.weight":
            continue
        expert = is_expert_param(name)
        if expert_only and not expert:
            continue
        offset = model.get_submodule(name.rsplit(".", 1)[0]).expert_offset if expert else 0
        for hf_name, x in to_hf(name, t, offset):
            yield hf_name + suffix, x


def save_checkpoint(out: Path, step: int, tokens: int, model: CausalLM, optimizer: torch.optim.AdamW, reader,
                    run: TrainConfig, env: ParallelEnv, tokenizer_dir: Path | None) -> Path:
    """Write step ``step`` atomically from all ranks; update ``latest``; keep the last ``keep_last``."""
    final = checkpoint_dir(out, step)
    with contextlib.ExitStack() as stack:
        tmp = stack.enter_context(atomic_dir(final, overwrite=True)) if env.is_main else None
        tmp = Path(_broadcast_str(str(tmp) if tmp else None, env))
        if env.is_main:
            (tmp / "trainer").mkdir()
        env.barrier()
        _write_rank_files(tmp, model, optimizer, reader, run, env)
        env.barrier()
        if env.is_main:
            _write_index(tmp, model, run, env, tokenizer_dir)
            write_json(tmp / "trainer" / "state.json", {
                "step": step, "tokens": tokens, "world_size": env.world_size, "ep": env.ep_size,
                "dp": env.dp_size, "run": run.as_dict(),
            })
    if env.is_main:
        _set_latest(out, final)
        _prune(out, run.keep_last)
    env.barrier()
    return final


def _write_rank_files(tmp: Path, model: CausalLM, optimizer, reader, run: TrainConfig, env: ParallelEnv) -> None:
    save_dtype = torch.bfloat16 if run.save_dtype == "bf16" else torch.float32
    if env.dp_rank == 0:  # one replica of each expert slice writes it
        expert_only = not env.is_main
        weights = {n: t.detach().to(save_dtype).contiguous().cpu()
                   for n, t in _hf_tensors(model, model.state_dict(), expert_only)}
        save_file(weights, str(tmp / _model_file(env.ep_rank, env.ep_size)), metadata={"format": "pt"})
        moments = {}
        params = dict(model.named_parameters())
        for key in ("exp_avg", "exp_avg_sq"):
            state = {n: optimizer.state[p][key] for n, p in params.items() if p in optimizer.state}
            moments.update(_hf_tensors(model, state, expert_only, suffix=f".{key}"))
        moments = {n: t.detach().contiguous().cpu() for n, t in moments.items()}
        save_file(moments, str(tmp / "trainer" / f"optimizer-{env.ep_rank:05d}.safetensors"))
    rank_state = {"data": reader.state_dict(), "rng": _rng_state()}
    write_json(tmp / "trainer" / f"rank-{env.rank:05d}.json", rank_state)


def _write_index(tmp: Path, model: CausalLM, run: TrainConfig, env: ParallelEnv, tokenizer_dir: Path | None) -> None:
    cfg = model.config
    weight_map: dict[str, str] = {}
    num_local = cfg.num_experts // env.ep_size if cfg.is_moe else 0
    for name in model.state_dict():
        if cfg.tie_word_embeddings and name == "lm_head.weight":
            continue
        if not is_expert_param(name):
            weight_map[name] = _model_file(0, env.ep_size)
            continue
        layer, matrix = int(name.split(".")[2]), name.rsplit(".", 1)[1]
        for e in range(cfg.num_experts):
            weight_map[hf_expert_name(layer, e, matrix)] = _model_file(e // num_local, env.ep_size)
    total = sum((tmp / f).stat().st_size for f in set(weight_map.values()))
    write_json(tmp / INDEX_FILE, {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))})
    write_config(tmp, cfg, torch.bfloat16 if run.save_dtype == "bf16" else torch.float32)
    if tokenizer_dir is not None:
        copy_tokenizer_files(tokenizer_dir, tmp)


def _set_latest(out: Path, final: Path) -> None:
    write_text(out / CHECKPOINTS / LATEST, final.name + "\n")


def _prune(out: Path, keep_last: int) -> None:
    """Keep the newest ``keep_last`` checkpoints; remove what a killed save left behind (only rank 0
    saves, it holds the run folder, and it is not saving now: every temp there is an orphan)."""
    steps = sorted(p for p in (out / CHECKPOINTS).glob("step-*") if p.is_dir())
    for old in steps[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    remove_orphans(out / CHECKPOINTS, everything=True)


def _rng_state() -> dict[str, str]:
    state = {"torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode()}
    if torch.cuda.is_available():
        state["cuda"] = base64.b64encode(torch.cuda.get_rng_state().numpy().tobytes()).decode()
    return state


def _set_rng_state(state: dict[str, str]) -> None:
    torch.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(state["torch"])), dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(state["cuda"])), dtype=torch.uint8))


def load_checkpoint(path: Path, model: CausalLM, optimizer: torch.optim.AdamW, reader, env: ParallelEnv) -> dict:
    """Restore weights, AdamW moments (any EP size), and this rank's data position and RNG."""
    state_file = path / "trainer" / "state.json"
    if not state_file.is_file():
        raise UserError(f"{path} is not a training checkpoint (no trainer/state.json)")
    state = json.loads(state_file.read_text())
    if state["world_size"] != env.world_size:
        raise UserError(f"{path} was written by {state['world_size']} data ranks; resuming with {env.world_size} "
                        "cannot restore the data position (use it as init: instead)")
    load_state_into(model, CheckpointReader(path))
    _load_moments(path / "trainer", model, optimizer, state["step"])
    rank_state = json.loads((path / "trainer" / f"rank-{env.rank:05d}.json").read_text())
    reader.load_state_dict(rank_state["data"])
    _set_rng_state(rank_state["rng"])
    return state


def _load_moments(trainer_dir: Path, model: CausalLM, optimizer: torch.optim.AdamW, step: int) -> None:
    handles = [safe_open(str(f), framework="pt") for f in sorted(trainer_dir.glob("optimizer-*.safetensors"))]
    where = {k: h for h in handles for k in h.keys()}  # noqa: SIM118 (a safe_open handle, not a dict)

    def get(key: str) -> torch.Tensor:
        if key not in where:
            raise UserError(f"optimizer state {key} missing from {trainer_dir}")
        return where[key].get_tensor(key)

    for name, p in model.named_parameters():
        if model.config.tie_word_embeddings and name == "lm_head.weight":
            continue
        st: dict[str, torch.Tensor] = {"step": torch.tensor(float(step))}
        for key in ("exp_avg", "exp_avg_sq"):
            if is_expert_param(name):
                layer, matrix = int(name.split(".")[2]), name.rsplit(".", 1)[1]
                offset = model.get_submodule(name.rsplit(".", 1)[0]).expert_offset
                t = torch.stack([get(f"{hf_expert_name(layer, offset + e, matrix)}.{key}") for e in range(p.shape[0])])
            else:
                t = get(f"{name}.{key}")
            st[key] = t.to(device=p.device, dtype=p.dtype)
        optimizer.state[p] = st


# ============================================================================ the loop
@dataclass
class StepStats:
    loss: float
    lm_loss: float
    aux_loss: float | None
    grad_norm: float
    expert_load: list[list[float]]


class Trainer:
    """Holds the run's pieces; :meth:`train` runs steps until ``run.total_steps``."""

    def __init__(self, run: TrainConfig, env: ParallelEnv, resume_from: Path | None = None) -> None:
        self.run, self.env = run, env
        self.cfg = run.model_config()
        self.out = Path(run.out)
        self.accum = _accumulation_steps(run, env.world_size)
        # Rank 0 first: it prepares the data cache on first use, the others then find it ready.
        if not env.is_main:
            env.barrier()
        self.reader, self.tokenizer_dir = build_reader(run, self.cfg, env.data_rank, env.world_size)
        if env.is_main:
            env.barrier()
        torch.manual_seed(run.seed + env.rank)
        self.model = build_model(self.cfg, run, env)
        self.optimizer = build_optimizer(self.model, run)
        self.step, self.tokens = 0, 0
        self.autocast = _autocast(run, env)
        if resume_from is not None:
            self._resume(resume_from)

    def _resume(self, path: Path) -> None:
        state = load_checkpoint(path, self.model, self.optimizer, self.reader, self.env)
        self.step, self.tokens = state["step"], state["tokens"]
        if self.env.is_main:
            log.info("resumed from %s (step %d)", path, self.step)
            _truncate_metrics(self.out / "metrics.jsonl", self.step)

    def train_step(self) -> StepStats:
        run, env, cfg = self.run, self.env, self.cfg
        lr = lr_at(self.step, run)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        # Metrics stay on the device until the end of the step (NCCL reduces device tensors only).
        sums = torch.zeros(3, dtype=torch.float64, device=env.device)
        counts = torch.zeros(cfg.num_hidden_layers if cfg.is_moe else 0, max(cfg.num_experts, 1), dtype=torch.float64,
                             device=env.device)
        for _ in range(self.accum):
            ids = self.reader.next_batch(run.micro_batch_size).to(env.device)
            with self.autocast:
                out = self.model(ids, return_expert_ids=cfg.is_moe)
                losses = data_parallel_loss(out.logits, ids, out.router_logits, cfg,
                                            group=env.world_pg if env.world_size > 1 else None)
            (losses.loss / self.accum).backward()
            aux = losses.aux_loss if losses.aux_loss is not None else torch.zeros((), device=env.device)
            sums += torch.stack([losses.loss.detach(), losses.lm_loss.detach(), aux.detach()]).double()
            for layer, ids_TK in enumerate(out.expert_ids):
                counts[layer] += torch.bincount(ids_TK.reshape(-1), minlength=cfg.num_experts).double()
        reduce_gradients(self.model, env)
        grad_norm = clip_gradients(self.model, env, run.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
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
        metrics = self.out / "metrics.jsonl"
        writer = _tensorboard(self.out, run) if env.is_main else None
        bar = _progress(total, self.step, env.is_main)
        try:  # the bar ends its line before an error message is printed
            with open(metrics, "a") if env.is_main else contextlib.nullcontext() as f:
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
                    if (run.save_every and self.step % run.save_every == 0) or self.step == total:
                        save_checkpoint(self.out, self.step, self.tokens, self.model, self.optimizer, self.reader, run,
                                        env, self.tokenizer_dir)
        finally:
            bar.close()
            if writer is not None:
                writer.close()
        return checkpoint_dir(self.out, total)


def _accumulation_steps(run: TrainConfig, world_size: int) -> int:
    seqs = run.global_batch_tokens // run.seq_len
    per_step = world_size * run.micro_batch_size
    if seqs % per_step:
        raise UserError(f"global batch of {seqs} sequences is not divisible by {world_size} ranks x micro batch "
                        f"{run.micro_batch_size}")
    return seqs // per_step


def _autocast(run: TrainConfig, env: ParallelEnv):
    bf16 = run.dtype == "bf16" or (run.dtype == "auto" and env.device.type == "cuda")
    if not bf16:
        return contextlib.nullcontext()
    return torch.autocast(env.device.type, dtype=torch.bfloat16)


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop lines logged after the checkpoint we resume from (a killed run may have logged more)."""
    if not path.is_file():
        return
    keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    write_text(path, "".join(line + "\n" for line in keep))


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
    path = out / "run.json"
    if resumed is not None and path.is_file():
        record = json.loads(path.read_text())
        record.setdefault("resumes", []).append({**resumed, **now})
    else:
        record = {"seed": run.seed, "run": run.as_dict(), "model": cfg.to_hf_dict(), **now,
                  "resume": resumed is not None, "resumes": [{**resumed, **now}] if resumed is not None else []}
    write_json(path, record)


# ============================================================================ the run folder
HISTORY = ("metrics.jsonl", "run.json", CHECKPOINTS, "tensorboard")
# Run fields that do not change what the run computes: where it is written, how often it saves, the
# expert-parallel layout (same function to fp32 rounding), the plan-only sizes; init is only read at step 0.
_FREE_FIELDS = {"out", "save_every", "keep_last", "ep", "nodes", "gpus_per_node", "tensorboard", "init"}
_FREE_DATA_FIELDS = {"corpus", "cache_dir"}  # locations: the corpus itself is checked by sha256


def _logged_steps(out: Path) -> int:
    path = out / "metrics.jsonl"
    return sum(1 for line in path.read_text().splitlines() if line.strip()) if path.is_file() else 0


def _has_history(out: Path) -> bool:
    return any((out / name).exists() for name in HISTORY)


def checkpoint_problem(path: Path) -> str | None:
    """Why ``path`` cannot be resumed from, or None when it is a complete training checkpoint."""
    if not path.is_dir():
        return "does not exist"
    try:
        state = json.loads((path / "trainer" / "state.json").read_text())
        weight_map = json.loads((path / INDEX_FILE).read_text())["weight_map"]
        step, world, ep = int(state["step"]), int(state["world_size"]), int(state["ep"])
    except FileNotFoundError as e:
        return f"is incomplete (no {Path(e.filename).relative_to(path)})"
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"is unreadable ({e})"
    if f"step-{step:08d}" != path.name:
        return f"holds step {step}, not the step its name says"
    needed = [*sorted(set(weight_map.values())), "config.json",
              *(f"trainer/rank-{r:05d}.json" for r in range(world)),
              *(f"trainer/optimizer-{e:05d}.safetensors" for e in range(ep))]
    missing = [name for name in needed if not (path / name).is_file()]
    return f"is incomplete (no {missing[0]})" if missing else None


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
    """Fields of the run config that differ from the checkpoint's and change what the run computes."""
    changes = {}
    for key in sorted(set(saved) | set(now)):
        if key in _FREE_FIELDS:
            continue
        old, new = saved.get(key), now.get(key)
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
    state = json.loads((path / "trainer" / "state.json").read_text())
    if state["world_size"] != world:
        raise UserError(f"{path} was written by {state['world_size']} data ranks; resuming with {world} "
                        "cannot restore the data position (use it as init: instead)")
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


# ============================================================================ the dry-run plan
def plan(run: TrainConfig) -> dict[str, Any]:
    """What a run on ``nodes x gpus_per_node`` GPUs would do: layout, memory per GPU, tokens and FLOPs.

    Memory is a coarse estimate for fp32 master weights + AdamW (16 bytes per held parameter: weight,
    gradient, two moments) and bf16 activations of one micro-batch (about 34 * S * D bytes per layer
    per sequence for attention + norms, plus the routed expert intermediates, Korthikanti et al. 2022,
    without activation recomputation). FLOPs: :func:`drop_upcycling.flops.training_flops_per_token`.
    """
    from .flops import training_flops_per_token

    cfg = run.planned_model_config()
    world = run.nodes * run.gpus_per_node
    dp = validate_layout(world, run.ep, cfg.num_experts)
    accum = _accumulation_steps(run, world)
    counts = cfg.param_counts()
    expert_params = cfg.num_hidden_layers * cfg.num_experts * 3 * cfg.hidden_size * cfg.intermediate_size
    held = counts["total"] - expert_params + expert_params // run.ep
    s, d, b = run.seq_len, cfg.hidden_size, run.micro_batch_size
    routed = cfg.num_experts_per_tok if cfg.is_moe else 1
    act_layer = b * s * d * 34 + b * s * routed * cfg.intermediate_size * 2 * 3
    activations = cfg.num_hidden_layers * act_layer + b * s * cfg.vocab_size * (2 + 4)
    flops_token = training_flops_per_token(cfg, run.seq_len)
    steps = run.total_steps
    # nanotron 0.4 lays ranks out as (ep, dp): expert group i holds ranks i, i + dp, i + 2 dp, ...
    expert_group_nodes = len({i * dp // run.gpus_per_node for i in range(run.ep)})
    return {
        "model": cfg.name, "method": run.method, "init": run.init,
        "world_size": world, "nodes": run.nodes, "gpus_per_node": run.gpus_per_node, "dp": dp, "ep": run.ep,
        "experts_per_rank": cfg.num_experts // run.ep if cfg.is_moe else 0, "expert_group_nodes": expert_group_nodes,
        "total_params": counts["total"], "active_params": counts["active"], "params_per_gpu": held,
        "memory_per_gpu_gb": round((16 * held + activations) / 1e9, 1),
        "micro_batch_size": b, "grad_accum": accum, "seq_len": s,
        "tokens_per_step": run.global_batch_tokens, "steps": steps, "train_tokens": steps * run.global_batch_tokens,
        "flops_per_token": flops_token, "total_flops": flops_token * steps * run.global_batch_tokens,
    }


def format_plan(p: dict[str, Any]) -> str:
    lines = [f"plan for {p['model']} ({p['method'] or 'train'}), init {p['init'] or 'random (from scratch)'}",
             f"  world size        {p['world_size']} = {p['nodes']} node(s) x {p['gpus_per_node']} GPUs",
             f"  layout            dp {p['dp']} x ep {p['ep']}; {p['experts_per_rank']} experts per rank",
             f"  parameters        {p['total_params'] / 1e9:.3f}B total, {p['active_params'] / 1e9:.3f}B active, "
             f"{p['params_per_gpu'] / 1e9:.3f}B held per GPU",
             f"  all-to-all        each expert group spans {p['expert_group_nodes']} node(s)",
             f"  memory per GPU    ~{p['memory_per_gpu_gb']} GB (fp32 weights+grads+AdamW, bf16 activations of "
             f"micro-batch {p['micro_batch_size']} x {p['seq_len']}): "
             + ("fits an 80 GB H100" if p["memory_per_gpu_gb"] < 76 else
                "needs a 141 GB H200 (or more GPUs / a smaller micro-batch)" if p["memory_per_gpu_gb"] < 134 else
                "does not fit one GPU: raise ep or the GPU count"),
             f"  tokens per step   {p['tokens_per_step']:,} (grad accumulation {p['grad_accum']})",
             f"  steps             {p['steps']:,} ({p['train_tokens'] / 1e9:.1f}B tokens)",
             f"  training FLOPs    {p['flops_per_token'] / 1e9:.2f} GFLOP/token, {p['total_flops']:.3e} total"]
    return "\n".join(lines)


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


def load_run(args: argparse.Namespace) -> TrainConfig:
    overrides = {k: getattr(args, k, None) for k in ("ep", "steps", "out", "save_every", "init", "nodes",
                                                      "gpus_per_node")}
    return TrainConfig.from_yaml(args.config, **overrides)


def run(args: argparse.Namespace) -> int:
    train_run = load_run(args)
    if args.dry_run:
        print(format_plan(plan(train_run)))
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
    _accumulation_steps(train_run, world)
    out = Path(train_run.out)
    with contextlib.ExitStack() as stack:
        resume_from, resumed = None, None
        if int(os.environ.get("RANK", "0")) == 0:  # before the process group: a refusal costs nothing
            _claim_run_dir(out, stack)
            resume_from, resumed = prepare_run_dir(out, train_run, world, args.resume, args.restart,
                                                   args.allow_config_change)
        env = init_parallel(ep=train_run.ep, num_experts=cfg.num_experts)
        stack.callback(env.destroy)
        chosen = _broadcast_str(str(resume_from) if resume_from else "", env)
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
