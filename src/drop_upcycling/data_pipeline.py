"""The data build steps: corpus -> JSONL splits -> byte-level BPE tokenizer -> datatrove ``.ds`` shards.

Each step reads only files and writes one directory atomically (temp dir + rename, see
:func:`~drop_upcycling.checkpoint.atomic_dir`), so an interrupted step never leaves something that a
later step would mistake for a finished result. :mod:`drop_upcycling.data` chains them
(:func:`~drop_upcycling.data.prepare_all`) and reads the result.

The shared corpus is the four domain samples the Drop-Upcycling authors published for their routing
analysis. Its files are not uniformly "one document per line": C4 and Japanese mC4 are, but the
English Wikipedia and The Stack samples are runs of lines with blank lines between sections. So a
document is a line for the first two and a blank-line-separated block for the other two
(:data:`DOC_UNITS`); the split by document hash then never puts a line or block into two splits.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Iterator
from pathlib import Path

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
    """The domain's file in ``corpus_dir``: ``<domain>.txt`` (shared folder) or ``<domain>_texts.txt`` (upstream)."""
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
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise UserError(f"val/test fractions must be in [0, 1) with sum < 1, got {val_fraction}, {test_fraction}")
    if not docs_by_domain:
        raise UserError("no domains given")
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        counts: dict[str, dict[str, int]] = {s: {} for s in SPLITS}
        for split in SPLITS:
            (tmp / split).mkdir()
        for domain, docs in docs_by_domain.items():
            if not re.fullmatch(r"[A-Za-z0-9_.-]+", domain):
                raise UserError(f"domain name {domain!r} must be letters, digits, '_', '.', '-'")
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


def read_texts(source: str | Path, text_key: str = "text", *, strict: bool = False) -> Iterator[str]:
    """Texts of a JSONL / JSONL.gz / Parquet file, or of every such file under a folder, via datatrove's readers.

    This is how other corpora (llm-jp-corpus v3 folders, any exported dataset) become one domain of
    :func:`write_splits`; for a Hugging Face dataset use datatrove's ``HuggingFaceDatasetReader`` and
    pass ``(d.text for d in reader())`` to :func:`write_splits` directly.

    A record that is not an object with a string ``text_key`` (a corrupt JSONL line, invalid UTF-8, a
    null text) is dropped, and the drops are counted and logged once per input (datatrove's reader
    would drop them with a warning only, and lose the rest of a file at invalid UTF-8); ``strict``
    refuses the first one instead, naming the file and line. Blank lines and empty texts are skipped.
    """
    from datatrove.io import get_datafolder
    from datatrove.pipeline.readers import ParquetReader

    path = Path(source).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and (".jsonl" in p.name or p.suffix == ".parquet"))
    elif path.is_file():
        files = [path]
    else:
        raise UserError(f"input {source} does not exist")
    if not files:
        raise UserError(f"input {source} holds no .jsonl[.gz] or .parquet files")
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

    try:
        for f in files:
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
    """Domains present in a split folder, in a fixed order (the shared corpus order first)."""
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
class _ShardJobs:
    """One datatrove task = one (split, domain, file shard): ``JsonlReader`` -> ``DocumentTokenizer``.

    All (split, domain) pairs share ONE :class:`LocalPipelineExecutor`, so ``workers`` run domains in
    parallel and one completion log covers everything; ``tasks`` splits each domain's files further.
    """

    def __init__(self, jobs: list[tuple[str, str, str, str]], tasks: int, tokenizer_json: str, out_dir: str,
                 eos_token: str = EOS_TOKEN):
        self.jobs, self.tasks, self.tokenizer_json, self.out_dir = jobs, tasks, tokenizer_json, out_dir
        self.eos_token = eos_token

    def __call__(self, data: object, rank: int = 0, world_size: int = 1) -> None:
        from datatrove.pipeline.readers import JsonlReader
        from datatrove.pipeline.tokens import DocumentTokenizer

        job, sub = divmod(rank, self.tasks)
        split, domain, folder, paths_file = self.jobs[job]
        # An explicit file list: datatrove treats a plain glob as a suffix ("c4.jsonl" matches "ja_mc4.jsonl").
        reader = JsonlReader(folder, paths_file=paths_file, text_key="text", id_key="id", doc_progress=False)
        writer = DocumentTokenizer(
            output_folder=str(Path(self.out_dir) / split / domain),
            tokenizer_name_or_path=self.tokenizer_json,
            save_filename=domain,
            eos_token=self.eos_token,
            shuffle_documents=False,
            batch_size=1000,
        )
        writer(reader(None, sub, self.tasks), sub, self.tasks)


def resolve_tokenizer_json(tokenizer: str | Path) -> Path:
    """``tokenizer.json`` of a directory, the file itself, or of a hub id (e.g. ``llm-jp/llm-jp-3-1.8b``).

    A hub id is fetched through the Hugging Face cache, so it works offline once cached.
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

        return Path(hf_hub_download(str(tokenizer), "tokenizer.json"))
    except Exception as e:  # offline and not cached, unknown repo, no tokenizer.json
        raise UserError(f"tokenizer {tokenizer}: not a local path and not loadable from the hub ({e})") from e


def shard_pipeline(
    jsonl_dir: str | Path,
    tokenizer_dir: str | Path,
    out_dir: str | Path,
    *,
    tasks: int = 1,
    splits: Iterable[str] = SPLITS,
    eos_token: str = EOS_TOKEN,
) -> tuple[list, int, dict]:
    """(datatrove pipeline, number of tasks, plan) of :func:`tokenize_shards`, for any executor.

    On a cluster, hand the pipeline to ``SlurmPipelineExecutor(pipeline, tasks=n_tasks, ...)``
    instead of the local executor; the output layout is the same.
    """
    jsonl_dir, out_dir = Path(jsonl_dir), Path(out_dir)
    tokenizer_json = resolve_tokenizer_json(tokenizer_dir)
    from tokenizers import Tokenizer

    if Tokenizer.from_file(str(tokenizer_json)).token_to_id(eos_token) is None:
        raise UserError(f"tokenizer {tokenizer_dir} has no token {eos_token!r} (pass the tokenizer's eos token)")
    if tasks < 1:
        raise UserError(f"tasks must be >= 1, got {tasks}")
    jobs = []
    for split in splits:
        if not (jsonl_dir / split).is_dir():
            raise UserError(f"{jsonl_dir / split} does not exist (run `drop-upcycling data corpus` first)")
        for domain in split_domains(jsonl_dir / split):
            files = jsonl_files(jsonl_dir / split, domain)
            if not files:
                raise UserError(f"{jsonl_dir / split} has no JSONL files for domain {domain}")
            jobs.append((split, domain, files))
    if not jobs:
        raise UserError(f"{jsonl_dir} holds no JSONL documents")
    # What this output folder is for; a rerun with other inputs, tokenizer or --tasks must not reuse
    # the completed tasks of the first (datatrove's skip logic only knows task numbers).
    plan = {"tokenizer_sha256": sha256_file(tokenizer_json), "eos_token": eos_token, "tasks": tasks,
            "jobs": [[s, d, [str(f.resolve()) for f in files]] for s, d, files in jobs]}
    plan_file = out_dir / "plan.json"
    if plan_file.is_file() and json.loads(plan_file.read_text()) != plan:
        raise UserError(f"{out_dir} holds shards of other inputs, tokenizer or --tasks; choose a new --out")
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(plan_file, plan)
    lists = out_dir / "inputs"
    lists.mkdir(exist_ok=True)
    specs = []
    for split, domain, files in jobs:
        paths_file = lists / f"{split}.{domain}.txt"
        paths_file.write_text("".join(f"{f.name}\n" for f in files))
        specs.append((split, domain, str(files[0].parent), str(paths_file)))
    return [_ShardJobs(specs, tasks, str(tokenizer_json), str(out_dir), eos_token)], len(jobs) * tasks, plan


def tokenize_shards(
    jsonl_dir: str | Path,
    tokenizer_dir: str | Path,
    out_dir: str | Path,
    *,
    tasks: int = 1,
    workers: int = 1,
    splits: Iterable[str] = SPLITS,
    eos_token: str = EOS_TOKEN,
) -> Path:
    """datatrove ``JsonlReader -> DocumentTokenizer`` per (split, domain) into ``out_dir/{split}/{domain}/*.ds``.

    Each document is followed by ``eos_token`` (``</s>`` for the LLM-jp tokenizers; ``tokenizer_dir``
    may also be a ``tokenizer.json`` path or a hub id, see :func:`resolve_tokenizer_json`). Runs
    in place (not atomically) so that a rerun skips what finished: the executor's
    ``logs/completions`` mark finished tasks and a task killed midway is redone from scratch.
    ``DONE`` is written last. ``tasks`` > 1 helps when a domain is a folder of many JSONL files
    (datatrove splits work by file); ``workers`` runs tasks in parallel processes.
    """
    from datatrove.executor import LocalPipelineExecutor

    if workers < 1:
        raise UserError(f"workers must be >= 1, got {workers}")
    out_dir = Path(out_dir)
    pipeline, n_tasks, plan = shard_pipeline(jsonl_dir, tokenizer_dir, out_dir, tasks=tasks, splits=splits,
                                             eos_token=eos_token)
    done = out_dir / "DONE"
    done.unlink(missing_ok=True)
    executor = LocalPipelineExecutor(pipeline, tasks=n_tasks, workers=min(workers, n_tasks),
                                     logging_dir=str(out_dir / "logs"))
    executor.run()
    incomplete = executor.get_incomplete_ranks(range(n_tasks), skip_completed=True)
    if incomplete:
        raise UserError(f"datatrove tasks {incomplete} did not complete; see {out_dir / 'logs'} and rerun")
    write_json(done, plan)
    return out_dir
