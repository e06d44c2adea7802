"""The data build steps: corpus -> JSONL splits -> byte-level BPE tokenizer -> datatrove ``.ds`` shards.

Each step reads only files and writes one directory atomically (temp dir + rename, see
:func:`~drop_upcycling.checkpoint.atomic_dir`), so an interrupted step never leaves something that a
later step would mistake for a finished result. :mod:`drop_upcycling.data` chains them
(:func:`~drop_upcycling.data.prepare_all`) and reads the result.

Any other corpus and tokenizer take the real-data route: :func:`tokenize_shards` reads JSONL splits or
the corpus files themselves (:class:`DirectInputs`: JSONL, Parquet or a Hugging Face dataset per
domain) with any tokenizer (a folder or a hub id), on datatrove's local or Slurm executor, in place
and resumable (finished tasks are skipped), and writes ``manifest.json`` last (:func:`shards_manifest`):
what the trainer checks the shards against the model and its init checkpoint by.

The built-in corpus is the four domain samples the Drop-Upcycling authors published for their routing
analysis. Its files are not uniformly "one document per line": C4 and Japanese mC4 are, but the
English Wikipedia and The Stack samples are runs of lines with blank lines between sections. So a
document is a line for the first two and a blank-line-separated block for the other two
(:data:`DOC_UNITS`); the split by document hash then never puts a line or block into two splits.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import logging
import os
import re
import shlex
import shutil
import socket
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import UserError
from .fsio import (
    apply_umask,
    atomic_dir,
    cache_root,
    remove_orphans,
    sha256_file,
    temp_dir,
    write_json,
)

log = logging.getLogger(__name__)

DOMAINS = ("c4", "en_wikipedia", "ja_mc4", "code_stack")
CORPUS_SHA256: dict[str, str] = {
    "c4": "ee2fb5542e72c3b6979b362f41182d2dd043549912b32fe1438685bc16c563e3",
    "en_wikipedia": "06326623123607d03b7234a102b10cfabd43a08222dcf1ae9c09678d6794ad4a",
    "ja_mc4": "292140089331be3507be86571eeeb784054da921e99f26e04cbc28e05ce7d978",
    "code_stack": "1bee76b593bd66ff6896bff757e7d6e1094526d371b4ce3d938ec6333849623c",
}
CORPUS_REPO = "Taishi-N324/Drop-Upcycling"
CORPUS_COMMIT = "481747d5e60186a7024baac3267b144bd2188855"
CORPUS_BASE_URL = (
    f"https://raw.githubusercontent.com/{CORPUS_REPO}/{CORPUS_COMMIT}/analysis/routing_output/text"
)
CORPUS_URLS: dict[str, str] = {d: f"{CORPUS_BASE_URL}/{d}_texts.txt" for d in DOMAINS}
# How each domain's text file is cut into documents (see the module docstring).
DOC_UNITS: dict[str, str] = {"c4": "line", "ja_mc4": "line", "en_wikipedia": "block", "code_stack": "block"}
SPLITS = ("train", "validation", "test")
EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<pad>"
ENV_CORPUS = "DROP_UPCYCLING_CORPUS"
ENV_CORPUS_URL = "DROP_UPCYCLING_CORPUS_URL"  # base URL override (a mirror, or file:// for offline tests)
DOWNLOAD_TIMEOUT_S = 15.0  # connect and per-read timeout
DOWNLOAD_RETRIES = 1
DOWNLOAD_RETRY_WAIT_S = 2.0


# ---------------------------------------------------------------------------- corpus resolution
def corpus_file(corpus_dir: Path, domain: str) -> Path | None:
    """The domain's file in ``corpus_dir``: ``<domain>.txt`` (a local copy) or ``<domain>_texts.txt`` (upstream)."""
    for name in (f"{domain}.txt", f"{domain}_texts.txt"):
        if (corpus_dir / name).is_file():
            return corpus_dir / name
    return None


def verify_corpus(corpus_dir: str | Path, *, pinned: bool = True) -> dict[str, Path]:
    """Check that ``corpus_dir`` holds the four domain files; return them by domain.

    ``pinned`` (the default) also checks each file against the authors' release (:data:`CORPUS_SHA256`),
    so a truncated download or an edited copy is an error instead of silently different data.
    ``pinned=False`` accepts any text in the same four files: a corpus of one's own in this layout.
    """
    corpus_dir = Path(corpus_dir).expanduser()
    if not corpus_dir.is_dir():
        raise UserError(f"corpus directory {corpus_dir} does not exist")
    files: dict[str, Path] = {}
    for domain in DOMAINS:
        path = corpus_file(corpus_dir, domain)
        if path is None:
            raise UserError(f"corpus directory {corpus_dir} lacks {domain}.txt (or {domain}_texts.txt)")
        if path.stat().st_size == 0:
            raise UserError(f"corpus file {path} is empty")
        if pinned:
            digest = sha256_file(path)
            if digest != CORPUS_SHA256[domain]:
                raise UserError(f"sha256 mismatch for {path}: got {digest}, expected {CORPUS_SHA256[domain]} "
                                "(not the authors' file; a corpus of your own needs pinned: false, or --unpinned)")
        files[domain] = path
    return files


def corpus_digests(files: dict[str, Path], *, pinned: bool = True) -> dict[str, str]:
    """sha256 per domain: the pinned values for a verified corpus (already hashed), else hashed now."""
    return dict(CORPUS_SHA256) if pinned else {d: sha256_file(p) for d, p in files.items()}


def download_corpus(dest: Path, base_url: str | None = None) -> Path:
    """Download the four domain files at the pinned commit into ``dest``, sha256-verified, all or nothing."""
    base_url = (base_url or os.environ.get(ENV_CORPUS_URL) or CORPUS_BASE_URL).rstrip("/")
    dest.parent.mkdir(parents=True, exist_ok=True)
    remove_orphans(dest.parent)  # an earlier download that was killed
    tmp = temp_dir(dest)
    try:
        for domain in DOMAINS:
            url = f"{base_url}/{domain}_texts.txt"
            target = tmp / f"{domain}.txt"
            _fetch(url, target)
            digest = sha256_file(target)
            if digest != CORPUS_SHA256[domain]:
                raise UserError(f"sha256 mismatch for {url}: got {digest}, expected {CORPUS_SHA256[domain]}")
        if dest.exists():  # a concurrent download finished first; keep it (it was verified too)
            shutil.rmtree(tmp)
        else:
            apply_umask(tmp)
            tmp.rename(dest)
        return dest
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _fetch(url: str, target: Path) -> None:
    """One file with a progress bar; a short timeout, and one retry after a transient failure.

    Offline, the first attempt fails at name resolution at once, so a user without network learns
    the other ways to provide the corpus within seconds rather than after a long wait. A missing file
    (HTTP 4xx) is not retried.
    """
    from tqdm.auto import tqdm

    for attempt in range(1 + DOWNLOAD_RETRIES):
        try:
            log.info("downloading %s", url)
            with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response, open(target, "wb") as out:
                total = int(response.headers.get("Content-Length") or 0) or None
                with tqdm(total=total, unit="B", unit_scale=True, desc=target.name, disable=None) as bar:
                    for chunk in iter(lambda: response.read(1 << 16), b""):
                        out.write(chunk)
                        bar.update(len(chunk))
            return
        except urllib.error.HTTPError as e:
            if e.code < 500 or attempt == DOWNLOAD_RETRIES:
                raise
        except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
            if attempt == DOWNLOAD_RETRIES or _is_offline(e):
                raise
        log.warning("download of %s failed, retrying in %.0f s", url, DOWNLOAD_RETRY_WAIT_S)
        time.sleep(DOWNLOAD_RETRY_WAIT_S)


def _is_offline(e: Exception) -> bool:
    """Name resolution failed or the URL is a local file that is not there: retrying cannot help."""
    reason = getattr(e, "reason", e)
    return isinstance(reason, (socket.gaierror, FileNotFoundError))


def resolve_corpus(corpus: str | Path | None = None, *, pinned: bool = True) -> Path:
    """Find the corpus: ``corpus`` / ``$DROP_UPCYCLING_CORPUS`` / user cache / pinned download.

    An explicit path (argument or environment) is never second-guessed: if it is wrong, that is the
    error, rather than silently falling back to a different copy. ``pinned=False`` applies to an
    explicit path only: the cache and the download are always the authors' files, sha256-verified.
    """
    explicit = corpus if corpus is not None else os.environ.get(ENV_CORPUS) or None
    if explicit is not None:
        verify_corpus(explicit, pinned=pinned)
        return Path(explicit).expanduser()
    cached = cache_root() / "corpus"
    if cached.is_dir():
        verify_corpus(cached)
        return cached
    try:
        download_corpus(cached)
    except (urllib.error.URLError, OSError) as e:
        raise UserError(
            f"no corpus found: pass --corpus DIR, set ${ENV_CORPUS}, put the four files in {cached}, or allow "
            f"network access to download them from {CORPUS_BASE_URL} ({_reason(e)})"
        ) from e
    verify_corpus(cached)
    return cached


def _reason(e: BaseException) -> str:
    """The cause of a failed download in a few words, on one line."""
    return " ".join(str(getattr(e, "reason", None) or e).split())


# ---------------------------------------------------------------------------- documents and splits
def read_documents(path: Path, unit: str) -> Iterator[str]:
    """Documents of one corpus file: each non-blank line (``line``) or each blank-line-separated block (``block``)."""
    text = path.read_text(encoding="utf-8")
    parts = text.split("\n") if unit == "line" else re.split(r"\n[ \t\r]*\n", text)
    for part in parts:
        part = part.strip("\n")
        if part.strip():
            yield part


def split_of(text: str, seed: int, val_fraction: float, test_fraction: float) -> str:
    """Split of a document, a pure function of (seed, text): reruns, orders and duplicates all agree."""
    digest = hashlib.sha256(f"{seed}\x00{text}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    if u < test_fraction:
        return "test"
    if u < test_fraction + val_fraction:
        return "validation"
    return "train"


def _check_fractions(val_fraction: float, test_fraction: float) -> None:
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise UserError(f"val/test fractions must be in [0, 1) with sum < 1, got {val_fraction}, {test_fraction}")


def write_splits(
    docs_by_domain: dict[str, Iterable[str]],
    out_dir: str | Path,
    *,
    seed: int = 0,
    val_fraction: float = 0.05,
    test_fraction: float = 0.05,
    overwrite: bool = False,
) -> Path:
    """Write ``{split}/{domain}.jsonl`` (``text``, ``domain``, ``id``) from any texts, deduplicated per domain.

    This is where other corpora plug in: pass e.g. ``{"ja": (d.text for d in JsonlReader(...)())}``
    for each domain (datatrove's JsonlReader / ParquetReader / HuggingFaceDatasetReader all yield
    documents with ``.text``).
    """
    _check_fractions(val_fraction, test_fraction)
    if not docs_by_domain:
        raise UserError("no domains given")
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        counts: dict[str, dict[str, int]] = {s: {} for s in SPLITS}
        for split in SPLITS:
            (tmp / split).mkdir()
        for domain, docs in docs_by_domain.items():
            _check_domain(domain)
            seen: set[bytes] = set()
            n = dict.fromkeys(SPLITS, 0)
            with contextlib.ExitStack() as stack:
                handles = {s: stack.enter_context(open(tmp / s / f"{domain}.jsonl", "w", encoding="utf-8"))
                           for s in SPLITS}
                for i, text in enumerate(docs):
                    key = hashlib.sha256(text.encode()).digest()
                    if key in seen:
                        continue
                    seen.add(key)
                    split = split_of(text, seed, val_fraction, test_fraction)
                    record = {"text": text, "domain": domain, "id": f"{domain}-{i:08d}"}
                    handles[split].write(json.dumps(record, ensure_ascii=False) + "\n")
                    n[split] += 1
            fractions = {"train": 1.0, "validation": val_fraction, "test": test_fraction}
            for split in SPLITS:
                if n[split] == 0 and fractions[split] > 0:
                    raise UserError(f"domain {domain} has zero documents in the {split} split (of {sum(n.values())})")
                counts[split][domain] = n[split]
        write_json(tmp / "splits.json", {"seed": seed, "val_fraction": val_fraction,
                                         "test_fraction": test_fraction, "documents": counts})
        log.info("documents per split: %s", counts)
    return Path(out_dir)


HF_PREFIX = "hf:"  # an input that names a Hugging Face dataset (hub id or local folder) instead of files


def _is_text_file(path: Path) -> bool:
    return ".jsonl" in path.name or path.suffix == ".parquet"


def input_files(source: str | Path) -> list[Path]:
    """The ``.jsonl[.gz]`` / ``.parquet`` files of one input, sorted: a file, every such file under a
    folder, or a glob pattern (``'/data/llm-jp-corpus/v3/ja/**/*.jsonl.gz'``, quoted so that the shell
    leaves it to us: one input per domain, whatever the number of files)."""
    text = str(source)
    path = Path(text).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and _is_text_file(p))
    elif path.is_file():
        files = [path]
    elif re.search(r"[*?[]", text):
        files = sorted(p for p in map(Path, glob.glob(str(path), recursive=True)) if p.is_file() and _is_text_file(p))
    else:
        raise UserError(f"input {source} does not exist")
    if not files:
        raise UserError(f"input {source} holds no .jsonl[.gz] or .parquet files")
    return files


def read_texts(source: str | Path, text_key: str = "text", *, strict: bool = False, files: list[Path] | None = None,
               rank: int = 0, world_size: int = 1, hf_split: str = "train") -> Iterator[str]:
    """Texts of one input via datatrove's readers: a JSONL / JSONL.gz / Parquet file, a folder or glob of
    them (:func:`input_files`; ``files`` when already listed), or ``hf:NAME``, a Hugging Face dataset
    (``hf_split``, streamed; a hub id, or a local folder that ``datasets.load_dataset`` reads).

    This is how other corpora (llm-jp-corpus v3 folders, any exported dataset) become one domain of
    :func:`write_splits` or of the shards (:class:`DirectInputs`). ``rank`` of ``world_size`` reads
    every ``world_size``-th file (a dataset: its shard), so that datatrove tasks share an input.

    A record that is not an object with a string ``text_key`` (a corrupt JSONL line, invalid UTF-8, a
    null text) is dropped, and the drops are counted and logged once per input (datatrove's reader
    would drop them with a warning only, and lose the rest of a file at invalid UTF-8); ``strict``
    refuses the first one instead, naming the file and line. Blank lines and empty texts are skipped.
    """
    from datatrove.io import get_datafolder
    from datatrove.pipeline.readers import HuggingFaceDatasetReader, ParquetReader

    hf_name = str(source)[len(HF_PREFIX):] if str(source).startswith(HF_PREFIX) else None
    if hf_name is not None and not hf_name:
        raise UserError(f"input {source} names no dataset (hf:ORG/NAME or hf:FOLDER)")
    if hf_name is None:
        files = (files if files is not None else input_files(source))[rank::world_size]
    records, dropped = 0, []

    def keep(text: object, where: str) -> bool:
        nonlocal records
        records += 1
        if isinstance(text, str):
            return bool(text.strip())
        if strict:
            raise UserError(f"{where} is not a record with a string {text_key!r} field (--strict refuses it)")
        dropped.append(where)
        return False

    def jsonl(f: Path) -> Iterator[str]:
        with get_datafolder(str(f.parent)).open(f.name, "rb", compression="infer") as lines:
            for n, line in enumerate(lines, 1):
                if not line.strip():
                    continue
                try:
                    text = json.loads(line)[text_key]
                except (ValueError, KeyError, TypeError):  # not JSON, not UTF-8, no such key, not an object
                    text = None
                if keep(text, f"{f}:{n}"):
                    yield text

    def parquet(f: Path) -> Iterator[str]:
        def adapter(reader: ParquetReader, data: dict, file: str, i: int) -> dict:
            keep(data.get(text_key), f"{f}: row {records + 1}")
            return reader._default_adapter(data, file, i)

        reader = ParquetReader(str(f.parent), text_key=text_key, doc_progress=False, adapter=adapter)
        yield from (doc.text for doc in reader.read_file(f.name) if isinstance(doc.text, str) and doc.text.strip())

    def dataset(name: str) -> Iterator[str]:
        def adapter(reader: HuggingFaceDatasetReader, data: dict, file: str, i: int | str) -> dict:
            keep(data.get(text_key), f"{source}: row {records + 1}")
            return reader._default_adapter(data, file, i)

        reader = HuggingFaceDatasetReader(name, {"split": hf_split}, streaming=True, text_key=text_key,
                                          adapter=adapter)
        try:
            yield from (doc.text for doc in reader.run(None, rank, world_size)
                        if isinstance(doc.text, str) and doc.text.strip())
        except UserError:
            raise
        except Exception as e:  # not on the hub / offline and not cached / no such split: one line
            raise UserError(f"input {source}: the dataset could not be read ({type(e).__name__}: "
                            f"{' '.join(str(e).split())[:300]})") from e

    try:
        if hf_name is not None:
            yield from dataset(hf_name)
        for f in files if hf_name is None else []:
            if f.suffix == ".parquet":
                yield from parquet(f)
            elif ".jsonl" in f.name or f.suffix == ".json":
                yield from jsonl(f)
            else:
                raise UserError(f"input {f} is neither .jsonl[.gz] nor .parquet")
    finally:
        if dropped:
            log.warning("input %s: dropped %d of %d records without a string %r field (first: %s); --strict refuses "
                        "them", source, len(dropped), records, text_key, dropped[0])


def prepare_corpus(
    corpus_dir: str | Path,
    out_dir: str | Path,
    *,
    seed: int = 0,
    val_fraction: float = 0.05,
    test_fraction: float = 0.05,
    max_docs_per_domain: int | None = None,
    overwrite: bool = False,
    pinned: bool = True,
) -> Path:
    """The verified corpus -> JSONL splits (``out_dir/{train,validation,test}/{domain}.jsonl``).

    ``max_docs_per_domain`` keeps the first N documents of each domain (quick runs and tests);
    ``pinned`` as in :func:`verify_corpus`.
    """
    files = verify_corpus(corpus_dir, pinned=pinned)

    def docs(domain: str) -> Iterator[str]:
        for i, text in enumerate(read_documents(files[domain], DOC_UNITS[domain])):
            if max_docs_per_domain is not None and i >= max_docs_per_domain:
                return
            yield text

    return write_splits({d: docs(d) for d in DOMAINS}, out_dir, seed=seed, val_fraction=val_fraction,
                        test_fraction=test_fraction, overwrite=overwrite)


def jsonl_files(split_dir: Path, domain: str) -> list[Path]:
    """Input files of one domain in one split: ``{domain}.jsonl`` or a folder ``{domain}/*.jsonl[.gz]``."""
    single = split_dir / f"{domain}.jsonl"
    if single.is_file():
        return [single]
    folder = split_dir / domain
    return sorted(p for p in folder.glob("*.jsonl*") if p.is_file()) if folder.is_dir() else []


def split_domains(split_dir: Path) -> list[str]:
    """Domains present in a split folder, in a fixed order (the built-in corpus order first)."""
    names = {p.name.split(".jsonl")[0] if p.is_file() else p.name for p in split_dir.iterdir()
             if (p.is_file() and ".jsonl" in p.name) or p.is_dir()}
    return [d for d in DOMAINS if d in names] + sorted(names - set(DOMAINS))


# ---------------------------------------------------------------------------- tokenizer
def _iter_texts(train_dir: Path, max_chars_per_domain: int | None) -> Iterator[str]:
    import gzip

    for domain in split_domains(train_dir):
        chars = 0
        for path in jsonl_files(train_dir, domain):
            opener = gzip.open if path.suffix == ".gz" else open
            with opener(path, "rt", encoding="utf-8") as f:
                for line in f:
                    text = json.loads(line)["text"]
                    yield text
                    chars += len(text)
                    if max_chars_per_domain is not None and chars >= max_chars_per_domain:
                        break
            if max_chars_per_domain is not None and chars >= max_chars_per_domain:
                break


def train_tokenizer(
    train_dir: str | Path,
    out_dir: str | Path,
    vocab_size: int = 8192,
    *,
    max_chars_per_domain: int | None = 2_000_000,
    overwrite: bool = False,
) -> Path:
    """Train a byte-level BPE on the train split and save it with the HF tokenizer files.

    Byte-level means every string round-trips exactly and no text is ever ``<unk>``. No
    normalizer and no post-processor: the tokenizer maps text to tokens and back, and the data
    pipeline appends ``<|endoftext|>`` between documents itself. ``max_chars_per_domain`` caps each
    domain's share of the training text, which bounds the time and keeps one big domain from owning
    the vocabulary. The result is deterministic for the same inputs and options (tokenizers' BPE
    trainer breaks ties by pair order).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    train_dir = Path(train_dir)
    if not train_dir.is_dir() or not split_domains(train_dir):
        raise UserError(f"{train_dir} holds no <domain>.jsonl files (run `drop-upcycling data corpus` first)")
    if not 512 <= vocab_size <= 2**32:
        raise UserError(f"vocab size must be at least 512 (256 bytes + merges), got {vocab_size}")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOS_TOKEN, PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_iter_texts(train_dir, max_chars_per_domain), trainer=trainer)
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        tokenizer.save(str(tmp / "tokenizer.json"))
        write_hf_tokenizer_files(tmp, model_max_length=1 << 20)
    log.info("tokenizer with %d tokens saved to %s", tokenizer.get_vocab_size(), out_dir)
    return Path(out_dir)


def write_hf_tokenizer_files(out_dir: Path, model_max_length: int) -> None:
    """``tokenizer_config.json`` + ``special_tokens_map.json`` so AutoTokenizer (and lm-eval) load tokenizer.json."""
    special = {"bos_token": EOS_TOKEN, "eos_token": EOS_TOKEN, "unk_token": EOS_TOKEN, "pad_token": PAD_TOKEN}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
    }
    write_json(out_dir / "tokenizer_config.json", config)
    write_json(out_dir / "special_tokens_map.json", special)


def tokenizer_vocab_size(tokenizer_dir: str | Path) -> int:
    from tokenizers import Tokenizer

    path = Path(tokenizer_dir) / "tokenizer.json"
    if not path.is_file():
        raise UserError(f"{path} does not exist (train one with `drop-upcycling data tokenizer`)")
    return Tokenizer.from_file(str(path)).get_vocab_size()


def check_vocab(tokenizer_dir: str | Path, model_vocab_size: int) -> int:
    """Fail if the tokenizer can emit ids the model has no embedding for; return the tokenizer's size."""
    size = tokenizer_vocab_size(tokenizer_dir)
    if size > model_vocab_size:
        raise UserError(f"tokenizer {tokenizer_dir} has {size} tokens, more than the model's vocab of {model_vocab_size}")
    return size


# ---------------------------------------------------------------------------- datatrove shards
MANIFEST_FILE = "manifest.json"  # beside the shards, written last: what the trainer checks them by
MANIFEST_FORMAT = "drop-upcycling token shards"
MANIFEST_VERSION = 1
SHARDS_TOKENIZER = "tokenizer"  # the tokenizer's files, copied beside the shards
LOGS = "logs"  # datatrove's logs and completion marks of the tokenization tasks
FINISH_LOGS = "logs-manifest"  # the same for the Slurm job that writes the manifest
EXECUTORS = ("local", "slurm")


def _check_domain(domain: str) -> None:
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", domain):
        raise UserError(f"domain name {domain!r} must be letters, digits, '_', '.', '-'")


@dataclass(frozen=True)
class DirectInputs:
    """Corpus inputs tokenized straight into shards (``data tokenize --input``): no JSONL copy, so the
    reading runs in the datatrove tasks too, locally or on Slurm, each domain's files shared out over
    ``tasks`` (a Hugging Face dataset: its shards).

    ``sources`` maps each domain to one input of :func:`read_texts`. A document goes to train,
    validation or test by :func:`split_of` with ``seed`` and the fractions, exactly as ``data corpus``
    splits it; with both fractions 0 (the default) everything is train and only train shards are
    written. Unlike ``data corpus``, exact duplicates are kept: dropping them needs one process that
    sees a whole domain.
    """

    sources: dict[str, str]
    text_key: str = "text"
    hf_split: str = "train"
    strict: bool = False
    seed: int = 0
    val_fraction: float = 0.0
    test_fraction: float = 0.0

    def jobs(self) -> list[dict]:
        """One job per (split, domain), split-major like the ``--splits`` route; files listed now, so
        that every task reads the same list whatever happens to the folders meanwhile."""
        _check_fractions(self.val_fraction, self.test_fraction)
        if not self.sources:
            raise UserError("no inputs given")
        fractions = {"train": 1.0, "validation": self.val_fraction, "test": self.test_fraction}
        keep = [self.seed, self.val_fraction, self.test_fraction] if self.val_fraction or self.test_fraction else None
        files: dict[str, list[str] | None] = {}
        for domain, source in self.sources.items():
            _check_domain(domain)
            dataset = source.startswith(HF_PREFIX)
            files[domain] = None if dataset else [str(f.resolve()) for f in input_files(source)]
        return [{"split": split, "domain": domain, "source": source, "files": files[domain],
                 "text_key": self.text_key, "hf_split": self.hf_split if files[domain] is None else None,
                 "strict": self.strict, "keep": keep}
                for split in SPLITS if fractions[split] > 0 for domain, source in self.sources.items()]


class _ShardJobs:
    """One datatrove task = one (split, domain, file shard): a reader -> ``DocumentTokenizer``.

    All (split, domain) pairs share ONE executor, so ``workers`` run domains in parallel and one
    completion log covers everything; ``tasks`` splits each domain's files further. A job reads JSONL
    splits (``paths_file``, with datatrove's ``JsonlReader``) or a :class:`DirectInputs` source
    (:func:`read_texts`, keeping the documents of the job's split).
    """

    def __init__(self, jobs: list[dict], tasks: int, tokenizer_json: str, out_dir: str, eos_token: str = EOS_TOKEN):
        self.jobs, self.tasks, self.tokenizer_json, self.out_dir = jobs, tasks, tokenizer_json, out_dir
        self.eos_token = eos_token

    def __call__(self, data: object, rank: int = 0, world_size: int = 1) -> None:
        from datatrove.pipeline.tokens import DocumentTokenizer

        job, sub = divmod(rank, self.tasks)
        spec = self.jobs[job]
        writer = DocumentTokenizer(
            output_folder=str(Path(self.out_dir) / spec["split"] / spec["domain"]),
            tokenizer_name_or_path=self.tokenizer_json,
            save_filename=spec["domain"],
            eos_token=self.eos_token,
            shuffle_documents=False,
            batch_size=1000,
        )
        writer(self._documents(spec, sub), sub, self.tasks)

    def _documents(self, spec: dict, sub: int) -> Iterator:
        if "paths_file" in spec:
            from datatrove.pipeline.readers import JsonlReader

            # An explicit file list: datatrove treats a plain glob as a suffix ("c4.jsonl" matches "ja_mc4.jsonl").
            reader = JsonlReader(spec["folder"], paths_file=spec["paths_file"], text_key="text", id_key="id",
                                 doc_progress=False)
            return reader(None, sub, self.tasks)
        return _split_documents(spec, sub, self.tasks)


def _split_documents(spec: dict, rank: int, world_size: int) -> Iterator:
    """The documents of a direct input's share ``rank`` that belong to the job's split."""
    from datatrove.data import Document

    keep = spec["keep"]
    files = [Path(f) for f in spec["files"]] if spec["files"] is not None else None
    texts = read_texts(spec["source"], spec["text_key"], strict=spec["strict"], files=files, rank=rank,
                       world_size=world_size, hf_split=spec["hf_split"] or "train")
    for i, text in enumerate(texts):
        if keep is None or split_of(text, *keep) == spec["split"]:
            yield Document(text=text, id=f"{spec['domain']}-{rank:05d}-{i:09d}")


def resolve_tokenizer_json(tokenizer: str | Path) -> Path:
    """``tokenizer.json`` of a directory, the file itself, or of a hub id (e.g. ``llm-jp/llm-jp-3-1.8b``).

    A hub id is fetched through the Hugging Face cache, so it works offline once cached; its
    ``tokenizer_config.json`` and ``special_tokens_map.json`` come along when the repository has them
    (they name the eos token, and AutoTokenizer needs them in a checkpoint).
    """
    path = Path(tokenizer).expanduser()
    if path.is_dir():
        if not (path / "tokenizer.json").is_file():
            raise UserError(f"{path} has no tokenizer.json (train one with `drop-upcycling data tokenizer`)")
        return path / "tokenizer.json"
    if path.is_file():
        return path
    if path.is_absolute() or str(tokenizer).startswith(".") or str(tokenizer).count("/") != 1:
        raise UserError(f"tokenizer {tokenizer} does not exist (a directory with tokenizer.json, or a hub id)")
    try:
        from huggingface_hub import hf_hub_download

        found = Path(hf_hub_download(str(tokenizer), "tokenizer.json"))
    except Exception as e:  # offline and not cached, unknown repo, no tokenizer.json
        raise UserError(f"tokenizer {tokenizer}: not a local path and not loadable from the hub ({e})") from e
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        with contextlib.suppress(Exception):  # optional: not every repository has them
            hf_hub_download(str(tokenizer), name)
    return found


def tokenizer_eos(tokenizer_json: Path) -> str:
    """The eos token that the tokenizer's own files name (``tokenizer_config.json``, then
    ``special_tokens_map.json`` beside ``tokenizer.json``), else ``<|endoftext|>``: the llm-jp
    tokenizers end a document with ``</s>``, ours with ``<|endoftext|>``, and the shards must use the
    one the model was trained with."""
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        path = tokenizer_json.parent / name
        try:
            value = json.loads(path.read_text()).get("eos_token") if path.is_file() else None
        except (ValueError, AttributeError, OSError):
            continue
        if isinstance(value, dict):
            value = value.get("content")
        if isinstance(value, str) and value:
            return value
    return EOS_TOKEN


def _copy_tokenizer(tokenizer_json: Path, dest: Path) -> None:
    """``tokenizer.json`` and the HF files beside it into ``dest``: the shards carry their tokenizer, so
    a run from them writes it into its checkpoints even without an init checkpoint (FS)."""
    from .checkpoint import TOKENIZER_FILES  # the one list of a checkpoint's tokenizer files

    with atomic_dir(dest, overwrite=True) as tmp:
        shutil.copy2(tokenizer_json, tmp / "tokenizer.json")
        for name in TOKENIZER_FILES:
            if name != "tokenizer.json" and (tokenizer_json.parent / name).is_file():
                shutil.copy2(tokenizer_json.parent / name, tmp / name)


def _same_plan(a: dict, b: dict) -> bool:
    """Plans that build the same shards: the tokenizer may be named differently (a folder, its
    tokenizer.json, a hub id) as long as its sha256 is the same."""
    return {k: v for k, v in a.items() if k != "tokenizer"} == {k: v for k, v in b.items() if k != "tokenizer"}


def shard_pipeline(
    jsonl_dir: str | Path | None,
    tokenizer_dir: str | Path,
    out_dir: str | Path,
    *,
    tasks: int = 1,
    splits: Iterable[str] = SPLITS,
    eos_token: str | None = None,
    inputs: DirectInputs | None = None,
) -> tuple[list, int, dict]:
    """(datatrove pipeline, number of tasks, plan) of :func:`tokenize_shards`, for any executor.

    Reads the JSONL splits of ``jsonl_dir`` (``data corpus``), or with ``inputs`` the corpus files
    themselves. Writes ``plan.json`` (what the folder is for) and ``tokenizer/`` into ``out_dir``.
    :func:`tokenize_shards` runs it on the local or the Slurm executor; by hand, run it on any executor
    with ``tasks=n_tasks`` and ``logging_dir=out_dir/logs``, then :func:`finish_shards`.
    """
    out_dir = Path(out_dir)
    tokenizer_json = resolve_tokenizer_json(tokenizer_dir)
    from tokenizers import Tokenizer

    eos_token = eos_token or tokenizer_eos(tokenizer_json)
    if Tokenizer.from_file(str(tokenizer_json)).token_to_id(eos_token) is None:
        raise UserError(f"tokenizer {tokenizer_dir} has no token {eos_token!r} (pass the tokenizer's eos token)")
    if tasks < 1:
        raise UserError(f"tasks must be >= 1, got {tasks}")
    if inputs is not None:
        jobs = inputs.jobs()
        plan_jobs = [[j["split"], j["domain"], {k: v for k, v in j.items() if k not in ("split", "domain")}]
                     for j in jobs]
    else:
        if jsonl_dir is None:
            raise UserError("give the JSONL splits (--splits) or the inputs (--input)")
        jsonl_dir = Path(jsonl_dir)
        listed = []
        for split in splits:
            if not (jsonl_dir / split).is_dir():
                raise UserError(f"{jsonl_dir / split} does not exist (run `drop-upcycling data corpus` first)")
            for domain in split_domains(jsonl_dir / split):
                files = jsonl_files(jsonl_dir / split, domain)
                if not files:
                    raise UserError(f"{jsonl_dir / split} has no JSONL files for domain {domain}")
                listed.append((split, domain, files))
        if not listed:
            raise UserError(f"{jsonl_dir} holds no JSONL documents")
        plan_jobs = [[s, d, [str(f.resolve()) for f in files]] for s, d, files in listed]
    # What this output folder is for; a rerun with other inputs, tokenizer or --tasks must not reuse
    # the completed tasks of the first (datatrove's skip logic only knows task numbers).
    plan = {"tokenizer_sha256": sha256_file(tokenizer_json), "eos_token": eos_token, "tasks": tasks,
            "jobs": plan_jobs, "tokenizer": str(tokenizer_dir)}
    plan_file = out_dir / "plan.json"
    if plan_file.is_file() and not _same_plan(json.loads(plan_file.read_text()), plan):
        raise UserError(f"{out_dir} holds shards of other inputs, tokenizer or --tasks; choose a new --out")
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(plan_file, plan)
    _copy_tokenizer(tokenizer_json, out_dir / SHARDS_TOKENIZER)
    if inputs is None:
        lists = out_dir / "inputs"
        lists.mkdir(exist_ok=True)
        jobs = []
        for split, domain, files in listed:
            paths_file = lists / f"{split}.{domain}.txt"
            paths_file.write_text("".join(f"{f.name}\n" for f in files))
            jobs.append({"split": split, "domain": domain, "folder": str(files[0].parent),
                         "paths_file": str(paths_file)})
    # The tasks read the copy: it lies where they write (a cluster's shared file system), a hub cache may not.
    copied = str(out_dir / SHARDS_TOKENIZER / "tokenizer.json")
    return [_ShardJobs(jobs, tasks, copied, str(out_dir), eos_token)], len(jobs) * tasks, plan


def shard_counts(folder: Path) -> tuple[int, int]:
    """(tokens, documents) of a folder of ``.ds`` shards, eos included, from their indexes' sizes and last entries."""
    tokens = documents = 0
    for index in sorted(folder.glob("*.ds.index")):
        size = index.stat().st_size
        if size:
            tokens += int(np.fromfile(index, dtype="<u8", offset=size - 8)[0])
            documents += size // 8
    return tokens, documents


def _versions() -> dict[str, str]:
    """Versions of what wrote the shards (the manifest records them)."""
    import platform
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in ("drop-upcycling", "datatrove", "tokenizers"):
        with contextlib.suppress(PackageNotFoundError):
            out[pkg] = version(pkg)
    return out


def shards_manifest(out_dir: Path, plan: dict) -> dict:
    """The manifest of finished shards: their tokenizer (name, sha256 of ``tokenizer.json``, vocabulary
    size, eos token and id), token width, tokens and documents per split and domain, and versions."""
    from tokenizers import Tokenizer

    tokenizer_json = out_dir / SHARDS_TOKENIZER / "tokenizer.json"
    tokenizer = Tokenizer.from_file(str(tokenizer_json))
    vocab = tokenizer.get_vocab_size()
    tokens: dict[str, dict[str, int]] = {}
    documents: dict[str, dict[str, int]] = {}
    for split, domain, _ in plan["jobs"]:
        tokens.setdefault(split, {})[domain], documents.setdefault(split, {})[domain] = shard_counts(
            out_dir / split / domain)
    return {
        "format": MANIFEST_FORMAT, "version": MANIFEST_VERSION,
        "tokenizer": {"name": plan.get("tokenizer"), "sha256": sha256_file(tokenizer_json), "vocab_size": vocab,
                      "eos_token": plan["eos_token"], "eos_id": tokenizer.token_to_id(plan["eos_token"])},
        "token_bytes": 4 if vocab > 65536 else 2,  # datatrove's DocumentTokenizer rule
        "tokens": tokens, "documents": documents,
        "versions": _versions(), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def finish_shards(out_dir: str | Path, n_tasks: int) -> dict:
    """After the last task: ``DONE`` and ``manifest.json`` (atomically, last), or a one-line error naming
    the tasks that did not complete. On Slurm it is the job that runs after the tokenization array."""
    out_dir = Path(out_dir)
    completions = out_dir / LOGS / "completions"
    incomplete = [r for r in range(n_tasks) if not (completions / f"{r:05d}").is_file()]
    if incomplete:
        listed = ", ".join(map(str, incomplete[:10])) + (f" and {len(incomplete) - 10} more" if len(incomplete) > 10
                                                         else "")
        raise UserError(f"datatrove tasks {listed} did not complete; see {out_dir / LOGS} and rerun")
    plan = json.loads((out_dir / "plan.json").read_text())
    manifest = shards_manifest(out_dir, plan)
    write_json(out_dir / "DONE", plan)
    write_json(out_dir / MANIFEST_FILE, manifest)
    log.info("shards in %s: %s tokens per split and domain", out_dir, manifest["tokens"])
    return manifest


class _FinishShards:
    """:func:`finish_shards` as a one-task pipeline: the Slurm job after the tokenization array."""

    def __init__(self, out_dir: str, n_tasks: int) -> None:
        self.out_dir, self.n_tasks = out_dir, n_tasks

    def __call__(self, data: object, rank: int = 0, world_size: int = 1) -> None:
        finish_shards(self.out_dir, self.n_tasks)


@dataclass(frozen=True)
class SlurmOptions:
    """Where the Slurm jobs of :func:`tokenize_shards` run (``data tokenize --executor slurm``)."""

    partition: str
    time: str  # sbatch --time, e.g. 24:00:00
    cpus_per_task: int = 1
    mem_per_cpu_gb: int = 2
    env_command: str | None = None  # default: activate this Python environment (see _activate_command)
    sbatch_args: dict[str, str] = field(default_factory=dict)  # more sbatch options: {"account": "abc"}
    job_name: str = "drop-upcycling-shards"


def _activate_command() -> str | None:
    """The jobs run in the environment that submits them: its venv is activated first (none: nothing)."""
    if sys.prefix != sys.base_prefix and (Path(sys.prefix) / "bin" / "activate").is_file():
        return f"source {shlex.quote(str(Path(sys.prefix) / 'bin' / 'activate'))}"
    return None


def slurm_executors(pipeline: list, n_tasks: int, out_dir: Path, slurm: SlurmOptions, workers: int = -1) -> tuple:
    """(tokenization array, manifest job): two datatrove ``SlurmPipelineExecutor`` s, the second started
    by Slurm only after every task of the first succeeded. ``workers``: tasks running at once (-1: no
    limit). Running the second submits both; nothing is submitted before that."""
    from datatrove.executor.slurm import SlurmPipelineExecutor

    common = {"time": slurm.time, "partition": slurm.partition, "qos": "", "sbatch_args": dict(slurm.sbatch_args),
              "env_command": slurm.env_command or _activate_command()}
    tokenize = SlurmPipelineExecutor(pipeline, tasks=n_tasks, workers=workers, cpus_per_task=slurm.cpus_per_task,
                                     mem_per_cpu_gb=slurm.mem_per_cpu_gb, job_name=slurm.job_name,
                                     logging_dir=str(out_dir / LOGS), **common)
    finish = SlurmPipelineExecutor([_FinishShards(str(out_dir), n_tasks)], tasks=1, job_name=f"{slurm.job_name}-manifest",
                                   logging_dir=str(out_dir / FINISH_LOGS), depends=tokenize, skip_completed=False,
                                   **common)
    return tokenize, finish


def tokenize_shards(
    jsonl_dir: str | Path | None,
    tokenizer_dir: str | Path,
    out_dir: str | Path,
    *,
    tasks: int = 1,
    workers: int | None = None,
    splits: Iterable[str] = SPLITS,
    eos_token: str | None = None,
    inputs: DirectInputs | None = None,
    executor: str = "local",
    slurm: SlurmOptions | None = None,
) -> Path:
    """datatrove reader -> ``DocumentTokenizer`` per (split, domain) into ``out_dir/{split}/{domain}/*.ds``,
    then ``manifest.json`` (:func:`shards_manifest`) beside them.

    Reads the JSONL splits of ``jsonl_dir`` or, with ``inputs``, corpus files directly. Each document is
    followed by ``eos_token`` (default: the tokenizer's own, see :func:`tokenizer_eos`; ``</s>`` for
    the LLM-jp tokenizers); ``tokenizer_dir`` may also be a ``tokenizer.json`` or a hub id (see
    :func:`resolve_tokenizer_json`). Runs in place (not atomically) so that a rerun skips what
    finished: the executor's ``logs/completions`` mark finished tasks and a task killed midway is
    redone from scratch; the manifest is written last. ``tasks`` > 1 shares a domain's files out
    over tasks; ``workers`` is how many run at once (local: processes, default 1; Slurm: array tasks,
    default no limit).

    ``executor="slurm"`` submits the tasks as a Slurm array (``slurm``: partition, time, ...) and
    the manifest as a job that runs after it, and returns at once; rerunning the same call resubmits
    the tasks that did not complete.
    """
    if executor not in EXECUTORS:
        raise UserError(f"executor must be one of {', '.join(EXECUTORS)}, got {executor!r}")
    if executor == "slurm" and slurm is None:
        raise UserError("the slurm executor needs a partition and a time limit (--partition, --time)")
    if workers is not None and workers < 1:
        raise UserError(f"workers must be >= 1, got {workers}")
    out_dir = Path(out_dir).resolve() if executor == "slurm" else Path(out_dir)  # jobs may start elsewhere
    pipeline, n_tasks, _ = shard_pipeline(jsonl_dir, tokenizer_dir, out_dir, tasks=tasks, splits=splits,
                                          eos_token=eos_token, inputs=inputs)
    for name in (MANIFEST_FILE, "DONE"):  # until every task is done again, these shards are not finished
        (out_dir / name).unlink(missing_ok=True)
    if executor == "slurm":
        assert slurm is not None
        _, finish = slurm_executors(pipeline, n_tasks, out_dir, slurm, workers if workers is not None else -1)
        finish.run()
        return out_dir
    from datatrove.executor import LocalPipelineExecutor

    local = LocalPipelineExecutor(pipeline, tasks=n_tasks, workers=min(workers or 1, n_tasks),
                                  logging_dir=str(out_dir / LOGS))
    local.run()
    finish_shards(out_dir, n_tasks)
    return out_dir
