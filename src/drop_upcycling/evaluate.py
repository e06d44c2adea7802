"""``drop-upcycling evaluate``: score HF checkpoints with lm-evaluation-harness (the stock ``hf`` backend).

Tasks are data (lm-eval task YAMLs), never code paths of our own:

* ``local``: a fully offline suite generated from the corpus test split as YAML + JSONL in an
  include dir (:func:`build_local_suite`). Per domain, a perplexity task (``loglikelihood_rolling``:
  word/byte perplexity, bits per byte) and a multiple-choice cloze (the start of a test document;
  choices = its true continuation and the continuations of 3 other test documents of the same domain;
  acc, acc_norm). Built with a fixed seed, so every checkpoint sees the same items.
* ``paper``: the group ``du_paper`` (``tasks/paper/``): lm-eval 0.4.13's versions of the paper's
  tasks at the paper's shot counts plus our YAMLs for JEMHopQA, NIILC and WMT20 en-ja / ja-en. It
  needs the Hub; offline it stops before loading any model, naming every dataset not in the cache.
* any comma-separated list of lm-eval task or group names (the built-in ones, ours, and the local
  suite's ``du_*`` names).

Writes lm-eval's results JSON per checkpoint (``OUT/<label>.json``) and one tidy CSV for all
(``OUT/results.csv``: checkpoint, task, metric, value, stderr, n), into a temp dir renamed at the end.
"""

from __future__ import annotations

import argparse
import csv
import difflib
import functools
import hashlib
import io
import json
import logging
import os
import random
import re
import socket
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import yaml

from .checkpoint import TOKENIZER_FILES, CheckpointReader, atomic_dir, write_json
from .errors import UserError
from .fsio import write_text

log = logging.getLogger(__name__)

TASKS_DIR = Path(__file__).resolve().parent / "tasks"
PAPER_DIR = TASKS_DIR / "paper"
PAPER_GROUP = "du_paper"
LOCAL_GROUP = "du_local"
LOCAL_PREFIX = "du_"
CSV_COLUMNS = ("checkpoint", "task", "metric", "value", "stderr", "n")
NUM_CHOICES = 4
# Python packages the paper suite's metric code imports (lm-eval's ja_leaderboard_xlsum: MeCab ROUGE-2).
PAPER_REQUIREMENTS = {"ja_leaderboard_xlsum": ("fugashi", "unidic_lite", "emoji", "neologdn", "rouge_score")}
# Metrics that lm-eval tasks fetch from the Hub with ``evaluate.load`` when they aggregate (after all generation).
HUB_METRICS = {"squadv2": "squad_v2"}


# ---------------------------------------------------------------------------- the local suite
@dataclass(frozen=True)
class LocalSize:
    """How much of the test split the local suite uses, per domain."""

    ppl_docs: int  # documents scored by rolling log-likelihood
    ppl_max_chars: int  # each cut to at most this many characters (at whitespace when there is any)
    cloze_items: int  # multiple-choice items
    context_chars: int  # length of the context of an item
    continuation_chars: int  # length of each choice


LOCAL_SIZES: dict[str, LocalSize] = {
    # Seconds for a tiny model on 2 CPU cores: the tests and CI.
    "ci": LocalSize(ppl_docs=4, ppl_max_chars=300, cloze_items=8, context_chars=128, continuation_chars=40),
    # Minutes for a 152M model on a GPU: enough items for differences of a few points to show.
    # (Contexts of 256 characters: most C4 test documents are shorter than 512.)
    "default": LocalSize(ppl_docs=200, ppl_max_chars=4000, cloze_items=250, context_chars=256, continuation_chars=64),
}


def _cut(text: str, n: int) -> int:
    """A cut point <= n: the last whitespace in the second half of the first n characters, else n.

    Cutting at whitespace keeps words whole in English and code (so a choice starts with its space);
    Japanese has no spaces and is cut at n characters.
    """
    if len(text) <= n:
        return len(text)
    ws = max(text.rfind(c, n // 2, n) for c in (" ", "\n", "\t"))
    return ws if ws > 0 else n


def _read_test_docs(test_dir: Path) -> dict[str, list[dict]]:
    from .data_pipeline import jsonl_files, split_domains

    if not test_dir.is_dir():
        raise UserError(f"test split {test_dir} does not exist")
    docs: dict[str, list[dict]] = {}
    for domain in split_domains(test_dir):
        rows = []
        for path in jsonl_files(test_dir, domain):
            with open(path, encoding="utf-8") as f:
                rows += [json.loads(line) for line in f if line.strip()]
        if rows:
            docs[domain] = rows
    if not docs:
        raise UserError(f"test split {test_dir} holds no <domain>.jsonl documents")
    return docs


def perplexity_items(docs: Sequence[dict], size: LocalSize, rng: random.Random) -> list[dict]:
    """``size.ppl_docs`` documents drawn with ``rng``, each cut to ``size.ppl_max_chars``."""
    picked = rng.sample(list(docs), min(size.ppl_docs, len(docs)))
    return [{"id": d["id"], "text": d["text"][: _cut(d["text"], size.ppl_max_chars)]} for d in picked]


def cloze_items(docs: Sequence[dict], size: LocalSize, rng: random.Random, domain: str) -> list[dict]:
    """Multiple-choice items: context = a document's start, choices = its and 3 other documents' continuations.

    Every choice is cut the same way from the same offset of a document of the same domain, so
    length and form do not give the answer away; only the fit to the context does.
    """
    spans = []
    for d in docs:
        text = d["text"]
        c = _cut(text, size.context_chars)
        if c < size.context_chars // 2 or len(text) < c + size.continuation_chars:
            continue
        end = c + _cut(text[c:], size.continuation_chars)
        cont = text[c:end]
        if cont.strip():
            spans.append((d["id"], text[:c], cont))
    # Distractors come from distinct continuations: boilerplate (licence headers, templates) repeats
    # across documents, and two equal choices would make an item unanswerable.
    first_of = {}
    for j, span in enumerate(spans):
        first_of.setdefault(span[2], j)
    if len(first_of) < NUM_CHOICES:
        raise UserError(
            f"domain {domain}: only {len(first_of)} distinct test documents are long enough for the cloze task "
            f"(need {NUM_CHOICES} of >= {size.context_chars + size.continuation_chars} characters)"
        )
    distinct = sorted(first_of.values())
    order = rng.sample(range(len(spans)), min(size.cloze_items, len(spans)))
    items = []
    for i in order:
        others = rng.sample([j for j in distinct if spans[j][2] != spans[i][2]], NUM_CHOICES - 1)
        gold = rng.randrange(NUM_CHOICES)
        choices = [spans[j][2] for j in others]
        choices.insert(gold, spans[i][2])
        items.append({"id": spans[i][0], "context": spans[i][1], "choices": choices, "gold": gold})
    return items


def _json_task(task: str, data: Path, cache: Path) -> dict:
    """The part every local task shares: a JSONL test split read by the ``json`` dataset builder."""
    return {
        "task": task,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data)}, "cache_dir": str(cache)},
        "test_split": "test",
    }


def _perplexity_yaml(task: str, data: Path, cache: Path, meta: dict) -> dict:
    return {
        **_json_task(task, data, cache),
        "output_type": "loglikelihood_rolling",
        "doc_to_text": "",
        "doc_to_target": "text",
        "metric_list": [{"metric": m, "aggregation": agg, "higher_is_better": False} for m, agg in (
            ("word_perplexity", "weighted_perplexity"), ("byte_perplexity", "weighted_perplexity"),
            ("bits_per_byte", "bits_per_byte"))],
        "metadata": meta,
    }


def _cloze_yaml(task: str, data: Path, cache: Path, meta: dict) -> dict:
    return {
        **_json_task(task, data, cache),
        "output_type": "multiple_choice",
        "doc_to_text": "context",
        "doc_to_choice": "choices",
        "doc_to_target": "gold",
        # The choices carry their own leading whitespace: context + choice is the original text.
        "target_delimiter": "",
        "metric_list": [{"metric": m, "aggregation": "mean", "higher_is_better": True} for m in ("acc", "acc_norm")],
        "metadata": meta,
    }


def _write_jsonl(path: Path, rows: Iterable[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def _dump_yaml(path: Path, data: dict) -> None:
    path.write_text(yaml.safe_dump(data, sort_keys=False, allow_unicode=True))


def local_task_names(domains: Iterable[str]) -> list[str]:
    return [f"{LOCAL_PREFIX}{kind}_{d}" for kind in ("ppl", "cloze") for d in domains]


def build_local_suite(test_dir: str | Path, out_dir: str | Path, size: str = "default", seed: int = 0,
                      overwrite: bool = False) -> Path:
    """Generate the local suite (YAMLs + JSONL + group ``du_local``) from a test split into ``out_dir``.

    The task YAMLs hold absolute ``data_files`` paths, so the folder is used where it was written
    (it is cheap to regenerate). A finished folder with the same inputs and options is reused.
    """
    if size not in LOCAL_SIZES:
        raise UserError(f"unknown local suite size {size!r}; choose one of {', '.join(LOCAL_SIZES)}")
    test_dir, out_dir = Path(test_dir).resolve(), Path(out_dir).resolve()
    docs = _read_test_docs(test_dir)
    spec = {"test_dir": str(test_dir), "size": size, "seed": seed, **asdict(LOCAL_SIZES[size]),
            "documents": {d: len(v) for d, v in docs.items()}, "version": 1}
    manifest = out_dir / "suite.json"
    if not overwrite and manifest.is_file() and json.loads(manifest.read_text()) == spec:
        log.info("reusing local suite %s", out_dir)
        return out_dir
    cfg = LOCAL_SIZES[size]
    meta = {"version": 1.0, "size": size, "seed": seed}
    with atomic_dir(out_dir, overwrite=True) as tmp:
        # Paths inside the YAMLs must name the final location, not the temp dir.
        for domain, rows in docs.items():
            rng = random.Random(f"du-local-{seed}-{domain}")
            for kind, items, make in (("ppl", perplexity_items(rows, cfg, rng), _perplexity_yaml),
                                      ("cloze", cloze_items(rows, cfg, rng, domain), _cloze_yaml)):
                task = f"{LOCAL_PREFIX}{kind}_{domain}"
                _write_jsonl(tmp / f"{task}.jsonl", items)
                _dump_yaml(tmp / f"{task}.yaml", make(task, out_dir / f"{task}.jsonl", out_dir / ".hf_cache", meta))
        _dump_yaml(tmp / f"{LOCAL_GROUP}.yaml",
                   {"group": LOCAL_GROUP, "task": local_task_names(docs), "metadata": {"version": 1.0}})
        write_json(tmp / "suite.json", spec)
    log.info("local suite (%s, seed %d) written to %s", size, seed, out_dir)
    return out_dir


def resolve_test_dir(*, splits: str | Path | None = None, data: str | Path | None = None,
                   corpus: str | Path | None = None, cache_dir: str | Path | None = None,
                   vocab_size: int = 8192) -> Path:
    """Where the test documents come from, as in ``routing``: ``splits`` (a folder of ``<domain>.jsonl``
    or one holding ``test/``), else ``data`` (a prepared data dir), else the project's prepared data
    (:func:`drop_upcycling.data.prepare_all`, built once and cached; ``vocab_size`` as training uses it).
    """
    from . import data as data_mod

    if splits is not None:
        splits = Path(splits)
        return splits / "test" if (splits / "test").is_dir() else splits
    prepared = (data_mod.PreparedData.load(data) if data is not None
                else data_mod.prepare_all(corpus=corpus, cache_dir=cache_dir, vocab_size=vocab_size))
    return Path(prepared.splits_dir) / "test"


def cached_local_suite(test_dir: Path, size: str, seed: int = 0) -> Path:
    """The local suite for ``test_dir`` in the package cache (``$DROP_UPCYCLING_CACHE/lm_eval_local``)."""
    from .data_pipeline import cache_root

    key = hashlib.sha256(f"{Path(test_dir).resolve()}\x00{size}\x00{seed}".encode()).hexdigest()[:16]
    return build_local_suite(test_dir, cache_root() / "lm_eval_local" / f"{size}-seed{seed}-{key}", size, seed)


def run_checkpoints(runs: str | Path) -> list[Path]:
    """The latest checkpoint of every training run under ``runs`` (a run is a dir with ``checkpoints/latest``)."""
    from .train import CHECKPOINTS, LATEST, latest_checkpoint

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
    if local_dir is not None and all(_is_local(n) for n in names):
        return TaskPlan(names, [local_dir], include_defaults=False)
    paths = [PAPER_DIR] + ([local_dir] if local_dir is not None else [])
    return TaskPlan(names, paths, include_defaults=True)


def _is_local(name: str) -> bool:
    return name == LOCAL_GROUP or name.startswith((f"{LOCAL_PREFIX}ppl_", f"{LOCAL_PREFIX}cloze_"))


def wants_local(suite: str) -> bool:
    """Whether ``suite`` names the local suite or any of its tasks (so it has to be built)."""
    return any(n.strip() == "local" or _is_local(n.strip()) for n in suite.split(","))


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


def evaluate(checkpoints: Sequence[str | Path], suite: str, out: str | Path, *, tokenizer: str | Path | None = None,
             limit: int | float | None = None, size: str = "default", local_dir: str | Path | None = None,
             splits: str | Path | None = None, data: str | Path | None = None, corpus: str | Path | None = None,
             cache_dir: str | Path | None = None, seed: int = 0, device: str | None = None, dtype: str = "float32",
             batch_size: int | str = 16, threads: int | None = None, overwrite: bool = False) -> Path:
    """Evaluate every checkpoint on ``suite``; write ``OUT/<label>.json`` and ``OUT/results.csv``. Returns OUT.

    Every check that can fail (device, paths, tokenizers, task names, offline datasets, packages)
    runs before the first model is loaded.
    """
    from .parallel import resolve_device

    device = resolve_device(device)
    if not checkpoints:
        raise UserError("no checkpoint given")
    out = Path(out)
    if out.exists() and not overwrite:
        raise UserError(f"{out} already exists (pass --overwrite to replace it)")
    tok = Path(tokenizer) if tokenizer is not None else None
    if tok is not None and not _has_tokenizer(tok):
        raise UserError(f"--tokenizer {tok} holds no tokenizer (tokenizer.json + tokenizer_config.json)")
    paths = [check_checkpoint(c, tok) for c in checkpoints]
    labels = checkpoint_labels(paths)

    local = None
    if local_dir is not None:
        local = Path(local_dir)
        if not (local / f"{LOCAL_GROUP}.yaml").is_file():
            raise UserError(f"{local} is not a local suite folder (no {LOCAL_GROUP}.yaml)")
    elif wants_local(suite):
        vocab = CheckpointReader(paths[0]).config.vocab_size
        test_dir = resolve_test_dir(splits=splits, data=data, corpus=corpus, cache_dir=cache_dir, vocab_size=vocab)
        local = cached_local_suite(test_dir, size, seed)
    plan = plan_tasks(suite, local)
    tm = task_manager(plan)
    leaves = leaf_tasks(tm, plan.names)
    hub = task_datasets(tm, leaves)
    if (hub or any(t in HUB_METRICS for t in leaves)) and hub_offline():
        force_offline()
        check_datasets_cached(hub, leaves)
    check_requirements(leaves)

    if device == "cpu":
        log.info("using %d CPU threads", set_threads(threads))
    all_rows: list[dict] = []
    with atomic_dir(out, overwrite=overwrite) as tmp:
        for path, label in zip(paths, labels, strict=True):
            t0 = time.perf_counter()
            log.info("evaluating %s on %s", path, ", ".join(plan.names))
            results = evaluate_checkpoint(path, tm, plan.names, tokenizer=tok, device=device, dtype=dtype,
                                          batch_size=batch_size, limit=limit, seed=seed)
            results["drop_upcycling"] = {"checkpoint": str(path.resolve()), "label": label, "suite": suite,
                                         "local_suite": str(local) if local else None,
                                         "seconds": time.perf_counter() - t0}
            (tmp / f"{label}.json").write_text(_results_json(results))
            rows = results_rows(label, results)
            all_rows += rows
            log.info("%s: %d metrics in %.1f s", label, len(rows), time.perf_counter() - t0)
        write_csv(tmp / "results.csv", all_rows)
    print(format_table(all_rows))
    return out


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
    limit = args.limit
    if limit is not None:
        if limit <= 0:
            raise UserError(f"--limit must be > 0, got {limit}")
        limit = int(limit) if limit >= 1 else limit
    batch = args.batch_size if args.batch_size == "auto" else _positive_int("--batch-size", args.batch_size)
    ckpts = list(args.checkpoints) + (run_checkpoints(args.runs) if args.runs else [])
    if not ckpts:
        raise UserError("no checkpoint given: pass CKPT dirs or --runs DIR")
    out = evaluate(ckpts, args.suite, args.out, tokenizer=args.tokenizer, limit=limit, size=args.size,
                   local_dir=args.local_dir, splits=args.splits, data=args.data, corpus=args.corpus,
                   cache_dir=args.cache_dir, seed=args.seed, device=args.device, dtype=args.dtype,
                   batch_size=batch, threads=args.threads, overwrite=args.overwrite)
    print(f"results: {out / 'results.csv'}")
    return 0


def _positive_int(flag: str, value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 1:
        raise UserError(f"{flag} must be a positive integer or auto, got {value!r}")
    return n
