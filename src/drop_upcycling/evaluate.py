"""``drop-upcycling evaluate``: score HF checkpoints with lm-evaluation-harness (the stock ``hf`` backend).

Tasks are data (lm-eval task YAMLs), never code paths of our own:

* ``local``: a fully offline suite generated from the corpus test split as YAML + JSONL in an
  include dir (:mod:`.local_suite`: per domain a perplexity task and a multiple-choice cloze), built
  once per test split, size and seed and cached.
* ``paper``: the group ``du_paper`` (``tasks/paper/``): lm-eval 0.4.13's versions of the paper's
  tasks at the paper's shot counts plus our YAMLs for JEMHopQA, NIILC and WMT20 en-ja / ja-en. It
  needs the Hub; offline it stops before loading any model, naming every dataset not in the cache.
* any comma-separated list of lm-eval task or group names (the built-in ones, ours, and the local
  suite's ``du_*`` names).

Writes lm-eval's results JSON per checkpoint (``OUT/<label>.json``) and one tidy CSV for all
(``OUT/results.csv``: checkpoint, task, metric, value, stderr, n), into a temp dir renamed at the end.
:func:`evaluate` takes its settings as one :class:`EvalOptions`.
"""

from __future__ import annotations

import argparse
import csv
import difflib
import functools
import io
import json
import logging
import os
import re
import socket
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from .checkpoint import TOKENIZER_FILES, CheckpointReader
from .errors import UserError
from .fsio import atomic_dir, write_text
from .layout import CHECKPOINTS, LATEST, latest_checkpoint
from .local_suite import (
    LOCAL_GROUP,
    LOCAL_SIZES,
    cached_local_suite,
    is_local_task,
    resolve_test_dir,
    wants_local,
)

log = logging.getLogger(__name__)

TASKS_DIR = Path(__file__).resolve().parent / "tasks"
PAPER_DIR = TASKS_DIR / "paper"
PAPER_GROUP = "du_paper"
CSV_COLUMNS = ("checkpoint", "task", "metric", "value", "stderr", "n")
# Python packages the paper suite's metric code imports (lm-eval's ja_leaderboard_xlsum: MeCab ROUGE-2).
PAPER_REQUIREMENTS = {"ja_leaderboard_xlsum": ("fugashi", "unidic_lite", "emoji", "neologdn", "rouge_score")}
# Metrics that lm-eval tasks fetch from the Hub with ``evaluate.load`` when they aggregate (after all generation).
HUB_METRICS = {"squadv2": "squad_v2"}


# ---------------------------------------------------------------------------- options
@dataclass(frozen=True)
class EvalOptions:
    """How :func:`evaluate` scores checkpoints: everything but the checkpoints and the output folder.

    The defaults are the command line's. The local suite comes from ``local_dir`` when given; else
    it is built (and cached) at ``size`` with ``seed`` from the test split that ``splits``, ``data``
    or ``corpus``/``cache_dir`` name (:func:`~.local_suite.resolve_test_dir`), and only when
    ``suite`` asks for it.
    """

    suite: str = "local"  # local, paper, or comma-separated lm-eval task/group names
    tokenizer: str | Path | None = None  # for checkpoints without tokenizer files
    limit: int | float | None = None  # documents per task: a count, or a fraction if < 1
    seed: int = 0  # the local suite's items and every lm-eval seed
    # the local suite
    size: str = "default"
    local_dir: str | Path | None = None
    splits: str | Path | None = None
    data: str | Path | None = None
    corpus: str | Path | None = None
    cache_dir: str | Path | None = None
    # the model
    device: str | None = None  # default: cuda when available
    dtype: str = "float32"
    batch_size: int | str = 16  # or "auto"
    threads: int | None = None  # CPU threads; default $OMP_NUM_THREADS or all cores


# ---------------------------------------------------------------------------- checkpoints of runs
def run_checkpoints(runs: str | Path) -> list[Path]:
    """The latest checkpoint of every training run under ``runs`` (a run is a dir with ``checkpoints/latest``)."""
    runs = Path(runs)
    if not runs.is_dir():
        raise UserError(f"--runs {runs} is not a directory")
    found = []
    for pointer in sorted(runs.glob(f"**/{CHECKPOINTS}/{LATEST}")):
        ckpt = latest_checkpoint(pointer.parent.parent)
        if ckpt is not None:
            found.append(ckpt)
    if not found:
        raise UserError(f"no training run with a finished checkpoint under {runs} ({CHECKPOINTS}/{LATEST} missing)")
    return found


# ---------------------------------------------------------------------------- task resolution
@dataclass
class TaskPlan:
    """What to evaluate: task/group names and the include paths that define them."""

    names: list[str]
    include_paths: list[Path]
    include_defaults: bool


def plan_tasks(suite: str, local_dir: Path | None) -> TaskPlan:
    """``local``, ``paper`` or a comma-separated task list -> names + include paths.

    lm-eval's own task index (about 8 s to build) is only scanned when a name may need it.
    """
    if suite == "local":
        if local_dir is None:
            raise UserError("the local suite needs its folder (build_local_suite)")
        return TaskPlan([LOCAL_GROUP], [local_dir], include_defaults=False)
    if suite == "paper":
        return TaskPlan([PAPER_GROUP], [PAPER_DIR], include_defaults=True)
    names = [t.strip() for t in suite.split(",") if t.strip()]
    if not names:
        raise UserError("--suite is empty: give local, paper or a comma-separated list of lm-eval tasks")
    if local_dir is not None and all(is_local_task(n) for n in names):
        return TaskPlan(names, [local_dir], include_defaults=False)
    paths = [PAPER_DIR] + ([local_dir] if local_dir is not None else [])
    return TaskPlan(names, paths, include_defaults=True)


@functools.lru_cache(maxsize=4)
def _cached_task_manager(paths: tuple[str, ...], include_defaults: bool):
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=list(paths), include_defaults=include_defaults)


def task_manager(plan: TaskPlan):
    tm = _cached_task_manager(tuple(str(p) for p in plan.include_paths), plan.include_defaults)
    unknown = [n for n in plan.names if n not in tm.all_tasks]
    if unknown:
        hints = []
        for n in unknown:
            close = difflib.get_close_matches(n, tm.all_tasks, n=3)
            hints.append(f"{n!r}" + (f" (did you mean {', '.join(close)}?)" if close else ""))
        raise UserError(f"unknown lm-eval task {', '.join(hints)}")
    return tm


def leaf_tasks(tm, names: Iterable[str]) -> list[str]:
    """The tasks under groups/tags, resolved from the YAML index without importing any task code."""
    from lm_eval.tasks._yaml_loader import load_yaml

    out: list[str] = []
    stack = list(names)[::-1]
    while stack:
        name = stack.pop()
        entry = tm.task_index.get(name)
        if entry is None:
            raise UserError(f"unknown lm-eval task {name!r}")
        kind = entry.kind.name
        if kind == "TAG":
            stack += sorted(n for n, e in tm.task_index.items() if name in (e.tags or ()))[::-1]
        elif kind == "GROUP":
            cfg = load_yaml(entry.yaml_path, resolve_func=False, recursive=True)
            members = cfg.get("task", [])
            stack += [m["task"] if isinstance(m, dict) else m for m in members][::-1]
        elif name not in out:
            out.append(name)
    return out


def task_datasets(tm, tasks: Iterable[str]) -> dict[str, tuple[str, str | None]]:
    """task -> (dataset_path, dataset_name) for tasks on the Hub (local json/csv files are not listed)."""
    from lm_eval.tasks._yaml_loader import load_yaml

    found = {}
    for task in tasks:
        entry = tm.task_index[task]
        cfg = load_yaml(entry.yaml_path, resolve_func=False, recursive=True) if entry.yaml_path else {}
        path, name = cfg.get("dataset_path"), cfg.get("dataset_name")
        if path is None and "class" in cfg:  # Python tasks (squadv2) keep it on the class
            cls = _resolve_class(entry.yaml_path, cfg["class"])
            path, name = getattr(cls, "DATASET_PATH", None), getattr(cls, "DATASET_NAME", None)
        if path and path not in ("json", "csv", "parquet", "text", "arrow"):
            found[task] = (path, name)
    return found


def _resolve_class(yaml_path: Path, ref: Any):
    import importlib.util

    text = getattr(ref, "value", None) or str(ref).removeprefix("!function").strip()
    module, _, attr = str(text).rpartition(".")
    spec = importlib.util.spec_from_file_location(f"_du_task_{module}", Path(yaml_path).parent / f"{module}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return getattr(mod, attr)


def hub_offline() -> bool:
    """Whether the Hub is unreachable or switched off (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE)."""
    flags = [os.environ.get(k, "").upper() for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")]
    if any(f in ("1", "ON", "YES", "TRUE") for f in flags):
        return True
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=3).close()
        return False
    except OSError:
        return True


def force_offline() -> None:
    """Switch every Hub client in this process to offline mode (they read their flags at import).

    Called once the Hub is known to be unreachable, so that nothing later (lm-eval, ``datasets``,
    ``evaluate``, ``transformers``) waits on network retries.
    """
    import datasets
    import huggingface_hub.constants

    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "HF_EVALUATE_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ[var] = "1"
    huggingface_hub.constants.HF_HUB_OFFLINE = True
    datasets.config.HF_HUB_OFFLINE = datasets.config.HF_DATASETS_OFFLINE = True
    try:
        import evaluate.config

        evaluate.config.HF_EVALUATE_OFFLINE = True
    except ImportError:
        pass


def check_datasets_cached(datasets_by_task: dict[str, tuple[str, str | None]], tasks: Iterable[str] = ()) -> None:
    """Offline: fail at once, naming every Hub dataset (and Hub metric) that is not in the local cache.

    Asks ``datasets`` (and ``evaluate``) in offline mode, what lm-eval will call later, so "cached"
    means exactly "lm-eval will find it"; nothing is retried against the network. Metrics matter
    because lm-eval loads them only when it aggregates, after every generation has run.
    """
    import datasets
    from datasets.utils.logging import disable_progress_bar

    disable_progress_bar()
    missing: list[str] = []
    for task, (path, name) in datasets_by_task.items():
        label = f"{path}" + (f" ({name})" if name else "")
        try:
            datasets.load_dataset_builder(path, name)
        except Exception:  # ConnectionError, FileNotFoundError, DatasetNotFoundError... all mean "not here"
            missing.append(f"{label} for {task}")
    for task in tasks:
        if task in HUB_METRICS:
            import evaluate

            try:
                evaluate.load(HUB_METRICS[task])
            except Exception:
                missing.append(f"metric {HUB_METRICS[task]} (evaluate) for {task}")
    if missing:
        raise UserError(
            "offline (HF_HUB_OFFLINE) and these are not in the Hugging Face cache: "
            + "; ".join(missing) + ". Run once with network access to download them, or use --suite local"
        )


def check_requirements(tasks: Iterable[str]) -> None:
    """Fail before any model is loaded if a task's metric code needs a package that is missing."""
    import importlib.util

    for task in tasks:
        missing = [m for m in PAPER_REQUIREMENTS.get(task, ()) if importlib.util.find_spec(m) is None]
        if missing:
            raise UserError(f"task {task} needs the Python packages {', '.join(missing)} "
                            f"(pip install 'lm-eval[japanese_leaderboard]'); not installed")


# ---------------------------------------------------------------------------- checkpoints
def _has_tokenizer(path: Path) -> bool:
    return any((path / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "vocab.json")) and (
        path / "tokenizer_config.json"
    ).is_file()


def check_checkpoint(path: str | Path, tokenizer: str | Path | None) -> Path:
    """A readable HF checkpoint dir (config + weights) with a tokenizer (its own or ``tokenizer``)."""
    path = Path(path)
    CheckpointReader(path)  # raises a UserError naming what is missing or broken
    if tokenizer is None and not _has_tokenizer(path):
        raise UserError(f"checkpoint {path} has no tokenizer files ({', '.join(TOKENIZER_FILES[:2])}); "
                        "pass --tokenizer DIR")
    return path


def checkpoint_labels(paths: Sequence[Path]) -> list[str]:
    """Short unique names: the directory name, or more of the path where names repeat.

    A training run's ``RUN/checkpoints/step-N`` is named ``RUN__step-N`` (the ``checkpoints`` level
    says nothing).
    """
    parts = []
    for p in paths:
        q = p.resolve().parts
        parts.append(q[:-2] + q[-1:] if len(q) > 2 and q[-2] == "checkpoints" else q)
    for depth in range(1, max(len(p) for p in parts) + 1):
        labels = ["__".join(p[-depth:]) for p in parts]
        if len(set(labels)) == len(labels):
            return [re.sub(r"[^A-Za-z0-9_.=-]+", "_", lbl) for lbl in labels]
    raise UserError("the same checkpoint is given twice")


# ---------------------------------------------------------------------------- running lm-eval
def set_threads(threads: int | None) -> int:
    """CPU threads for torch: ``threads``, else $OMP_NUM_THREADS, else all cores."""
    import torch

    n = threads or int(os.environ.get("OMP_NUM_THREADS", 0) or 0) or os.cpu_count() or 1
    torch.set_num_threads(n)
    return n


def evaluate_checkpoint(ckpt: Path, tm, names: list[str], *, tokenizer: Path | None = None, device: str = "cpu",
                        dtype: str = "float32", batch_size: int | str = 16, limit: int | float | None = None,
                        seed: int = 0) -> dict:
    """lm-eval's ``simple_evaluate`` with the stock ``hf`` backend; returns its results dict."""
    from lm_eval import simple_evaluate

    model_args = {"pretrained": str(ckpt), "tokenizer": str(tokenizer or ckpt), "dtype": dtype,
                  "device": device, "trust_remote_code": False}
    try:
        return simple_evaluate(
            model="hf", model_args=model_args, tasks=names, task_manager=tm, batch_size=batch_size,
            limit=limit, log_samples=False, bootstrap_iters=0 if limit else 1000, random_seed=seed,
            numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed,
        )
    except ModuleNotFoundError as e:
        raise UserError(f"a task needs a Python package that is not installed: {e}") from None


def results_rows(label: str, results: dict) -> list[dict]:
    """lm-eval results -> tidy rows (checkpoint, task, metric, value, stderr, n).

    lm-eval keys metrics as ``name,filter``; the filter is dropped when it is ``none``.
    """
    rows = []
    n_samples = results.get("n-samples", {})
    for task, metrics in sorted(results.get("results", {}).items()):
        n = n_samples.get(task, {}).get("effective")
        for key, value in metrics.items():
            if key in ("alias", "sample_len") or "_stderr," in key or not isinstance(value, int | float):
                continue
            name, _, filt = key.partition(",")
            stderr = metrics.get(f"{name}_stderr,{filt}")
            rows.append({
                "checkpoint": label,
                "task": task,
                "metric": name if filt in ("none", "") else f"{name},{filt}",
                "value": float(value),
                "stderr": float(stderr) if isinstance(stderr, int | float) else "",
                "n": n if n is not None else "",
            })
    return rows


def write_csv(path: Path, rows: Sequence[dict]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_text(path, buf.getvalue())


def _results_json(results: dict) -> str:
    from lm_eval.utils import handle_non_serializable

    return json.dumps(results, indent=2, default=handle_non_serializable, ensure_ascii=False)


def evaluate(checkpoints: Sequence[str | Path], out: str | Path, opts: EvalOptions, *,
             overwrite: bool = False) -> Path:
    """Evaluate every checkpoint on ``opts.suite``; write ``OUT/<label>.json`` and ``OUT/results.csv``. Returns OUT.

    Every check that can fail (device, paths, tokenizers, task names, offline datasets, packages)
    runs before the first model is loaded: a missing dataset found after the first checkpoint's
    hour of scoring would cost that hour, and would leave nothing behind (OUT appears only whole).
    """
    from .parallel import resolve_device

    device = resolve_device(opts.device)
    if not checkpoints:
        raise UserError("no checkpoint given")
    out = Path(out)
    if out.exists() and not overwrite:
        raise UserError(f"{out} already exists (pass --overwrite to replace it)")
    tok = _tokenizer_override(opts.tokenizer)
    paths = [check_checkpoint(c, tok) for c in checkpoints]
    labels = checkpoint_labels(paths)
    local = _local_suite(opts, paths[0])
    plan = plan_tasks(opts.suite, local)
    tm = task_manager(plan)
    _check_runnable(tm, plan.names)

    if device == "cpu":
        log.info("using %d CPU threads", set_threads(opts.threads))
    all_rows: list[dict] = []
    with atomic_dir(out, overwrite=overwrite) as tmp:
        for path, label in zip(paths, labels, strict=True):
            all_rows += _evaluate_one(path, label, tmp, tm, plan, opts, device=device, tokenizer=tok, local=local)
        write_csv(tmp / "results.csv", all_rows)
    print(format_table(all_rows))
    return out


def _tokenizer_override(tokenizer: str | Path | None) -> Path | None:
    """``--tokenizer`` as a path, checked to hold a tokenizer, or None (each checkpoint's own)."""
    tok = Path(tokenizer) if tokenizer is not None else None
    if tok is not None and not _has_tokenizer(tok):
        raise UserError(f"--tokenizer {tok} holds no tokenizer (tokenizer.json + tokenizer_config.json)")
    return tok


def _local_suite(opts: EvalOptions, first_checkpoint: Path) -> Path | None:
    """The local suite folder: ``opts.local_dir`` (checked), else built and cached when the suite names
    local tasks, else None.

    When the test split has to come from prepared data, the data is prepared with the first
    checkpoint's vocabulary size: that is how training prepared it, so the cached data is reused
    instead of tokenizing the corpus again for a vocabulary nobody trained with.
    """
    if opts.local_dir is not None:
        local = Path(opts.local_dir)
        if not (local / f"{LOCAL_GROUP}.yaml").is_file():
            raise UserError(f"{local} is not a local suite folder (no {LOCAL_GROUP}.yaml)")
        return local
    if not wants_local(opts.suite):
        return None
    vocab = CheckpointReader(first_checkpoint).config.vocab_size
    test_dir = resolve_test_dir(splits=opts.splits, data=opts.data, corpus=opts.corpus, cache_dir=opts.cache_dir,
                                vocab_size=vocab)
    return cached_local_suite(test_dir, opts.size, opts.seed)


def _check_runnable(tm, names: Sequence[str]) -> None:
    """Every task under ``names`` can run to the end: offline, its Hub datasets and metrics are cached
    (lm-eval would otherwise fail only when it reaches them); its metric packages are installed."""
    leaves = leaf_tasks(tm, names)
    hub = task_datasets(tm, leaves)
    if (hub or any(t in HUB_METRICS for t in leaves)) and hub_offline():
        force_offline()
        check_datasets_cached(hub, leaves)
    check_requirements(leaves)


def _evaluate_one(path: Path, label: str, tmp: Path, tm, plan: TaskPlan, opts: EvalOptions, *, device: str,
                  tokenizer: Path | None, local: Path | None) -> list[dict]:
    """Score one checkpoint; write ``tmp/<label>.json`` (lm-eval's results plus where they came from);
    return its rows of ``results.csv``."""
    t0 = time.perf_counter()
    log.info("evaluating %s on %s", path, ", ".join(plan.names))
    results = evaluate_checkpoint(path, tm, plan.names, tokenizer=tokenizer, device=device, dtype=opts.dtype,
                                  batch_size=opts.batch_size, limit=opts.limit, seed=opts.seed)
    results["drop_upcycling"] = {"checkpoint": str(path.resolve()), "label": label, "suite": opts.suite,
                                 "local_suite": str(local) if local else None,
                                 "seconds": time.perf_counter() - t0}
    (tmp / f"{label}.json").write_text(_results_json(results))
    rows = results_rows(label, results)
    log.info("%s: %d metrics in %.1f s", label, len(rows), time.perf_counter() - t0)
    return rows


def format_table(rows: Sequence[dict]) -> str:
    """The CSV as aligned text for the terminal."""
    lines = [f"{'checkpoint':<24} {'task':<28} {'metric':<18} {'value':>12} {'stderr':>10} {'n':>6}"]
    for r in rows:
        se = f"{r['stderr']:.4g}" if r["stderr"] != "" else ""
        lines.append(f"{r['checkpoint'][:24]:<24} {r['task'][:28]:<28} {r['metric'][:18]:<18} "
                     f"{r['value']:>12.5g} {se:>10} {r['n']!s:>6}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------- CLI
def configure_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoints", nargs="*", metavar="CKPT", help="HF checkpoint dirs (dense Llama or Mixtral MoE)")
    p.add_argument("--suite", default="local",
                   help="local (offline, from the corpus test split), paper (the paper's tasks; needs the Hub) "
                        "or a comma-separated list of lm-eval tasks; default local")
    p.add_argument("--out", required=True, help="output dir: <checkpoint>.json per checkpoint and results.csv")
    p.add_argument("--tokenizer", default=None, help="tokenizer dir for checkpoints that have none")
    p.add_argument("--limit", type=float, default=None, help="at most N documents per task (a fraction if < 1)")
    p.add_argument("--size", default="default", choices=tuple(LOCAL_SIZES), help="local suite size; ci = tiny")
    p.add_argument("--local-dir", default=None, help="an existing local suite folder (default: built and cached)")
    p.add_argument("--splits", default=None, help="test documents for the local suite: <domain>.jsonl (or test/)")
    p.add_argument("--data", default=None, help="a prepared data dir (`drop-upcycling data`); its test split is used")
    p.add_argument("--corpus", default=None, help="corpus dir, when neither --splits nor --data is given")
    p.add_argument("--cache-dir", default=None, help="cache for the prepared data")
    p.add_argument("--runs", default=None, metavar="DIR",
                   help="evaluate the latest checkpoint of every training run under DIR (plus any CKPT given)")
    p.add_argument("--seed", type=int, default=0, help="local suite items and lm-eval's seeds")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:0...; default cuda when available")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--batch-size", default="16", help="an integer or auto")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: $OMP_NUM_THREADS or all cores)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")


def run(args: argparse.Namespace) -> int:
    opts = options_from_args(args)
    ckpts = list(args.checkpoints) + (run_checkpoints(args.runs) if args.runs else [])
    if not ckpts:
        raise UserError("no checkpoint given: pass CKPT dirs or --runs DIR")
    out = evaluate(ckpts, args.out, opts, overwrite=args.overwrite)
    print(f"results: {out / 'results.csv'}")
    return 0


def options_from_args(args: argparse.Namespace) -> EvalOptions:
    """The command line's options, with ``--limit`` and ``--batch-size`` parsed and checked."""
    limit = args.limit
    if limit is not None:
        if limit <= 0:
            raise UserError(f"--limit must be > 0, got {limit}")
        limit = int(limit) if limit >= 1 else limit
    batch = args.batch_size if args.batch_size == "auto" else _positive_int("--batch-size", args.batch_size)
    return EvalOptions(suite=args.suite, tokenizer=args.tokenizer, limit=limit, seed=args.seed, size=args.size,
                       local_dir=args.local_dir, splits=args.splits, data=args.data, corpus=args.corpus,
                       cache_dir=args.cache_dir, device=args.device, dtype=args.dtype, batch_size=batch,
                       threads=args.threads)


def _positive_int(flag: str, value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 1:
        raise UserError(f"{flag} must be a positive integer or auto, got {value!r}")
    return n
