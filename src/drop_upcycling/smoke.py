"""The main job at CPU scale: the paper's whole pipeline on a small model, stage by stage, resumable.

``bash recipes/run_smoke.sh [--scale ci|full] [--out DIR] [--force]`` (``python -m drop_upcycling.smoke``):

1. ``data``: corpus -> splits -> BPE tokenizer -> datatrove shards (``drop-upcycling data prepare``).
2. ``pretrain``: a small dense Llama from random init, one process (``drop-upcycling train``).
3. ``branch-<domain>`` (``full`` only): the dense model continued on ja / en / code, the BTX sources.
4. ``upcycle-<label>``: FS, NU, RNU-0.5, DU-0.5, DU-1.0 (and BTX) per seed (``drop-upcycling upcycle``).
5. ``first-batch``: the loss of the final dense model and of every upcycled init on the first global
   batch that the MoE runs of each seed train on (an explicit evaluation pass; see :func:`first_batch_losses`).
6. ``train-<label>``: every MoE for the same token budget with EP=2 under ``torchrun`` (gloo, 2 procs),
   and the dense model continued for the same budget as the dense reference (dp=2).
7. ``evaluate``: the local lm-eval suite on every final checkpoint (``drop-upcycling evaluate``).
8. ``routing-<label>``: top-k assignment counts per domain of every final MoE (``drop-upcycling routing``).
9. ``analyze``: routing figure and metrics, loss curves, FLOPs table (``drop-upcycling analyze``, ``flops``).
10. ``report``: ``drop-upcycling report OUT --out REPORT`` (default ``OUT/report``): README, figures, verdicts.

Layout of ``OUT``: the contract in :mod:`drop_upcycling.layout`, which names every path this
module writes and :mod:`drop_upcycling.report` reads (``runs/<label>/``, ``pretrain/dense/``,
``btx_branches/<domain>/``, ``checks/first_batch.json``, ``eval/results.csv``,
``routing/<label>/routing_counts.csv``, ``smoke.json`` (the manifest: scale, runs, methods, seeds, stage
times)). Labels are ``<method slug>-s<seed>`` (``nu-s0``, ``du0.5-s1``, ``dense-s0``); the methods and
their ``drop-upcycling upcycle`` flags come from the method table (:mod:`drop_upcycling.methods`).

Each stage's inputs (its config and the hashes of the stages it depends on) are hashed; a finished
stage leaves ``stages/<name>.json`` with that hash, and a rerun skips a stage whose hash matches and
whose outputs exist. A training stage that was interrupted resumes from its latest checkpoint when
its hash matches; a stage whose hash changed is redone from scratch; ``--force`` redoes everything.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .checkpoint import write_json as _write_json_file
from .errors import UserError
from .layout import METRICS, ReproLayout, checkpoint_dir, run_label
from .methods import BY_KEY, DENSE, MOE_METHODS, Method

log = logging.getLogger(__name__)

SMOKE_VERSION = 1  # bump when a stage's meaning changes: every stamp is then stale
DOMAINS = ("c4", "en_wikipedia", "ja_mc4", "code_stack")
# BTX branches (FACTS.md §1): the seed plus the dense model continued on each domain group.
BTX_BRANCHES = {"ja": {"ja_mc4": 1.0}, "en": {"c4": 0.5, "en_wikipedia": 0.5}, "code": {"code_stack": 1.0}}


@dataclass(frozen=True)
class Scale:
    """Model, budgets and seeds of one scale. ``*_step_s`` are measured seconds per step on 2 cores
    (used only for the time estimate before any stage has run)."""

    model: dict[str, Any]
    vocab_size: int
    seq_len: int
    global_batch_tokens: int
    micro_batch_size: int
    pretrain_steps: int
    pretrain_lr: float
    moe_steps: int
    moe_lr: float
    seeds: tuple[int, ...]
    num_experts: int = 8
    top_k: int = 2
    branch_steps: int = 0  # BTX branches; 0 = no BTX
    eval_size: str = "ci"
    eval_limit: int | None = None
    routing_tokens: int = 4096
    dense_step_s: float = 0.05
    moe_step_s: float = 0.1
    methods: tuple[str, ...] = ("FS", "NU", "RNU-0.5", "DU-0.5", "DU-1.0")  # keys of the method table
    # torch's fused AdamW (TrainConfig.adamw_impl): the optimizer 3x faster, the full-scale MoE step ~6%
    # (benchmarks/bench_train.py); equal to the per-tensor loop to fp32 rounding, not bitwise, so runs
    # made with "loop" are not reproduced bit for bit by "fused".
    adamw_impl: str = "fused"
    # torch.compile of the decoder layers and the loss (TrainConfig.compile): equal to eager to fp32
    # rounding, not bitwise; the study's step at 65-67% of its GEMM-equivalent rate instead of 52-54%,
    # 1.2x the tokens/s (benchmarks/bench_train.py). ``--no-compile`` runs eagerly (as the committed study ran).
    compile: bool = False
    # The domain mix; None = the domains' sizes (every token of the corpus equally often).
    weights: dict[str, float] | None = field(default_factory=lambda: dict.fromkeys(DOMAINS, 0.25))
    # Processes per compared run (MoEs with EP = procs, the dense reference data-parallel) and how many
    # training stages run at once; threads per process = cores / (procs * jobs).
    procs: int = 2
    jobs: int = 1
    pretrain_warmup: float = 0.05  # warmup steps as a fraction of the steps (every phase re-warms)
    moe_warmup: float = 0.05
    single_seed: tuple[str, ...] = ()  # methods (and "dense") that run with the first seed only
    heldout_every_tokens: int = 0  # held-out evaluation during training (drop_upcycling.heldout)
    heldout_sequences: int = 32
    ablation: tuple[tuple[float, str], ...] = ()  # (r, index mode) Drop-Upcycling arms from the seed, seed 0
    ablation_steps: int = 0
    train_first: tuple[str, ...] = ()  # methods whose runs are trained before the others'


SCALES: dict[str, Scale] = {
    # Minutes on 2 cores: CI runs it and asserts on its outputs (recipes/checks/test_smoke_outputs.py).
    "ci": Scale(
        model={"base": "tiny-dense", "vocab_size": 2048, "max_position_embeddings": 256},
        vocab_size=2048, seq_len=64, global_batch_tokens=1024, micro_batch_size=4,
        pretrain_steps=150, pretrain_lr=3e-3, moe_steps=30, moe_lr=1e-3, seeds=(0,),
        eval_size="ci", routing_tokens=2048, dense_step_s=0.05, moe_step_s=0.12,
    ),
    # The committed CPU reproduction (reports/cpu_reproduction): 4 layers, 128 wide, 8 experts top-2.
    # Measured on 2 cores: dense 0.22 s/step (one process, 2 threads), MoE 0.40 s/step (EP=2, gloo),
    # plus ~12 s per torchrun start; 12 MoE runs + 2 dense references + BTX branches ~ 40 min.
    "full": Scale(
        model={"base": "tiny-dense", "vocab_size": 2048, "hidden_size": 128, "intermediate_size": 512,
               "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 4,
               "max_position_embeddings": 512},
        vocab_size=2048, seq_len=128, global_batch_tokens=2048, micro_batch_size=8,
        pretrain_steps=800, pretrain_lr=3e-3, moe_steps=250, moe_lr=1e-3, seeds=(0, 1),
        branch_steps=120, eval_size="default", eval_limit=30, routing_tokens=16384,
        dense_step_s=0.22, moe_step_s=0.42, methods=("FS", "NU", "RNU-0.5", "DU-0.5", "DU-1.0", "BTX"),
    ),
    # The CPU study (reports/cpu_reproduction; the plan is in its README, written before the run): a
    # dense seed trained to ~51 tokens per parameter, every MoE for half the seed's tokens with the same
    # re-warmed schedule, held-out loss per domain every 128 steps, 3 paired seeds of NU and DU-0.5,
    # and the r x index-mode ablation at a quarter of the MoE budget. Independent runs go one per core
    # (one process, one thread each; EP=2 is covered by the tests and the ci/full scales).
    # Measured on 2 cores: see reports/cpu_reproduction (stage times in smoke.json).
    "study": Scale(
        model={"base": "tiny-dense", "vocab_size": 512, "hidden_size": 64, "intermediate_size": 256,
               "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 4,
               "max_position_embeddings": 128},
        vocab_size=512, seq_len=128, global_batch_tokens=4096, micro_batch_size=32,
        pretrain_steps=4100, pretrain_lr=3e-3, moe_steps=2050, moe_lr=2e-3, seeds=(0, 1, 2),
        eval_size="short", eval_limit=30, routing_tokens=16384, dense_step_s=0.19, moe_step_s=0.28,
        methods=("FS", "NU", "RNU-0.5", "DU-0.5"), weights=None, procs=1, jobs=2,
        pretrain_warmup=0.01, moe_warmup=0.01, single_seed=("FS", "RNU-0.5", "dense"),
        heldout_every_tokens=128 * 4096, heldout_sequences=64,
        ablation=tuple((r, mode) for mode in ("per-matrix", "shared") for r in (0.0, 0.125, 0.25, 0.5, 0.75, 1.0)),
        ablation_steps=513, train_first=("NU", "DU-0.5"), compile=True,
    ),
}


# ============================================================================ stages
@dataclass
class Stage:
    """One resumable step: ``spec`` (hashed with the dependencies' hashes) determines ``outputs``."""

    name: str
    spec: dict[str, Any]
    outputs: list[Path]
    action: Callable[[], None]
    deps: list[str] = field(default_factory=list)
    estimate_s: float = 5.0
    resumable: bool = False  # keep partial outputs of an interrupted run with the same hash
    parallel: bool = False  # may run beside other parallel stages (Pipeline.jobs at a time)
    hash: str = ""


class Pipeline:
    """Runs stages in order, skipping finished ones, printing progress with elapsed time and an estimate."""

    def __init__(self, out: Path, force: bool, jobs: int = 1) -> None:
        self.out, self.force, self.jobs = out, force, jobs
        self.stages: list[Stage] = []
        self.by_name: dict[str, Stage] = {}
        self.times: dict[str, dict[str, Any]] = {}

    def add(self, stage: Stage) -> Stage:
        stage.spec = json.loads(json.dumps(stage.spec, default=str))  # paths -> str: hashed and stamped as JSON
        blob = json.dumps({"version": SMOKE_VERSION, "spec": stage.spec,
                           "deps": {d: self.by_name[d].hash for d in stage.deps}}, sort_keys=True)
        stage.hash = hashlib.sha256(blob.encode()).hexdigest()[:16]
        self.stages.append(stage)
        self.by_name[stage.name] = stage
        return stage

    def _stamp(self, stage: Stage) -> Path:
        return ReproLayout(self.out).stamp(stage.name)

    def _done(self, stage: Stage) -> bool:
        stamp = self._stamp(stage)
        if self.force or not stamp.is_file():
            return False
        record = json.loads(stamp.read_text())
        return record.get("hash") == stage.hash and record.get("status") == "done" and all(
            p.exists() for p in stage.outputs)

    def _prepare(self, stage: Stage) -> None:
        """Remove stale outputs; keep an interrupted resumable stage's outputs when its hash matches."""
        stamp = self._stamp(stage)
        record = json.loads(stamp.read_text()) if stamp.is_file() else {}
        keep = stage.resumable and not self.force and record.get("hash") == stage.hash
        if not keep:
            for p in stage.outputs:
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p)
                elif p.exists() or p.is_symlink():
                    p.unlink()
        _write_json(stamp, {"name": stage.name, "hash": stage.hash, "status": "started", "spec": stage.spec})

    def run(self) -> dict[str, dict[str, Any]]:
        """Run the stages in order; consecutive ``parallel`` stages run ``jobs`` at a time (threads that
        wait on subprocesses), each once its dependencies have finished. A failure stops the pipeline
        after the stages already running have finished."""
        self.t_start = time.perf_counter()
        self.done_est = self.done_actual = 0.0
        running: dict[str, Future] = {}
        with ThreadPoolExecutor(max_workers=max(1, self.jobs)) as pool:
            try:
                for i, stage in enumerate(self.stages, 1):
                    if stage.parallel and self.jobs > 1:
                        for dep in stage.deps:  # a dependency still running: wait for it
                            if dep in running:
                                running.pop(dep).result()
                        while len(running) >= self.jobs:
                            finished, _ = wait(running.values(), return_when=FIRST_COMPLETED)
                            for name in [n for n, f in running.items() if f in finished]:
                                running.pop(name).result()
                        running[stage.name] = pool.submit(self._execute, i, stage)
                    else:
                        for name in list(running):
                            running.pop(name).result()
                        self._execute(i, stage)
            finally:
                for future in running.values():
                    future.exception()  # wait for every started stage, whatever happened
            for future in running.values():
                future.result()
        _say(f"all {len(self.stages)} stages done in {_fmt(time.perf_counter() - self.t_start)}; outputs under {self.out}")
        return self.times

    def _execute(self, i: int, stage: Stage) -> None:
        """Run one stage unless it is up to date; stamp it done."""
        total = len(self.stages)
        if self._done(stage):
            record = json.loads(self._stamp(stage).read_text())
            self.times[stage.name] = {"seconds": record.get("seconds"), "skipped": True}
            _say(f"[{i}/{total}] {stage.name}: up to date (hash {stage.hash}), skipped")
            return
        # Measured vs predicted seconds of the stages run so far, once they add up to something.
        rate = min(4.0, max(0.25, self.done_actual / self.done_est)) if self.done_actual >= 30 else 1.0
        remaining_est = sum(s.estimate_s / (self.jobs if s.parallel else 1) for s in self.stages[i - 1:])
        elapsed = time.perf_counter() - self.t_start
        _say(f"[{i}/{total}] {stage.name} ... (elapsed {_fmt(elapsed)}, about {_fmt(remaining_est * rate)} left)")
        self._prepare(stage)
        t0 = time.perf_counter()
        stage.action()
        seconds = time.perf_counter() - t0
        missing = [str(p) for p in stage.outputs if not p.exists()]
        if missing:
            raise UserError(f"stage {stage.name} finished without writing {', '.join(missing)}")
        _write_json(self._stamp(stage), {"name": stage.name, "hash": stage.hash, "status": "done",
                                        "seconds": round(seconds, 2), "spec": stage.spec})
        self.times[stage.name] = {"seconds": round(seconds, 2), "skipped": False}
        self.done_est += stage.estimate_s
        self.done_actual += seconds
        _say(f"[{i}/{total}] {stage.name}: done in {_fmt(seconds)}")


def _write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_json_file(path, data)


def _say(msg: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} smoke: {msg}", flush=True)


def _fmt(seconds: float) -> str:
    seconds = round(seconds)
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def _sh(cmd: list[str], env: dict[str, str] | None = None, log_file: Path | None = None) -> None:
    """Run a command (printed first, so every stage can be repeated by hand); its failure fails the stage."""
    _say("$ " + " ".join(str(c) for c in cmd))
    full_env = {**os.environ, **(env or {})}
    if log_file is None:
        proc = subprocess.run([str(c) for c in cmd], env=full_env)
    else:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        with open(log_file, "a") as f:
            proc = subprocess.run([str(c) for c in cmd], env=full_env, stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode:
        tail = f" (log: {log_file})" if log_file else ""
        raise UserError(f"command failed with exit code {proc.returncode}: {' '.join(map(str, cmd))}{tail}")


def _warmup(steps: int, fraction: float) -> int:
    return max(1, int(steps * fraction))


def ablation_label(ratio: float, index_mode: str, seed: int) -> str:
    """``du0.125-shared-s0``: one run of the r x index-mode ablation."""
    return run_label(f"du{ratio:g}-{index_mode}", seed)


def _cli() -> list[str]:
    return [sys.executable, "-m", "drop_upcycling.cli"]


def _torchrun(nproc: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]


# ============================================================================ the plan
@dataclass(frozen=True)
class RunSpec:
    """One compared training run (an MoE of some method, or the dense reference) for one seed."""

    label: str
    method: str  # a key of the method table: FS, NU, ..., or "dense"
    seed: int
    init: Path  # the upcycled MoE, or the pre-trained dense checkpoint


class Smoke:
    """Builds the pipeline for a scale and output dir; :meth:`run` executes it."""

    def __init__(self, scale_name: str, out: Path, force: bool = False, corpus: str | None = None,
                 report_dir: Path | None = None, ablation_report_dir: Path | None = None, pinned: bool = True,
                 compile: bool | None = None) -> None:
        if scale_name not in SCALES:
            raise UserError(f"unknown scale {scale_name!r} (choose {', '.join(SCALES)})")
        self.scale_name, self.scale = scale_name, SCALES[scale_name]
        self.out, self.corpus, self.pinned = out, corpus, pinned
        self.compile = self.scale.compile if compile is None else compile  # None: the scale's choice
        self.layout = ReproLayout(out)
        self.pipe = Pipeline(out, force, jobs=self.scale.jobs)
        self.runs: list[RunSpec] = []
        self.ablation_runs: list[RunSpec] = []
        self.finals: dict[str, Path] = {}
        self.prepared_file = self.layout.prepared_file
        self.report_dir = report_dir or self.layout.report
        self.ablation_report_dir = ablation_report_dir or self.layout.ablation / "report"

    # -- paths
    def final_checkpoint(self, run_dir: Path, steps: int) -> Path:
        return checkpoint_dir(run_dir, steps)

    @property
    def pretrain_dir(self) -> Path:
        return self.layout.pretrain_run

    @property
    def dense_ckpt(self) -> Path:
        return self.final_checkpoint(self.pretrain_dir, self.scale.pretrain_steps)

    def prepared_root(self) -> Path:
        return Path(self.prepared_file.read_text().strip())

    @property
    def moe_runs(self) -> list[RunSpec]:
        return [r for r in self.runs if r.method != DENSE]

    # -- configs
    def train_config(self, *, method: str, seed: int, init: Path | None, steps: int, lr: float,
                     weights: dict[str, float] | None, out: Path, warmup: int) -> dict[str, Any]:
        s = self.scale
        data: dict[str, Any] = {"corpus": self.corpus, "vocab_size": s.vocab_size}
        if not self.pinned:
            data["pinned"] = False
        if weights is not None:
            data["weights"] = dict(weights)
        heldout = ({"heldout_every_tokens": s.heldout_every_tokens, "heldout_sequences": s.heldout_sequences}
                   if s.heldout_every_tokens else {})
        return {
            "method": method, "model": None if init is not None else dict(s.model),
            "init": str(init) if init is not None else None, "seed": seed, "data": data,
            "seq_len": s.seq_len, "global_batch_tokens": s.global_batch_tokens,
            "micro_batch_size": s.micro_batch_size, "steps": steps, "lr": lr, "min_lr": lr / 10,
            "warmup_steps": warmup, "dtype": "fp32", "out": str(out), "save_every": max(10, steps // 4),
            "keep_last": 1, "nodes": 1, "gpus_per_node": s.procs, "ep": 1, "adamw_impl": s.adamw_impl, **heldout,
            **({"compile": True} if self.compile else {}),  # absent when off: eager runs keep their stage hashes
        }

    def write_config(self, name: str, config: dict[str, Any]) -> Path:
        path = self.layout.configs / f"{name}.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        return path

    # -- stages
    def build(self) -> None:
        """Add every stage to the pipeline, in the order they run; fills ``self.runs`` and ``self.finals``.

        One method per stage family: data and dense pre-training; BTX's domain branches (when a method
        of the scale needs them); per seed, one upcycling per MoE method plus the dense reference run;
        the first-batch check over every initial checkpoint; one training per run; evaluation; routing
        counts per MoE; analysis and the report. The families must be added in this order: a stage's
        hash covers its spec and the hashes of its ``deps``, so every dependency is added first. The
        hash decides whether a finished stage is redone: changing a spec redoes that stage and every
        stage that depends on it, on the next run, and nothing else.
        """
        self._add_data_and_pretrain()
        branches = self._add_branches()
        for seed in self.scale.seeds:
            self._add_upcycling(seed, branches)
        self._add_ablation_upcycling()
        self._add_first_batch()
        self._add_training()
        self._add_ablation_training()
        self._add_evaluation()
        self._add_routing()
        self._add_analysis_and_report()

    def _methods(self) -> list[Method]:
        """The scale's MoE methods, in the table's order."""
        return [m for m in MOE_METHODS if m.key in self.scale.methods]

    def _add_data_and_pretrain(self) -> None:
        s = self.scale
        self.pipe.add(Stage("data", {"vocab_size": s.vocab_size, "corpus": self.corpus, **({} if self.pinned else {"pinned": False})}, [self.prepared_file],
                            self._prepare_data, estimate_s=25))
        pre = self.train_config(method=DENSE, seed=0, init=None, steps=s.pretrain_steps, lr=s.pretrain_lr,
                                weights=s.weights, out=self.pretrain_dir, warmup=_warmup(s.pretrain_steps, s.pretrain_warmup))
        self.pipe.add(Stage("pretrain", pre, [self.pretrain_dir], lambda: self._train("pretrain", pre, nproc=1),
                            deps=["data"], estimate_s=10 + s.pretrain_steps * s.dense_step_s, resumable=True))

    def _add_branches(self) -> dict[str, Path]:
        """The dense model continued on each domain group (BTX's sources besides the seed) -> final checkpoints."""
        s = self.scale
        if not any(m.branches for m in self._methods()):
            return {}
        branches = {}
        for dom, weights in BTX_BRANCHES.items():
            out = self.layout.branch(dom)
            cfg = self.train_config(method=f"{DENSE}-{dom}", seed=0, init=self.dense_ckpt, steps=s.branch_steps,
                                    lr=s.moe_lr, weights=weights, out=out, warmup=_warmup(s.branch_steps, s.moe_warmup))
            name = f"branch-{dom}"
            self.pipe.add(Stage(name, cfg, [out], lambda n=name, c=cfg: self._train(n, c, nproc=1), deps=["pretrain"],
                                estimate_s=10 + s.branch_steps * s.dense_step_s, resumable=True))
            branches[dom] = self.final_checkpoint(out, s.branch_steps)
        return branches

    def _add_upcycling(self, seed: int, branches: dict[str, Path]) -> None:
        """One ``drop-upcycling upcycle`` per MoE method for ``seed``, then the seed's dense reference run."""
        s = self.scale
        for m in self._methods():
            if m.key in s.single_seed and seed != s.seeds[0]:
                continue
            label = run_label(m.slug, seed)
            init = self.layout.upcycled(label)
            args = [*m.upcycle_args, "--num-experts", str(s.num_experts), "--top-k", str(s.top_k), "--seed", str(seed)]
            if m.branches:
                cmd = [*_cli(), "upcycle", init, *args, "--sources", self.dense_ckpt, *branches.values()]
                deps = ["pretrain", *(f"branch-{d}" for d in branches)]
            else:
                cmd = [*_cli(), "upcycle", self.dense_ckpt, init, *args]
                deps = ["pretrain"]
            self.pipe.add(Stage(f"upcycle-{label}", {"args": args}, [init], lambda c=cmd: _sh(c), deps=deps,
                                estimate_s=4))
            self.runs.append(RunSpec(label, m.key, seed, init))
        if DENSE not in s.single_seed or seed == s.seeds[0]:
            self.runs.append(RunSpec(run_label(BY_KEY[DENSE].slug, seed), DENSE, seed, self.dense_ckpt))

    def _add_ablation_upcycling(self) -> None:
        """Drop-Upcycling at each (r, index mode) of the scale's ablation, from the seed, with seed 0."""
        s = self.scale
        seed = s.seeds[0]
        for ratio, mode in s.ablation:
            label = ablation_label(ratio, mode, seed)
            init = self.layout.ablation / "upcycled" / label
            args = ["--method", "drop", "--ratio", str(ratio), "--index-mode", mode, "--num-experts",
                    str(s.num_experts), "--top-k", str(s.top_k), "--seed", str(seed)]
            cmd = [*_cli(), "upcycle", self.dense_ckpt, init, *args]
            self.pipe.add(Stage(f"upcycle-ablation-{label}", {"args": args}, [init], lambda c=cmd: _sh(c),
                                deps=["pretrain"], estimate_s=4))
            self.ablation_runs.append(RunSpec(label, f"DU-{ratio:g}", seed, init))

    def _add_first_batch(self) -> None:
        self.pipe.add(Stage("first-batch", {"runs": [asdict(r) for r in self.runs]}, [self.layout.first_batch],
                            self._first_batch, deps=[f"upcycle-{r.label}" for r in self.moe_runs],
                            estimate_s=5 + 2 * len(self.runs)))

    def _add_training(self) -> None:
        """Every run for the same budget: the MoEs with EP=2, the dense reference data-parallel (dp=2)."""
        s = self.scale
        # The runs the scale is about first (the study's paired seeds), then the others, seed by seed.
        for r in sorted(self.runs, key=lambda r: (r.method not in s.train_first, r.seed)):
            out = self.layout.run(r.label)
            cfg = self.train_config(method=r.method, seed=r.seed, init=r.init, steps=s.moe_steps, lr=s.moe_lr,
                                    weights=s.weights, out=out, warmup=_warmup(s.moe_steps, s.moe_warmup))
            dense = r.method == DENSE
            if not dense:
                cfg["ep"] = s.procs
            self.pipe.add(Stage(f"train-{r.label}", cfg, [out], lambda n=r.label, c=cfg: self._train(n, c, nproc=s.procs),
                                deps=["pretrain" if dense else f"upcycle-{r.label}"],
                                estimate_s=15 + s.moe_steps * (s.dense_step_s if dense else s.moe_step_s),
                                resumable=True, parallel=True))
            self.finals[r.label] = self.final_checkpoint(out, s.moe_steps)

    def _add_ablation_training(self) -> None:
        """The ablation's runs: the MoE schedule over ``ablation_steps`` (a shorter budget), held-out loss
        four times as often as the main runs."""
        s = self.scale
        for r in self.ablation_runs:
            out = self.layout.ablation_run(r.label)
            cfg = self.train_config(method=r.method, seed=r.seed, init=r.init, steps=s.ablation_steps, lr=s.moe_lr,
                                    weights=s.weights, out=out, warmup=_warmup(s.ablation_steps, s.moe_warmup))
            cfg["ep"] = s.procs
            cfg["heldout_every_tokens"] = max(s.global_batch_tokens, s.heldout_every_tokens // 4)
            self.pipe.add(Stage(f"train-ablation-{r.label}", cfg, [out],
                                lambda n=r.label, c=cfg: self._train(f"ablation-{n}", c, nproc=s.procs),
                                deps=[f"upcycle-ablation-{r.label}"], estimate_s=15 + s.ablation_steps * s.moe_step_s,
                                resumable=True, parallel=True))

    def _add_evaluation(self) -> None:
        s = self.scale
        spec = {"size": s.eval_size, "limit": s.eval_limit, "labels": list(self.finals)}
        self.pipe.add(Stage("evaluate", spec, [self.layout.eval_dir], self._evaluate,
                            deps=["pretrain", *(f"train-{r.label}" for r in self.runs)],
                            estimate_s=10 + (4 if s.eval_size == "ci" else 25) * (len(self.finals) + 1)))

    def _add_routing(self) -> None:
        s = self.scale
        for r in self.moe_runs:
            out = self.layout.routing_dir(r.label)
            cmd = [*_cli(), "routing", self.finals[r.label], "--out", out, "--tokens-per-domain",
                   str(s.routing_tokens), "--model-name", r.label, "--chunk-len", str(s.seq_len), "--batch-size", "8",
                   "--text", "test"]  # the models trained on the rest of these texts: count held-out text
            self.pipe.add(Stage(f"routing-{r.label}", {"tokens": s.routing_tokens}, [self.layout.routing_counts(r.label)],
                                lambda c=cmd: _sh([*c, "--data", self.prepared_root()]), deps=[f"train-{r.label}"],
                                estimate_s=6))

    def _add_analysis_and_report(self) -> None:
        routing_deps = [f"routing-{r.label}" for r in self.moe_runs]
        self.pipe.add(Stage("analyze", {"v": 2}, [self.layout.analysis], self._analyze,
                            deps=[*routing_deps, "evaluate"], estimate_s=20))
        report_deps = ["analyze"]
        if self.scale.heldout_every_tokens:
            study = self.layout.analysis_study
            self.pipe.add(Stage("matmul-rate", {"v": 1, "jobs": self.scale.jobs}, [self.layout.matmul_rate],
                                self._matmul_rate, estimate_s=15))
            self.pipe.add(Stage("analyze-study", {"v": 1, "ablation": str(self.ablation_report_dir)},
                                [study / "study.json"], self._analyze_study,
                                deps=["analyze", "matmul-rate", *(f"train-ablation-{r.label}" for r in self.ablation_runs)],
                                estimate_s=20))
            report_deps.append("analyze-study")
        self.pipe.add(Stage("report", {"v": 1, "out": str(self.report_dir)}, [self.report_dir / "README.md"],
                            self._report, deps=report_deps, estimate_s=15))

    # -- actions
    def _prepare_data(self) -> None:
        from . import data as data_mod

        prepared = data_mod.prepare_all(corpus=self.corpus, vocab_size=self.scale.vocab_size, pinned=self.pinned)
        self.prepared_file.parent.mkdir(parents=True, exist_ok=True)
        self.prepared_file.write_text(f"{prepared.root}\n")

    def _train(self, name: str, config: dict[str, Any], nproc: int) -> None:
        path = self.write_config(name, config)
        env = {"OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // (nproc * self.scale.jobs)))}
        out = Path(config["out"])
        # Only an interrupted run (same hash, see Pipeline._prepare) is resumed: a fresh one writes run.json.
        # One killed before its first checkpoint has nothing to resume from: it starts over (--restart).
        resume = []
        if (out / METRICS).is_file():
            from .train import resume_point

            try:
                resume = ["--resume"] if resume_point(out) else []
            except UserError:
                resume = ["--restart"]
        if nproc == 1:
            _sh([*_cli(), "train", path, *resume], env=env, log_file=out / "train.log")
        else:
            _sh([*_torchrun(nproc), "-m", "drop_upcycling.train", path, *resume], env=env, log_file=out / "train.log")

    def _first_batch(self) -> None:
        s = self.scale
        per_seed = {}
        for seed in s.seeds:
            inits = {r.label: r.init for r in self.runs if r.seed == seed and r.method != "dense"}
            losses = first_batch_losses({"dense-final": self.dense_ckpt, **inits}, self.prepared_root(), s, seed,
                                        world_size=s.procs)
            per_seed[str(seed)] = losses
        _write_json(self.layout.first_batch, {
            "what": "LM loss (mean token cross-entropy) of each checkpoint on the first global batch that the "
                    "MoE and dense-reference runs of that seed train on (EP=2, 2 data ranks), computed by an "
                    "evaluation pass before training; 'dense-final' is the pre-trained dense model.",
            "global_batch_tokens": s.global_batch_tokens, "world_size": s.procs, "losses": per_seed})

    def _evaluate(self) -> None:
        s = self.scale
        ckpts = [self.dense_ckpt, *self.finals.values()]
        cmd = [*_cli(), "evaluate", *ckpts, "--suite", "local", "--size", s.eval_size, "--out", self.layout.eval_dir,
               "--overwrite", "--batch-size", "16", "--data", self.prepared_root()]
        if s.eval_limit:
            cmd += ["--limit", str(s.eval_limit)]
        _sh(cmd, log_file=self.layout.logs / "evaluate.log")

    def _analyze(self) -> None:
        out = self.layout.analysis
        counts = [self.layout.routing_counts(r.label) for r in self.moe_runs]
        _sh([*_cli(), "analyze", "routing", "--counts", *counts, "--out", out / "routing"])
        dense = [self.layout.run(r.label) for r in self.runs if r.method == DENSE]
        moes = [self.layout.run(r.label) for r in self.moe_runs]
        _sh([*_cli(), "analyze", "curves", *moes, *dense[1:], "--dense", dense[0], "--out", out / "curves"])
        nu = next(r for r in self.runs if r.method == "NU")
        _sh([*_cli(), "flops", "--model", self.dense_ckpt, "--model", self.finals[nu.label],
             "--tokens", str(self.scale.moe_steps * self.scale.global_batch_tokens), "--seq-len",
             str(self.scale.seq_len), "--causal", "--format", "table", "--out", out / "flops"])
        _write_json(out / "manifest.json", self.manifest())

    def _matmul_rate(self) -> None:
        """The machine's matmul rate at the model's FFN shapes, as the runs used it (``jobs`` processes of
        one thread at once): the reference of the study's throughput share."""
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        s = self.scale
        shape = (s.global_batch_tokens // s.procs, s.model["hidden_size"], s.model["intermediate_size"])
        threads = max(1, (os.cpu_count() or 2) // (s.procs * s.jobs))
        with ProcessPoolExecutor(s.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            rates = list(pool.map(swiglu_flops_per_s, [shape] * s.jobs, [threads] * s.jobs))
        _write_json(self.layout.matmul_rate, {
            "what": "fp32 FLOP/s of forward + backward of a SwiGLU FFN (3 matmuls, no routing) at the model's "
                    "shape, summed over concurrent_runs processes running at once, as the training runs did",
            "tokens": shape[0], "hidden": shape[1], "ffn": shape[2], "threads_per_process": threads,
            "concurrent_runs": s.jobs, "per_process_flops_per_s": rates, "flops_per_s": sum(rates)})

    def _analyze_study(self) -> None:
        """Held-out curves, the DU - NU crossover, experts' similarity and specialization over training,
        and the ablation (``drop-upcycling analyze study``)."""
        cmd = [*_cli(), "analyze", "study", self.out, "--out", self.layout.analysis_study]
        if self.ablation_runs:
            cmd += ["--ablation-out", self.ablation_report_dir]
        _sh(cmd)

    def _report(self) -> None:
        _write_json(self.layout.manifest, self.record(final=False))
        _sh([*_cli(), "report", self.out, "--out", self.report_dir])

    def manifest(self) -> dict[str, Any]:
        return {"scale": self.scale_name, "scale_config": asdict(self.scale),
                "pretrain": {"dir": self._rel(self.pretrain_dir), "checkpoint": self._rel(self.dense_ckpt)},
                "runs": [{"label": r.label, "method": r.method, "seed": r.seed, "dir": self._rel(self.layout.run(r.label)),
                          "checkpoint": self._rel(self.finals[r.label])} for r in self.runs],
                "ablation": [{"label": r.label, "method": r.method, "seed": r.seed,
                              "dir": self._rel(self.layout.ablation_run(r.label))} for r in self.ablation_runs]}

    def _rel(self, path: Path) -> str:
        return path.relative_to(self.out).as_posix()

    def record(self, final: bool) -> dict[str, Any]:
        """smoke.json: the manifest plus stage times (the report shows it as provenance)."""
        return {**self.manifest(), "stage_seconds": self.pipe.times, "started": self.started,
                "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z") if final else None,
                "total_seconds": round(time.perf_counter() - self.t0, 1), "cpu_count": os.cpu_count()}

    def run(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        if self.prepared_file.is_file() and not (self.prepared_root() / "prepared.json").is_file():
            self.prepared_file.unlink()  # the data cache was cleared: prepare it again (same key, same data)
        self.build()
        self.t0, self.started = time.perf_counter(), time.strftime("%Y-%m-%dT%H:%M:%S%z")
        self.pipe.run()
        _write_json(self.layout.manifest, self.record(final=True))


# ============================================================================ the machine's matmul rate
def swiglu_flops_per_s(shape: tuple[int, int, int], threads: int, seconds: float = 5.0) -> float:
    """FLOP/s of forward + backward of ``silu(x W1^T) * (x W3^T) W2^T`` for x of ``shape[:2]``, FFN ``shape[2]``."""
    import torch

    torch.set_num_threads(threads)
    tokens, hidden, ffn = shape
    g = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, hidden, generator=g, requires_grad=True)
    w1, w3 = (torch.randn(ffn, hidden, generator=g, requires_grad=True) for _ in range(2))
    w2 = torch.randn(hidden, ffn, generator=g, requires_grad=True)

    def step() -> None:
        y = (torch.nn.functional.silu(x @ w1.T) * (x @ w3.T)) @ w2.T
        y.sum().backward()

    for _ in range(3):
        step()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        step()
        n += 1
    return 18.0 * tokens * hidden * ffn * n / (time.perf_counter() - t0)  # 3 matmuls x (fwd + 2 bwd) x 2 FLOP


# ============================================================================ the first-batch check
def first_global_batch(prepared_root: Path, scale: Scale, seed: int, world_size: int = 2):
    """The first global batch of a run with this seed on ``world_size`` data ranks, as the trainer reads it:
    rank ``r``'s sequences are its reader's first ``global / world_size`` sequences, ranks concatenated."""
    import torch

    from .data import PreparedData, TokenSequenceReader

    prepared = PreparedData.load(prepared_root)
    files = prepared.files_by_domain("train", list(scale.weights) if scale.weights else None)
    per_rank = scale.global_batch_tokens // scale.seq_len // world_size
    batches = [TokenSequenceReader(files, scale.seq_len, weights=scale.weights, seed=seed, rank=r,
                                   world_size=world_size).next_batch(per_rank) for r in range(world_size)]
    return torch.cat(batches)


def first_batch_losses(ckpts: dict[str, Path], prepared_root: Path, scale: Scale, seed: int,
                       world_size: int = 2) -> dict[str, float]:
    """LM loss of each checkpoint on the first global batch of the seed's runs (fp32, no grad)."""
    import torch

    from .checkpoint import load_model

    ids = first_global_batch(prepared_root, scale, seed, world_size)
    out = {}
    with torch.no_grad():
        for label, path in ckpts.items():
            model = load_model(path, dtype=torch.float32).eval()
            out[label] = float(model(ids, labels=ids).lm_loss)
    return out


# ============================================================================ CLI
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="recipes/run_smoke.sh", description=__doc__.splitlines()[0])
    parser.add_argument("--scale", default="full", choices=tuple(SCALES),
                        help="ci: minutes (CI); full: < 1 h; study: the CPU study, < 2 h (reports/cpu_reproduction)")
    parser.add_argument("--out", type=Path, default=Path("reports/smoke"), help="output dir (default reports/smoke)")
    parser.add_argument("--force", action="store_true", help="redo every stage, even up-to-date ones")
    parser.add_argument("--corpus", default=None, help="corpus dir (default $DROP_UPCYCLING_CORPUS / cache)")
    parser.add_argument("--unpinned", action="store_true",
                        help="--corpus is a folder of one's own in the same layout (no pinned sha256 check)")
    parser.add_argument("--report", type=Path, default=None, help="report dir (default OUT/report)")
    parser.add_argument("--ablation-report", type=Path, default=None,
                        help="study scale: the r x index-mode ablation's report dir (default OUT/ablation/report)")
    parser.add_argument("--no-compile", dest="compile", action="store_false", default=None,
                        help="train eagerly where the scale compiles (study): bitwise what runs made before did")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("MPLBACKEND", "Agg")
    try:
        Smoke(args.scale, args.out, force=args.force, corpus=args.corpus, report_dir=args.report,
              ablation_report_dir=args.ablation_report, pinned=not args.unpinned, compile=args.compile).run()
    except UserError as e:
        print(f"run_smoke: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
