"""``recipes/run_<size>.sh --rehearse``: a paper recipe's whole path, shrunk so that it runs on CPU in a minute or two.

A researcher runs ``recipes/run_8x1.5B.sh du0.5`` on a GPU cluster for weeks. A recipe that does not
merge, shards built with the wrong tokenizer, a seed folder without its tokenizer files, a resume that
restarts or a checkpoint lm-eval cannot load would otherwise show only there. The rehearsal runs the same
path end to end, with the same code and commands, on a model and a batch shrunk to CPU size:

1. **documents**: a few hundred per domain from the built-in corpus, found the product's way (``--corpus``,
   ``$DROP_UPCYCLING_CORPUS``, the user cache, the pinned download), or from your own files (``--input
   DOMAIN=PATH`` / ``$REHEARSE_INPUT``, read by the reader that ``data tokenize --input`` uses), written as
   JSONL train and test splits (:func:`~.data_pipeline.write_splits`);
2. **tokenizer**: ``drop-upcycling data tokenizer`` on the train split (byte-level BPE);
3. **dense seed**: a randomly initialized dense Llama of the shrunk shape, saved as an HF folder with the
   tokenizer's files, as a downloaded seed is (``RUNS/dense/<name>`` of the launcher);
4. **shards**: ``drop-upcycling data tokenize --input DOMAIN=FILE ... --tokenizer SEED`` (the real-data route);
5. **recipe**: the size's base YAML shrunk (:func:`shrink_run`) and merged with each method's overlay by
   ``python -m drop_upcycling.recipes`` with ``--data SHARDS`` (the launcher's ``DATA=``), checked against
   the seed (``--check-shards``), exactly the calls ``recipes/common.sh`` makes;
6. **upcycle** with the recipe's options (its ``RECIPE_UPCYCLE``), as the launcher does;
7. **train**: the launcher's torchrun command, 2 processes (EP=2, gloo on CPU), ``STEPS`` steps with
   checkpoints, then the same command again for ``MORE_STEPS`` more: the logged steps must run on without
   a gap or a repeat, and ``run.json`` must record the resume;
8. **evaluate**: ``drop-upcycling evaluate`` on every final checkpoint with the offline local suite (``ci``).

Only sizes change (:func:`shrink_model`, :func:`shrink_run`): width, depth, heads, FFN, vocabulary, sequence
length, batch and steps. The layer kinds (MHA or GQA), the number of experts and top-k, the optimizer and
schedule settings, the authors' training semantics (``param_dtype``, ``aux_loss_scope``, ...) and every
other key are the recipe's own. The trainer refuses to resume with another step count (it changes the
schedule), so the second leg adds ``--steps`` and ``--allow-config-change`` to the launcher's command; the
change is recorded in ``run.json``.

BTX needs the seed's domain branches: ``$BTX_SOURCES`` when set (as the launcher), else the rehearsal makes
them by continuing the seed for a few steps on the ja, en and code domains with the size's dense recipe
(``recipes/configs/dense_<size>.yaml``, shrunk alike); without such domains it skips BTX and says why.

Everything is written under ``RUNS/rehearsal/<size>/`` (scratch: a rehearsal replaces it, and nothing else),
each step's output in ``logs/``, and a summary in ``rehearsal.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

from .configs import ModelConfig, load_yaml, model_config_from_mapping
from .errors import UserError, run_command
from .fsio import sha256_file, write_json
from .layout import CHECKPOINTS, LATEST, METRICS, RUN_JSON, checkpoint_dir

T = TypeVar("T")

REPO_CONFIGS = Path(__file__).resolve().parents[2] / "recipes" / "configs"  # the launchers' base YAMLs
DEFAULT_METHODS = ("nu", "du0.5")  # the baseline upcycling (NU) and the paper's method (DU-0.5)
MARKER = "rehearsal.json"  # what makes a folder a rehearsal's (and so safe to replace)

# The shrunk shape (see shrink_model): a fraction of a second per step on CPU, every kind of layer still there.
HIDDEN = 64
LAYERS = 2
MAX_HEADS = 4  # head_dim 16
VOCAB_DIVISOR = 96  # 99,584 ids -> 1,024; 48,640 -> 512 (the sizes keep their order)
VOCAB_RANGE = (512, 1024)  # the BPE trainer needs >= 512 (256 bytes + merges)
# The shrunk run (see shrink_run).
NPROC = 2  # torchrun processes, and the expert-parallel size: EP=2, one data rank
SEQ_LEN = 64
ACCUM = 2  # micro-batches per step, so that gradient accumulation runs too
STEPS = 4  # the first leg, checkpointed every SAVE_EVERY steps
MORE_STEPS = 4  # the resumed leg
SAVE_EVERY = 2
WARMUP = 2  # warmup steps, so that the run reaches the cosine part too
BRANCH_STEPS = 2  # BTX's domain branches: the seed continued this many steps per domain group
# The data and the evaluation.
DOCS = 300  # documents per domain
MIN_DOCS = 100  # fewer, and a domain's 10% held out may be too few for the cloze task's 4 choices
TEST_FRACTION = 0.1  # held out for the evaluation (ci: 4 perplexity documents, 8 cloze items per domain)
EVAL_LIMIT = 4  # lm-eval --limit: documents per task
# BTX's branches: domain groups and the domain names that belong to each (corpus names and short ones).
BRANCH_DOMAINS = {"ja": ("ja", "ja_mc4"), "en": ("en", "c4", "en_wikipedia"), "code": ("code", "code_stack")}
ENV_INPUT = "REHEARSE_INPUT"  # "ja=a.jsonl en=b.jsonl": your own documents instead of the built-in corpus


# ============================================================================ the shrunk recipe
def _largest_divisor(n: int, at_most: int) -> int:
    return max(d for d in range(1, at_most + 1) if n % d == 0)


def shrink_model(cfg: ModelConfig) -> dict[str, int]:
    """The ModelConfig fields that make ``cfg`` CPU-sized; everything else (experts, top-k, rope, norms,
    the balance loss) stays.

    Width ``HIDDEN`` and ``LAYERS`` layers; at most ``MAX_HEADS`` heads with the same number of query heads
    per key-value head where it fits (the 1.5B's GQA stays GQA, the others' MHA stays MHA); the FFN keeps
    its ratio to the width (a multiple of 8); the vocabulary is divided by ``VOCAB_DIVISOR``.
    """
    heads = _largest_divisor(HIDDEN, min(cfg.num_attention_heads, MAX_HEADS))
    group = max(1, cfg.num_attention_heads // cfg.num_key_value_heads)
    kv = _largest_divisor(heads, max(1, heads // group))
    ffn = max(8, 8 * round(cfg.intermediate_size * HIDDEN / cfg.hidden_size / 8))
    vocab = min(max(64 * round(cfg.vocab_size / VOCAB_DIVISOR / 64), VOCAB_RANGE[0]), VOCAB_RANGE[1])
    return {"vocab_size": vocab, "hidden_size": HIDDEN, "intermediate_size": ffn, "num_hidden_layers": LAYERS,
            "num_attention_heads": heads, "num_key_value_heads": kv}


def shrink_model_spec(spec: Any, source: str | Path) -> dict[str, Any]:
    """A YAML's ``model:`` (a registered name or a mapping) shrunk: ``{base: NAME, <shrunk fields>}``."""
    if spec is None:
        raise UserError(f"{source}: the rehearsal needs the recipe's model (model: NAME or a mapping)")
    small = shrink_model(model_config_from_mapping(spec, source=source))
    return {"base": spec, **small} if isinstance(spec, str) else {**spec, **small}


def shrink_run(run: dict[str, Any], source: str | Path, nproc: int = NPROC) -> dict[str, Any]:
    """A training YAML's mapping with its sizes shrunk (:func:`shrink_model`) and its run made short.

    ``SEQ_LEN`` tokens per sequence; the recipe's micro-batch size, ``ACCUM`` micro-batches per step on
    each of the data ranks (``nproc`` processes, expert parallel over all of them for a MoE); ``STEPS``
    steps (no token budget), a checkpoint every ``SAVE_EVERY``, warmup cut to ``WARMUP``; one node.
    """
    model = shrink_model_spec(run.get("model"), source)
    ep = nproc if model_config_from_mapping(model).is_moe else 1
    data_ranks = nproc // ep
    micro = int(run.get("micro_batch_size", 1))
    return {**run, "model": model, "seq_len": SEQ_LEN, "global_batch_tokens": SEQ_LEN * micro * ACCUM * data_ranks,
            "train_tokens": None, "steps": STEPS, "warmup_steps": min(int(run.get("warmup_steps", 0)), WARMUP),
            "save_every": SAVE_EVERY, "ep": ep, "nodes": 1, "gpus_per_node": nproc}


SHRUNK_KEYS = ("model", "seq_len", "global_batch_tokens", "train_tokens", "steps", "warmup_steps", "save_every",
               "ep", "nodes", "gpus_per_node")


def write_yaml(path: Path, data: dict[str, Any], header: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"# {header}\n" + yaml.safe_dump(data, sort_keys=False, allow_unicode=True))
    return path


# ============================================================================ running the steps
class StepFailed(Exception):
    """A step of the rehearsal failed: its name and what went wrong (the end of its log, for a command)."""

    def __init__(self, step: str, why: str) -> None:
        super().__init__(f"{step}: {why}")
        self.step, self.why = step, why


def _display(cmd: Sequence[str | Path]) -> str:
    """A command as one shell line, ``python`` for this interpreter (the launchers' ``$PY``)."""
    return shlex.join(["python" if str(c) == sys.executable else str(c) for c in cmd])


_ONE_LINE_ERROR = re.compile(r"drop-upcycling [\w-]+: error: .*")  # what every command says when it refuses


def _why(log: Path, code: int, lines: int = 25) -> str:
    """Why a command failed: its one-line error (under torchrun, among the ranks' tracebacks), else the
    end of its log."""
    text = log.read_text(errors="replace").splitlines() if log.is_file() else []
    errors = [m.group(0) for line in text[1:] if (m := _ONE_LINE_ERROR.search(line))]  # [0]: the command
    if errors:
        return f"{errors[0]} (exit code {code}; log: {log})"
    return f"exit code {code}; the end of {log}:\n" + "\n".join(f"    | {line}" for line in text[-lines:])


def free_port() -> int:
    """A free local TCP port for torchrun's rendezvous (two rehearsals at once must not collide)."""
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Steps:
    """Runs the rehearsal's steps in order: each prints what it runs, and its output goes to ``logs/``."""

    root: Path
    env: dict[str, str]  # added to every command's environment
    done: list[dict[str, Any]] = field(default_factory=list)

    def _start(self, name: str, shown: str) -> tuple[int, float]:
        n = len(self.done) + 1
        print(f"[{n}] {name}\n    {shown}", flush=True)
        return n, time.perf_counter()

    def _end(self, name: str, shown: str, t0: float, log: Path | None = None) -> None:
        seconds = round(time.perf_counter() - t0, 1)
        self.done.append({"step": name, "seconds": seconds, "command": shown,
                          **({"log": str(log)} if log is not None else {})})
        print(f"    ok ({seconds:.1f} s)", flush=True)

    def run(self, name: str, cmd: Sequence[str | Path], env: dict[str, str] | None = None) -> None:
        """Run a command; a non-zero exit fails the step with the end of its log."""
        extra = {**(env or {})}
        shown = " ".join(f"{k}={shlex.quote(v)}" for k, v in extra.items()) + " " * bool(extra) + _display(cmd)
        n, t0 = self._start(name, "$ " + shown)
        log = self.root / "logs" / f"{n:02d}-{re.sub(r'[^A-Za-z0-9.]+', '-', name).strip('-')}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "w") as f:
            f.write(f"$ {shown}\n")
            f.flush()
            code = _call([str(c) for c in cmd], {**os.environ, **self.env, **extra}, f)
        if code:
            raise StepFailed(name, _why(log, code))
        self._end(name, "$ " + shown, t0, log)

    def call(self, name: str, what: str, fn: Callable[[], T]) -> T:
        """Run a step in this process (``what`` says what it does); a UserError fails the step."""
        _, t0 = self._start(name, what)
        try:
            result = fn()
        except UserError as e:
            raise StepFailed(name, str(e)) from None
        self._end(name, what, t0)
        return result


def _call(cmd: list[str], env: dict[str, str], log: io.TextIOBase) -> int:
    """Run ``cmd`` in its own process group with its output in ``log``; Ctrl-C or SIGTERM stops the whole
    group (torchrun and its ranks), not only the process we started."""
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        return proc.wait()
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        raise


# ============================================================================ the rehearsal's inputs
@dataclass(frozen=True)
class Options:
    """What one rehearsal runs: the size, its base YAML, the methods and where the documents come from."""

    size: str  # "8x152M": as the launcher names it
    base: Path  # recipes/configs/<size>.yaml
    dense_name: str  # the seed's folder name under dense/ (the launcher's DENSE_NAME)
    methods: tuple[str, ...]
    runs: Path
    corpus: Path | None = None  # the built-in corpus's folder, found and verified (None with inputs)
    inputs: dict[str, str] = field(default_factory=dict)  # DOMAIN -> PATH: your own documents
    docs: int = DOCS

    @property
    def root(self) -> Path:
        return self.runs / "rehearsal" / self.base.stem


def parse_inputs(specs: Sequence[str]) -> dict[str, str]:
    """``DOMAIN=PATH`` items (``--input``, ``$REHEARSE_INPUT``) by domain, each checked now, as
    ``data tokenize --input`` checks them (the same parser)."""
    from .data import input_specs

    return input_specs(list(specs))


def read_documents(opts: Options) -> dict[str, list[str]]:
    """The first ``opts.docs`` documents of each domain: of your inputs, else of the built-in corpus."""
    from . import data_pipeline as dp

    if opts.inputs or opts.corpus is None:
        texts = {d: dp.read_texts(p) for d, p in opts.inputs.items()}
    else:
        files = dp.verify_corpus(opts.corpus, pinned=False)  # verified (pinned or not) when it was found
        texts = {d: dp.read_documents(files[d], dp.DOC_UNITS[d]) for d in dp.DOMAINS}
    docs = {}
    for domain, it in texts.items():
        with contextlib.closing(it):  # type: ignore[type-var]
            docs[domain] = [text for _, text in zip(range(opts.docs), it, strict=False)]
        if len(docs[domain]) < MIN_DOCS:
            raise UserError(f"domain {domain} has {len(docs[domain])} documents; the rehearsal needs at least "
                            f"{MIN_DOCS} (it holds {TEST_FRACTION:.0%} out for the evaluation)")
    return docs


def write_documents(opts: Options, out: Path) -> dict[str, Any]:
    """The documents as JSONL splits ``out/{train,test}/<domain>.jsonl`` (the product's split by document
    hash), what the tokenizer, the shards and the evaluation read."""
    from .data_pipeline import write_splits

    write_splits(read_documents(opts), out, val_fraction=0.0, test_fraction=TEST_FRACTION)
    return json.loads((out / "splits.json").read_text())["documents"]


def make_seed(shape: ModelConfig, tokenizer: Path, out: Path) -> Path:
    """A randomly initialized dense Llama of ``shape``, saved as an HF folder with the tokenizer's files:
    what the launcher expects at ``RUNS/dense/<name>`` (a seed downloaded from the Hub looks the same)."""
    from tokenizers import Tokenizer

    from .checkpoint import save_model
    from .data_pipeline import tokenizer_eos
    from .model import CausalLM

    eos = Tokenizer.from_file(str(tokenizer / "tokenizer.json")).token_to_id(tokenizer_eos(tokenizer / "tokenizer.json"))
    model = CausalLM(shape.replace(bos_token_id=eos, eos_token_id=eos))
    model.init_weights(0)
    return save_model(model, out, tokenizer_from=tokenizer)


def mix_weights(base: dict[str, Any], domains: Sequence[str]) -> dict[str, float] | None:
    """The domain mix of the shards: ``$DATA_WEIGHTS`` (the launcher's), else the recipe's own weights when
    the shards have its domains (the built-in corpus's), else None (the domains' sizes)."""
    from .recipes import parse_weights

    if os.environ.get("DATA_WEIGHTS"):
        return parse_weights(os.environ["DATA_WEIGHTS"])
    weights = (base.get("data") or {}).get("weights") or {}
    return {d: float(w) for d, w in weights.items()} if weights and set(weights) <= set(domains) else None


# ============================================================================ the recipe, as common.sh runs it
def recipes_cli(argv: list[str]) -> str:
    """``python -m drop_upcycling.recipes ARGV`` (the launcher's call), in this process: its stdout, or a
    UserError with its one-line error."""
    from . import recipes

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = recipes.main(argv)
    if code:
        raise UserError(err.getvalue().strip().removeprefix("recipes: error: ") or f"exit code {code}")
    return out.getvalue()


def shell_variables(text: str) -> dict[str, Any]:
    """The ``RECIPE_*`` assignments that ``recipes --write-dir`` prints (``RECIPE_UPCYCLE`` as a list)."""
    values: dict[str, Any] = {}
    for line in filter(None, text.splitlines()):
        key, _, value = line.partition("=")
        if value.startswith("(") and value.endswith(")"):
            values[key] = shlex.split(value[1:-1])
        else:
            values[key] = shlex.split(value)[0] if value else ""
    return values


def keep_shrunk(config: Path, shrunk: dict[str, Any]) -> list[str]:
    """Put back the shrunk values an overlay file overrode (its seq_len, say), so that the rehearsal stays
    CPU-sized; returns the keys put back."""
    merged = load_yaml(config)
    changed = [k for k in SHRUNK_KEYS if merged.get(k) != shrunk.get(k)]
    if changed:
        write_yaml(config, {**merged, **{k: shrunk.get(k) for k in changed}},
                   f"{config.stem}: the recipe merged by drop_upcycling.recipes, with the rehearsal's sizes put back")
    return changed


# ============================================================================ checks of a finished run
def logged_steps(run_dir: Path) -> list[int]:
    path = run_dir / METRICS
    return [json.loads(line)["step"] for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def check_run(run_dir: Path, total: int, resumed_at: int | None, tokenizer_sha: str) -> Path:
    """The run logged steps 1..``total`` once each, resumed at ``resumed_at`` (run.json), and its final
    checkpoint is the one ``latest`` names and carries the seed's tokenizer. Returns that checkpoint."""
    steps = logged_steps(run_dir)
    if steps != list(range(1, total + 1)):
        raise UserError(f"{run_dir / METRICS} logs steps {_ranges(steps)}, not 1-{total} once each "
                        "(a resume that restarted or repeated steps)")
    if resumed_at is not None:
        resumes = json.loads((run_dir / RUN_JSON).read_text()).get("resumes") or []
        if not resumes or resumes[-1].get("step") != resumed_at:
            raise UserError(f"{run_dir / RUN_JSON} records no resume at step {resumed_at} (resumes: {resumes})")
    final = checkpoint_dir(run_dir, total)
    pointer = run_dir / CHECKPOINTS / LATEST
    if not pointer.is_file() or pointer.read_text().strip() != final.name or not (final / "config.json").is_file():
        raise UserError(f"{pointer} does not name a complete {final.name}")
    if not (final / "tokenizer.json").is_file() or sha256_file(final / "tokenizer.json") != tokenizer_sha:
        raise UserError(f"{final} does not carry the seed's tokenizer.json")
    return final


def _ranges(steps: list[int]) -> str:
    """``[1, 2, 3, 1, 2]`` -> ``"1-3, 1-2"``: a log's steps, short."""
    parts: list[list[int]] = []
    for s in steps:
        if parts and s == parts[-1][1] + 1:
            parts[-1][1] = s
        else:
            parts.append([s, s])
    return ", ".join(f"{a}-{b}" if a != b else str(a) for a, b in parts) or "none"


def check_eval(csv_path: Path, labels: Sequence[str]) -> int:
    """Every evaluated checkpoint has rows in lm-eval's results CSV; returns the number of rows."""
    import csv

    if not csv_path.is_file():
        raise UserError(f"{csv_path} was not written")
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    missing = [label for label in labels if not any(r["checkpoint"] == label for r in rows)]
    if not rows or missing:
        raise UserError(f"{csv_path} has no rows for {', '.join(missing) or 'any checkpoint'}")
    return len(rows)


# ============================================================================ the rehearsal
class Rehearsal:
    """One size's rehearsal: :meth:`run` does the steps of the module docstring in order."""

    def __init__(self, opts: Options) -> None:
        self.opts = opts
        self.root = opts.root
        self.py = sys.executable
        self.cli = [self.py, "-m", "drop_upcycling.cli"]
        # Every command: CPU only, and every cache this package writes inside the rehearsal's folder.
        self.steps = Steps(self.root, {"CUDA_VISIBLE_DEVICES": "", "DROP_UPCYCLING_CACHE": str(self.root / "cache"),
                                       "TOKENIZERS_PARALLELISM": "false"})
        self.base = load_yaml(opts.base)
        self.shrunk = shrink_run(self.base, opts.base)
        self.shape = model_config_from_mapping(self.shrunk["model"]).replace(num_experts=0, name=opts.dense_name)
        self.seed = self.root / "dense" / opts.dense_name
        self.shards = self.root / "shards"
        self.results: dict[str, Any] = {"size": opts.size, "base": str(opts.base), "methods": list(opts.methods),
                                        "runs": {}, "skipped": {}}
        self._branches: list[Path] | None = None

    # -- the folder
    def fresh_root(self) -> None:
        """Replace the rehearsal folder (scratch); refuse a folder that is not a rehearsal's."""
        root = self.root
        if root.exists():
            if not (root / MARKER).is_file() and (not root.is_dir() or any(root.iterdir())):
                raise UserError(f"{root} exists and is not a rehearsal's folder (no {MARKER}): not replacing it")
            shutil.rmtree(root)
        root.mkdir(parents=True)
        self.record(passed=None)

    def record(self, passed: bool | None) -> None:
        write_json(self.root / MARKER, {**self.results, "passed": passed, "steps": self.steps.done})

    # -- the steps
    def run(self) -> None:
        opts, steps = self.opts, self.steps
        print(f"rehearsal of {opts.size} ({', '.join(opts.methods)}) in {self.root}; model "
              + ", ".join(f"{k} {v}" for k, v in self.shrunk["model"].items() if k != "base")
              + f"; every command runs with {' '.join(f'{k}={v!r}' for k, v in steps.env.items())}", flush=True)
        jsonl = self.root / "jsonl"
        source = (" ".join(f"{d}={p}" for d, p in opts.inputs.items()) if opts.inputs
                  else f"the built-in corpus at {opts.corpus}")
        counts = steps.call("documents", f"the first {opts.docs} documents per domain of {source} -> {jsonl}/"
                            "{train,test}/<domain>.jsonl", lambda: write_documents(opts, jsonl))
        domains = list(counts["train"])
        self.results["documents"] = counts
        tokenizer = self.root / "tokenizer"
        steps.run("tokenizer", [*self.cli, "data", "tokenizer", "--train", jsonl / "train", "--out", tokenizer,
                                "--vocab-size", str(self.shape.vocab_size)])
        steps.call("dense seed", f"a random dense Llama ({self._describe(self.shape)}) with {tokenizer}'s files -> "
                   f"{self.seed}", lambda: make_seed(self.shape, tokenizer, self.seed))
        inputs = [a for d in domains for a in ("--input", f"{d}={jsonl / 'train' / f'{d}.jsonl'}")]
        steps.run("shards", [*self.cli, "data", "tokenize", *inputs, "--tokenizer", self.seed, "--out", self.shards])
        self.results["tokenizer_sha256"] = sha256_file(self.seed / "tokenizer.json")
        base = write_yaml(self.root / "configs" / "base" / opts.base.name, self.shrunk,
                          f"{opts.base}, shrunk by drop_upcycling.rehearse (model, sequence, batch, steps)")
        weights = mix_weights(self.base, domains)
        data = ["--data", str(self.shards)]
        if weights:
            data += ["--data-weights", ",".join(f"{d}={w:g}" for d, w in weights.items())]
        recipes = ["python", "-m", "drop_upcycling.recipes", str(base)]
        steps.call("recipes", "$ " + shlex.join([*recipes, *opts.methods, *data]),
                   lambda: recipes_cli([str(base), *opts.methods, *data]))
        check = [*opts.methods, *data, "--check-shards", "--dense", str(self.seed)]
        steps.call("check shards", "$ " + shlex.join([*recipes, *check]), lambda: recipes_cli([str(base), *check]))
        finals = {}
        for method in opts.methods:
            final = self.method(method, base, data)
            if final is not None:
                finals[method] = final
        if not finals:
            raise StepFailed("methods", "every method was skipped: nothing to evaluate")
        self.evaluate(finals, jsonl)

    def method(self, method: str, base: Path, data: list[str]) -> Path | None:
        """One method as the launcher runs it: its recipe, its upcycling, torchrun; then the resumed leg and
        the checks. Returns its final checkpoint (None: skipped, with the reason printed)."""
        steps = self.steps
        argv = [str(base), method, "--runs", str(self.root), "--write-dir", str(self.root / "configs"), *data]
        variables = shell_variables(steps.call(f"recipe {method}", "$ python -m drop_upcycling.recipes "
                                               + shlex.join(argv), lambda: recipes_cli(argv)))
        name, init, upcycle = variables["RECIPE_NAME"], variables["RECIPE_INIT"], variables["RECIPE_UPCYCLE"]
        config = Path(variables["RECIPE_CONFIG"])
        put_back = keep_shrunk(config, self.shrunk)
        if put_back:
            print(f"    note: {method} sets {', '.join(put_back)}; the rehearsal keeps its own sizes there")
        if upcycle:
            if variables["RECIPE_BRANCHES"] == "1":
                sources = self.btx_sources()
                if sources is None:
                    return None
                steps.run(f"upcycle {method}", [*self.cli, "upcycle", init, *upcycle, "--sources", *sources])
            else:
                steps.run(f"upcycle {method}", [*self.cli, "upcycle", self.seed, init, *upcycle])
        out = self.root / name
        total = STEPS + MORE_STEPS
        launch = [self.py, "-m", "torch.distributed.run", "--nnodes", "1", "--node_rank", "0", "--nproc_per_node",
                  str(NPROC), "--master_addr", "127.0.0.1"]
        train = ["-m", "drop_upcycling.train", str(config), "--resume"]
        threads = {"OMP_NUM_THREADS": "1"}
        steps.run(f"train {method}", [*launch, "--master_port", str(free_port()), *train], threads)
        steps.call(f"check {method} after {STEPS} steps", f"{out / METRICS} logs steps 1-{STEPS}",
                   lambda: check_run(out, STEPS, None, self.results["tokenizer_sha256"]))
        steps.run(f"resume {method}", [*launch, "--master_port", str(free_port()), *train, "--steps", str(total),
                                       "--allow-config-change"], threads)
        final = steps.call(f"check {method} resumed", f"{out / METRICS} logs steps 1-{total} once each; "
                           f"{out / RUN_JSON} records the resume at step {STEPS}; the final checkpoint carries the "
                           "seed's tokenizer", lambda: check_run(out, total, STEPS, self.results["tokenizer_sha256"]))
        self.results["runs"][method] = {"name": name, "config": str(config), "init": init or None, "out": str(out),
                                        "final": str(final), "steps": total, "resumed_at": STEPS}
        return final

    def btx_sources(self) -> list[str] | None:
        """BTX's four dense sources (seed, ja, en, code): ``$BTX_SOURCES``, else branches made here (once)."""
        if os.environ.get("BTX_SOURCES"):
            return os.environ["BTX_SOURCES"].split()
        if self._branches is None:
            self._branches = self.make_branches()
        return [str(self.seed), *map(str, self._branches)] if self._branches else None

    def make_branches(self) -> list[Path]:
        """The seed continued ``BRANCH_STEPS`` steps on each of the ja, en and code domain groups, with the
        size's dense recipe shrunk alike (one process each); [] when it cannot be done (printed why)."""
        from .data import TokenShards

        domains = TokenShards.load(self.shards).domains("train")
        groups = {g: [d for d in domains if d in names] for g, names in BRANCH_DOMAINS.items()}
        dense = self.opts.base.parent / f"dense_{self.opts.base.stem.partition('x')[2]}.yaml"
        why = ("the shards have no " + " or ".join(g for g, ds in groups.items() if not ds) + " domain "
               f"(they have {', '.join(domains)})") if not all(groups.values()) else (
            f"there is no dense recipe {dense}" if not dense.is_file() else None)
        if why:
            reason = f"BTX needs the seed's ja, en and code branches, and {why}: skipped (set BTX_SOURCES to use yours)"
            print(f"    note: {reason}", flush=True)
            self.results["skipped"]["btx"] = reason
            return []
        shrunk = shrink_run(load_yaml(dense), dense, nproc=1)
        finals = []
        for group, names in groups.items():
            out = self.root / "branches" / group
            config = write_yaml(self.root / "configs" / f"branch_{group}.yaml", {
                **shrunk, "method": f"dense-{group}", "init": str(self.seed), "steps": BRANCH_STEPS, "save_every": 0,
                "data": {"shards": str(self.shards), "weights": dict.fromkeys(names, 1.0)}, "out": str(out)},
                f"BTX's {group} branch: {dense} shrunk, the seed continued on {', '.join(names)}")
            self.steps.run(f"branch {group}", [*self.cli, "train", config])
            finals.append(checkpoint_dir(out, BRANCH_STEPS))
        return finals

    def evaluate(self, finals: dict[str, Path], jsonl: Path) -> None:
        """lm-eval's local suite (``ci``) on every final checkpoint, from the documents held out."""
        out = self.root / "eval"
        self.steps.run("evaluate", [*self.cli, "evaluate", *finals.values(), "--suite", "local", "--size", "ci",
                                    "--limit", str(EVAL_LIMIT), "--splits", jsonl, "--out", out, "--device", "cpu"])
        from .evaluate import checkpoint_labels

        labels = checkpoint_labels(list(finals.values()))
        rows = self.steps.call("check evaluation", f"{out / 'results.csv'} has rows for {', '.join(labels)}",
                               lambda: check_eval(out / "results.csv", labels))
        self.results["eval"] = {"csv": str(out / "results.csv"), "rows": rows}

    @staticmethod
    def _describe(cfg: ModelConfig) -> str:
        return (f"hidden {cfg.hidden_size}, {cfg.num_hidden_layers} layers, {cfg.num_attention_heads}/"
                f"{cfg.num_key_value_heads} heads, FFN {cfg.intermediate_size}, vocab {cfg.vocab_size}")


# ============================================================================ CLI
def resolve_base(size: str, base: Path | None) -> Path:
    """The size's base YAML: ``--base``, else ``recipes/configs/<size>.yaml`` of this checkout."""
    path = base or REPO_CONFIGS / f"{size.lower()}.yaml"
    if not path.is_file():
        raise UserError(f"no recipe for size {size}: {path} does not exist (pass --base YAML)")
    return path


def options_from_args(args: argparse.Namespace) -> Options:
    base = resolve_base(args.size, args.base)
    methods = tuple(args.methods) or DEFAULT_METHODS
    from .recipes import resolve

    for method in methods:  # every method resolves on the real recipe before anything is replaced
        resolve(base, method)
    specs = list(args.input) or os.environ.get(ENV_INPUT, "").split()
    if specs and args.corpus:
        raise UserError(f"give --corpus or your own inputs (--input / ${ENV_INPUT}), not both")
    dense_name = args.dense_name or f"dense-{base.stem.partition('x')[2] or base.stem}"
    if args.docs < MIN_DOCS:
        raise UserError(f"--docs must be >= {MIN_DOCS}, got {args.docs}")
    inputs = parse_inputs(specs)
    # Found now, before the folder is replaced: a missing corpus is the user's to fix (exit 2), not a step.
    from .data_pipeline import resolve_corpus

    corpus = None if inputs else resolve_corpus(args.corpus, pinned=not args.unpinned)
    return Options(size=args.size, base=base, dense_name=dense_name, methods=methods,
                   runs=Path(args.runs or os.environ.get("RUNS") or "runs"), corpus=corpus, inputs=inputs,
                   docs=args.docs)


def configure_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("size", metavar="SIZE", help="8x152M, 8x1.5B or 8x3.7B (its recipe: recipes/configs/<size>.yaml)")
    p.add_argument("methods", nargs="*", metavar="METHOD",
                   help=f"method slugs or overlay .yaml files, as the launcher takes them (default: "
                        f"{' '.join(DEFAULT_METHODS)})")
    p.add_argument("--runs", default=None, help="output root (default $RUNS, else runs): writes RUNS/rehearsal/<size>/")
    p.add_argument("--corpus", default=None, metavar="DIR",
                   help="the built-in corpus's folder (default: $DROP_UPCYCLING_CORPUS, the user cache, else the "
                        "pinned download)")
    p.add_argument("--unpinned", action="store_true",
                   help="--corpus is a folder of your own in the corpus's layout (no sha256 check)")
    p.add_argument("--input", action="append", default=[], metavar="DOMAIN=PATH",
                   help=f"your own documents instead (repeat; default ${ENV_INPUT}, e.g. 'ja=a.jsonl en=b.jsonl'): a "
                        ".jsonl[.gz]/.parquet file, folder or quoted glob, read as data tokenize --input reads it")
    p.add_argument("--docs", type=int, default=DOCS, help=f"documents per domain (default {DOCS})")
    p.add_argument("--base", type=Path, default=None, help="the size's base YAML (default recipes/configs/<size>.yaml)")
    p.add_argument("--dense-name", default=None, help="the seed's folder name (the launcher's DENSE_NAME)")


def _not_read() -> list[str]:
    return [k for k in ("DENSE_CKPT", "DATA") if os.environ.get(k)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m drop_upcycling.rehearse", description=__doc__.splitlines()[0])
    configure_parser(parser)
    args = parser.parse_intermixed_args(argv)  # METHODs may follow options (the launcher puts its own first)
    return run_command("rehearse", lambda: _rehearse(args))


def _rehearse(args: argparse.Namespace) -> int:
    """The rehearsal of ``args.size``: 0 when every step passed, 1 naming the step that failed."""
    t0 = time.perf_counter()
    opts = options_from_args(args)
    if _not_read():
        print(f"note: the rehearsal makes its own seed and shards; {' and '.join(_not_read())} are not read")
    rehearsal = Rehearsal(opts)
    rehearsal.fresh_root()
    try:
        rehearsal.run()
    except StepFailed as e:
        rehearsal.record(passed=False)
        print(f"rehearsal of {args.size} FAILED at step '{e.step}': {e.why}", file=sys.stderr)
        return 1
    rehearsal.record(passed=True)
    results = rehearsal.results
    trained = ", ".join(results["runs"])
    skipped = "".join(f"; {m} skipped" for m in results["skipped"])
    print(f"rehearsal of {opts.size} passed in {time.perf_counter() - t0:.0f} s: tokenizer, seed, shards, recipes; "
          f"{trained} trained {STEPS} steps with EP={NPROC} and resumed to {STEPS + MORE_STEPS}; evaluated "
          f"({results['eval']['rows']} rows){skipped}. Outputs in {opts.root}/ (summary: {MARKER})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
