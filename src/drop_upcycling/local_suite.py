"""The local lm-eval suite: task YAMLs + JSONL items generated from the corpus test split, fully offline.

Tasks are data: this module only writes files that the stock harness reads through an include
path (``--suite local`` of :mod:`.evaluate`). Per domain, a perplexity task
(``loglikelihood_rolling``: word/byte perplexity, bits per byte) and a multiple-choice cloze (the
start of a test document; choices = its true continuation and the continuations of 3 other test
documents of the same domain; acc, acc_norm); the group ``du_local`` holds them all. Items are
drawn with a fixed seed per domain, so every checkpoint sees the same items.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml

from .errors import UserError
from .fsio import atomic_dir, cache_root, write_json

log = logging.getLogger(__name__)

LOCAL_GROUP = "du_local"
LOCAL_PREFIX = "du_"
NUM_CHOICES = 4


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
    # The default's items with short choices, for models with a short context and a small vocabulary
    # (the CPU study: 128 positions, 512 ids, where 64 Japanese characters can exceed 128 tokens and
    # lm-eval refuses a continuation longer than the model's context; contexts are cut from the left).
    "short": LocalSize(ppl_docs=200, ppl_max_chars=4000, cloze_items=250, context_chars=128, continuation_chars=24),
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
    """Every test document per domain (``<domain>.jsonl`` files of ``test_dir``), in file order."""
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
    """Rolling log-likelihood of whole documents; lower is better for all three metrics."""
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
    """Pick the true continuation among :data:`NUM_CHOICES`: ``acc``, and ``acc_norm`` (log-likelihoods
    divided by the choice's length in bytes, so longer choices are not penalized)."""
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
    """The suite's task names: ``du_ppl_<domain>`` for every domain, then ``du_cloze_<domain>``."""
    return [f"{LOCAL_PREFIX}{kind}_{d}" for kind in ("ppl", "cloze") for d in domains]


def build_local_suite(test_dir: str | Path, out_dir: str | Path, size: str = "default", seed: int = 0,
                      overwrite: bool = False) -> Path:
    """Generate the local suite (YAMLs + JSONL + group ``du_local``) from a test split into ``out_dir``.

    The task YAMLs hold absolute ``data_files`` paths, so the folder is used where it was written
    (it is cheap to regenerate). A finished folder with the same inputs and options is reused: its
    ``suite.json`` records them, document counts included, so a changed test split is rebuilt.
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
    with atomic_dir(out_dir, overwrite=True) as tmp:
        _write_suite(tmp, out_dir, docs, size, seed)
        write_json(tmp / "suite.json", spec)
    log.info("local suite (%s, seed %d) written to %s", size, seed, out_dir)
    return out_dir


def _write_suite(tmp: Path, out_dir: Path, docs: dict[str, list[dict]], size: str, seed: int) -> None:
    """Items (JSONL) and task YAMLs of every domain, and the group YAML, written into ``tmp``.

    The YAMLs name the data files at ``out_dir``, where ``tmp`` is renamed to, not in ``tmp``. Each
    domain draws from its own generator (seeded by seed and domain), so adding or removing a domain
    leaves the other domains' items unchanged.
    """
    cfg = LOCAL_SIZES[size]
    meta = {"version": 1.0, "size": size, "seed": seed}
    for domain, rows in docs.items():
        rng = random.Random(f"du-local-{seed}-{domain}")
        for kind, items, make in (("ppl", perplexity_items(rows, cfg, rng), _perplexity_yaml),
                                  ("cloze", cloze_items(rows, cfg, rng, domain), _cloze_yaml)):
            task = f"{LOCAL_PREFIX}{kind}_{domain}"
            _write_jsonl(tmp / f"{task}.jsonl", items)
            _dump_yaml(tmp / f"{task}.yaml", make(task, out_dir / f"{task}.jsonl", out_dir / ".hf_cache", meta))
    _dump_yaml(tmp / f"{LOCAL_GROUP}.yaml",
               {"group": LOCAL_GROUP, "task": local_task_names(docs), "metadata": {"version": 1.0}})


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
    key = hashlib.sha256(f"{Path(test_dir).resolve()}\x00{size}\x00{seed}".encode()).hexdigest()[:16]
    return build_local_suite(test_dir, cache_root() / "lm_eval_local" / f"{size}-seed{seed}-{key}", size, seed)


def is_local_task(name: str) -> bool:
    """Whether ``name`` is the local group or one of its tasks (they exist only in a built suite folder)."""
    return name == LOCAL_GROUP or name.startswith((f"{LOCAL_PREFIX}ppl_", f"{LOCAL_PREFIX}cloze_"))


def wants_local(suite: str) -> bool:
    """Whether ``suite`` names the local suite or any of its tasks (so it has to be built)."""
    return any(n.strip() == "local" or is_local_task(n.strip()) for n in suite.split(","))
