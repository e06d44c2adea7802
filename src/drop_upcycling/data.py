"""Training and evaluation data: the prepared corpus cache and the sharded, resumable token reader.

:func:`prepare_all` chains the build steps of :mod:`drop_upcycling.data_pipeline` (corpus ->
JSONL splits -> tokenizer -> datatrove ``.ds`` shards) into one cache directory keyed by a hash of
the corpus sha256s and the options, built in a temp dir and renamed, so concurrent or killed runs
never leave a half cache and every caller (training, evaluation, routing) gets the same data.

:class:`TokenSequenceReader` reads datatrove's ``DocumentTokenizer`` output directly: ``X.ds`` is the
documents' tokens back to back (little-endian uint16 when the vocab fits 65,536 ids, else uint32),
each followed by ``<|endoftext|>``; ``X.ds.index`` holds the cumulative token count at each document
end (uint64); ``X.ds.metadata`` says ``<tokenizer>|<token bytes>``. Files are memory-mapped, so a
reader costs no RAM beyond one epoch's permutation per domain.

:class:`TokenShards` is the real-data route's result instead (any corpus, any tokenizer: ``drop-upcycling
data tokenize``): shards with a manifest, checked against the model and its init checkpoint before a
run reads them (:meth:`TokenShards.check_fits`).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import itertools
import json
import logging
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .data_pipeline import (
    CORPUS_BASE_URL,
    CORPUS_COMMIT,
    CORPUS_SHA256,
    CORPUS_URLS,
    DOMAINS,
    EOS_TOKEN,
    EXECUTORS,
    HF_PREFIX,
    MANIFEST_FILE,
    MANIFEST_FORMAT,
    PAD_TOKEN,
    SHARDS_TOKENIZER,
    SPLITS,
    DirectInputs,
    SlurmOptions,
    cache_root,
    check_vocab,
    corpus_digests,
    download_corpus,
    finish_shards,
    input_files,
    jsonl_files,
    prepare_corpus,
    read_texts,
    resolve_corpus,
    resolve_tokenizer_json,
    shard_counts,
    shard_pipeline,
    split_domains,
    tokenize_shards,
    tokenizer_vocab_size,
    train_tokenizer,
    verify_corpus,
    write_splits,
)
from .errors import UserError
from .fsio import apply_umask, load_json, remove_orphans, sha256_file, temp_dir, write_json

__all__ = [
    "CORPUS_BASE_URL", "CORPUS_COMMIT", "CORPUS_SHA256", "CORPUS_URLS", "DOMAINS", "EOS_TOKEN", "MANIFEST_FILE",
    "PAD_TOKEN", "SPLITS", "DirectInputs", "PreparedData", "SlurmOptions", "TokenSequenceReader", "TokenShards",
    "check_init_tokenizer", "check_vocab", "configure_parser", "download_corpus", "epochs_note", "finish_shards",
    "iter_documents", "iter_domain_sequences", "prepare_all", "prepare_corpus", "read_shard", "read_texts",
    "resolve_corpus", "resolve_tokenizer_json", "run", "shard_pipeline", "split_domains", "tokenize_shards",
    "train_tokenizer", "verify_corpus", "write_splits",
]

log = logging.getLogger(__name__)

DATA_FORMAT_VERSION = 2  # bump when the build steps change what they write (2: exact JsonlReader inputs)
PREPARED_FILE = "prepared.json"
DEFAULT_VAL_FRACTION = 0.05
DEFAULT_TEST_FRACTION = 0.05


# ---------------------------------------------------------------------------- the prepared cache
@dataclass(frozen=True)
class PreparedData:
    """A finished :func:`prepare_all` directory: JSONL splits, tokenizer and ``.ds`` shards."""

    root: Path
    splits_dir: Path
    tokenizer_dir: Path
    shards_dir: Path
    domains: tuple[str, ...] = DOMAINS

    @classmethod
    def load(cls, root: str | Path) -> PreparedData:
        root = Path(root)
        meta_path = root / PREPARED_FILE
        if not meta_path.is_file():
            raise UserError(f"{root} is not a prepared data directory (no {PREPARED_FILE})")
        meta = json.loads(meta_path.read_text())
        return cls(root, root / "splits", root / "tokenizer", root / "shards", tuple(meta["domains"]))

    def shard_files(self, split: str, domain: str) -> list[Path]:
        """The ``.ds`` files of one domain in one split (``"all"``: train, validation, test), in a fixed order."""
        if domain not in self.domains:
            raise UserError(f"unknown domain {domain!r} (known: {', '.join(self.domains)})")
        files = [f for s in _splits_of(split) for f in sorted((self.shards_dir / s / domain).glob("*.ds"))]
        if not files:
            raise UserError(f"no .ds shards for {split}/{domain} under {self.shards_dir}")
        return files

    def files_by_domain(self, split: str, domains: list[str] | tuple[str, ...] | None = None) -> dict[str, list[Path]]:
        return {d: self.shard_files(split, d) for d in (domains or self.domains)}

    @property
    def vocab_size(self) -> int:
        """Tokens of the prepared tokenizer (at most the requested ``vocab_size``)."""
        return tokenizer_vocab_size(self.tokenizer_dir)

    @property
    def tokenizer_sha256(self) -> str:
        return sha256_file(self.tokenizer_dir / "tokenizer.json")


def _splits_of(split: str) -> tuple[str, ...]:
    if split == "all":
        return SPLITS
    if split not in SPLITS:
        raise UserError(f"split must be one of {', '.join(SPLITS)} or all, got {split!r}")
    return (split,)


def _cache_key(corpus_sha: dict[str, str], options: dict) -> str:
    blob = json.dumps({"format": DATA_FORMAT_VERSION, "corpus": corpus_sha, **options}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def prepare_all(
    corpus: str | Path | None = None,
    cache_dir: str | Path | None = None,
    vocab_size: int = 8192,
    seed: int = 0,
    *,
    val_fraction: float = DEFAULT_VAL_FRACTION,
    test_fraction: float = DEFAULT_TEST_FRACTION,
    max_docs_per_domain: int | None = None,
    workers: int = 1,
    pinned: bool = True,
) -> PreparedData:
    """Corpus -> splits -> tokenizer -> shards, once per (corpus, options); later calls return the cache.

    ``cache_dir`` defaults to ``$DROP_UPCYCLING_CACHE/data`` (``~/.cache/drop_upcycling/data``). The
    result lives in ``cache_dir/prepared-<hash>``; it is built in a sibling temp dir and renamed,
    and if another process finished first its copy is kept and ours discarded. ``pinned=False``
    takes an explicit corpus folder of one's own (same four files, any text); the cache key then
    holds the files' own sha256, so changed text is a new cache entry.
    """
    corpus_dir = resolve_corpus(corpus, pinned=pinned)
    digests = corpus_digests(verify_corpus(corpus_dir, pinned=False), pinned=pinned)
    options = {"vocab_size": vocab_size, "seed": seed, "val_fraction": val_fraction,
               "test_fraction": test_fraction, "max_docs_per_domain": max_docs_per_domain}
    key = _cache_key(digests, options)
    cache = Path(cache_dir).expanduser() if cache_dir is not None else cache_root() / "data"
    root = cache / f"prepared-{key}"
    if cache.is_dir():
        remove_orphans(cache)
    if (root / PREPARED_FILE).is_file():
        return PreparedData.load(root)
    cache.mkdir(parents=True, exist_ok=True)
    tmp = temp_dir(root)
    try:
        log.info("preparing data in %s (corpus %s)", root, corpus_dir)
        steps = [
            ("splits", lambda: prepare_corpus(corpus_dir, tmp / "splits", seed=seed, val_fraction=val_fraction,
                                              test_fraction=test_fraction, max_docs_per_domain=max_docs_per_domain,
                                              pinned=False)),  # verified above
            ("tokenizer", lambda: train_tokenizer(tmp / "splits" / "train", tmp / "tokenizer", vocab_size=vocab_size)),
            ("shards", lambda: tokenize_shards(tmp / "splits", tmp / "tokenizer", tmp / "shards", workers=workers)),
        ]
        seconds = {}
        for name, step in tqdm(steps, desc="prepare data", unit="step", disable=None):
            start = time.perf_counter()
            step()
            seconds[name] = round(time.perf_counter() - start, 2)
        tokens = {s: {d: _tokens_in(tmp / "shards" / s / d) for d in DOMAINS} for s in SPLITS}
        write_json(tmp / PREPARED_FILE, {"key": key, "corpus_sha256": digests, "options": options,
                                         "domains": list(DOMAINS), "tokens": tokens, "seconds": seconds})
        log.info("prepared data: %s tokens per split and domain, step seconds %s", tokens, seconds)
        apply_umask(tmp)
        try:
            tmp.rename(root)
        except OSError:
            if not (root / PREPARED_FILE).is_file():
                raise
            shutil.rmtree(tmp, ignore_errors=True)  # a concurrent run finished first
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return PreparedData.load(root)


def _tokens_in(folder: Path) -> int:
    """Tokens (eos included) of a folder of shards, from the last entry of each index."""
    return shard_counts(folder)[0]


# ---------------------------------------------------------------------------- built shards and their checks
ID_SAMPLE_TOKENS = 1 << 20  # tokens read at each end of a shard to check that its ids fit the model


@dataclass(frozen=True)
class TokenShards:
    """A folder of shards built by ``drop-upcycling data tokenize``: ``{split}/{domain}/*.ds``, the
    tokenizer they were made with (``tokenizer/``) and ``manifest.json`` (see
    :func:`~drop_upcycling.data_pipeline.shards_manifest`), what a training YAML's ``data: {shards: DIR}``
    reads."""

    root: Path
    manifest: dict

    @classmethod
    def load(cls, root: str | Path) -> TokenShards:
        root = Path(root).expanduser()
        if not root.is_dir():
            raise UserError(f"shards {root} do not exist (build them with `drop-upcycling data tokenize`)")
        path = root / MANIFEST_FILE
        if not path.is_file():
            raise UserError(f"{root} has no {MANIFEST_FILE}: not finished shards of `drop-upcycling data tokenize` "
                            "(on Slurm, its last job writes it; rerun the command if a task failed)")
        manifest = load_json(path)
        tokenizer = manifest.get("tokenizer") if isinstance(manifest, dict) else None
        if (not isinstance(tokenizer, dict) or manifest.get("format") != MANIFEST_FORMAT
                or not isinstance(manifest.get("tokens"), dict)
                or not all(isinstance(tokenizer.get(k), t) for k, t in (("sha256", str), ("vocab_size", int)))):
            raise UserError(f"{path} is not a shards manifest of this version (rebuild with `drop-upcycling data "
                            "tokenize`)")
        return cls(root, manifest)

    @property
    def tokenizer_name(self) -> str:
        return str(self.manifest["tokenizer"].get("name"))

    @property
    def tokenizer_sha256(self) -> str:
        return self.manifest["tokenizer"]["sha256"]

    @property
    def vocab_size(self) -> int:
        return self.manifest["tokenizer"]["vocab_size"]

    @property
    def tokenizer_dir(self) -> Path | None:
        """The tokenizer's files beside the shards (None for shards that do not carry them)."""
        folder = self.root / SHARDS_TOKENIZER
        return folder if (folder / "tokenizer.json").is_file() else None

    def domains(self, split: str) -> list[str]:
        return list(self.manifest["tokens"].get(split, {}))

    def files_by_domain(self, split: str, domains: list[str] | None = None) -> dict[str, list[Path]]:
        """The ``.ds`` files of each domain in ``split`` (default: every domain the manifest lists)."""
        known = self.domains(split)
        if not known:
            raise UserError(f"shards {self.root} have no {split} split (splits: "
                            f"{', '.join(self.manifest['tokens']) or 'none'})")
        unknown = sorted(set(domains or ()) - set(known))
        if unknown:
            raise UserError(f"shards {self.root} have no domain {', '.join(unknown)} in {split} "
                            f"(domains: {', '.join(known)})")
        out = {}
        for d in domains or known:
            files = sorted((self.root / split / d).glob("*.ds"))
            if not files:
                raise UserError(f"no .ds shards for {split}/{d} under {self.root}")
            out[d] = files
        return out

    def check_fits(self, model_vocab: int, init: str | Path | None, files: dict[str, list[Path]]) -> None:
        """Refuse, in one line, shards the model cannot train on: made with another tokenizer than the
        init checkpoint's (when it has one), or with ids beyond the model's vocabulary: the manifest's
        vocabulary size, and the ids actually stored at both ends of every shard to be read (a cheap
        check that the files are the manifest's)."""
        check_init_tokenizer(self.tokenizer_sha256, f"shards {self.root} (tokenizer {self.tokenizer_name})", init)
        if self.vocab_size > model_vocab:
            raise UserError(f"shards {self.root} were tokenized with {self.tokenizer_name}, {self.vocab_size} ids: "
                            f"more than the model's vocabulary of {model_vocab}")
        for path in (f for fs in files.values() for f in fs):
            top = max_token_id(path)
            if top >= min(model_vocab, self.vocab_size):
                raise UserError(f"shard {path} holds token id {top}, outside the vocabulary of "
                                f"{min(model_vocab, self.vocab_size)} (its manifest says {self.tokenizer_name} with "
                                f"{self.vocab_size} ids, the model has {model_vocab}): rebuild the shards")


def max_token_id(path: Path, sample: int = ID_SAMPLE_TOKENS) -> int:
    """The largest id among the first and last ``sample`` tokens of a shard (-1 when empty): reading a
    whole corpus would take as long as the tokenization did, and a shard written by another
    tokenizer shows at either end."""
    tokens = read_shard(path)
    if not len(tokens):
        return -1
    return int(max(tokens[:sample].max(), tokens[-sample:].max()))


def check_init_tokenizer(sha256: str, what: str, init: str | Path | None) -> None:
    """Refuse data tokenized with another tokenizer than the init checkpoint's, when it has one: a
    seed's ids mean its own tokens (llm-jp seeds: the llm-jp tokenizer), so other ids would train
    nonsense, silently, as long as they fit the vocabulary."""
    if init is None or not (Path(init) / "tokenizer.json").is_file():
        return
    theirs = sha256_file(Path(init) / "tokenizer.json")
    if theirs != sha256:
        raise UserError(f"{what} is not the tokenizer of init checkpoint {init} (tokenizer.json sha256 "
                        f"{sha256[:12]}... vs {theirs[:12]}...): build shards with `drop-upcycling data tokenize "
                        f"--tokenizer {init}` and train on them (data: {{shards: DIR}})")


def epochs_note(reader: TokenSequenceReader, sequences: int) -> str | None:
    """One line saying how often a run of ``sequences`` sequences (all ranks) repeats each domain, or
    None when no domain is read more than once: the budget of a recipe may exceed the data given."""
    epochs = {d: sequences * reader.weights[d] / reader.sequences(d) for d in reader.domains}
    if max(epochs.values()) <= 1:
        return None
    tokens = sequences * reader.seq_len
    listed = ", ".join(f"{d} {e:.2f}" for d, e in epochs.items())
    return (f"the run reads {tokens:,} tokens ({sequences:,} sequences of {reader.seq_len}), more than the data "
            f"holds: it repeats it, epochs per domain: {listed}")


# ---------------------------------------------------------------------------- one shard
def read_shard(path: str | Path) -> np.ndarray:
    """Memory-map one datatrove ``.ds`` file after checking it against its ``.index`` (and ``.metadata``).

    The index's last entry is the file's token count, so a truncated ``.ds``, a truncated index or a
    pair from different runs is detected here instead of becoming silently wrong training data.
    """
    path = Path(path)
    index = path.with_name(path.name + ".index")
    if not path.is_file():
        raise UserError(f"shard {path} does not exist")
    if not index.is_file():
        raise UserError(f"shard {path} has no {index.name}")
    index_bytes, data_bytes = index.stat().st_size, path.stat().st_size
    if index_bytes % 8:
        raise UserError(f"{index} is truncated ({index_bytes} bytes, not a multiple of 8)")
    if index_bytes == 0:
        if data_bytes:
            raise UserError(f"{index} is empty but {path} holds {data_bytes} bytes")
        return np.zeros(0, dtype=np.uint16)
    ends = np.fromfile(index, dtype="<u8")
    if np.any(np.diff(ends.astype(np.int64)) < 0):
        raise UserError(f"{index} is corrupt (document ends are not increasing)")
    n_tokens = int(ends[-1])
    token_bytes = _token_bytes(path, n_tokens, data_bytes)
    if n_tokens * token_bytes != data_bytes:
        raise UserError(f"{path} is truncated or does not match its index: {data_bytes} bytes, "
                        f"index says {n_tokens} tokens x {token_bytes} bytes")
    if n_tokens == 0:
        return np.zeros(0, dtype=np.uint16)
    return np.memmap(path, dtype="<u2" if token_bytes == 2 else "<u4", mode="r")


def _token_bytes(path: Path, n_tokens: int, data_bytes: int) -> int:
    meta = path.with_name(path.name + ".metadata")
    if meta.is_file():
        first = meta.read_text().split("\n", 1)[0]
        size = first.rsplit("|", 1)[-1]
        if size not in ("2", "4"):
            raise UserError(f"{meta} gives token size {size!r}, expected 2 or 4")
        return int(size)
    if n_tokens and data_bytes == 4 * n_tokens:
        return 4
    return 2


# ---------------------------------------------------------------------------- the training reader
def _domain_salt(domain: str) -> int:
    """A per-domain RNG key that does not depend on which other domains are mixed in."""
    return int.from_bytes(hashlib.sha256(domain.encode()).digest()[:4], "little")


class _DomainSequences:
    """All fixed-length sequences of one domain: sequence ``g`` -> tokens, across its files."""

    def __init__(self, domain: str, files: list[Path], seq_len: int) -> None:
        if not files:
            raise UserError(f"domain {domain} has no shard files")
        self.arrays = [read_shard(f) for f in files]
        counts = np.array([len(a) // seq_len for a in self.arrays], dtype=np.int64)
        self.ends = np.cumsum(counts)
        self.size = int(self.ends[-1])
        self.seq_len = seq_len

    def get(self, g: int, out: np.ndarray) -> None:
        f = int(np.searchsorted(self.ends, g, side="right"))
        local = g - (int(self.ends[f - 1]) if f else 0)
        out[:] = self.arrays[f][local * self.seq_len:(local + 1) * self.seq_len]


class TokenSequenceReader:
    """Endless, deterministic, rank-sharded, resumable stream of ``seq_len``-token sequences.

    Each domain's shards are cut into non-overlapping ``seq_len`` windows (a file's last partial
    window is dropped). Per domain and epoch, the windows are permuted by
    ``(seed, domain, epoch)`` and rank ``r`` of ``world_size`` takes permutation positions
    ``r, r + W, r + 2W, ...``: within an epoch every sequence goes to exactly one rank. Domains
    are interleaved by a deterministic weighted round-robin (each next sample goes to the domain
    furthest below its share), so the mix matches ``weights`` at every step, on every rank, with
    no random state. The whole position is the number of sequences taken from each domain, which is
    what :meth:`state_dict` saves; resuming from it continues with the very next sequence.
    ``weights`` default to the domains' sizes (the natural mix); a weight of 0 drops a domain.
    """

    def __init__(self, files_by_domain: dict[str, list[Path]], seq_len: int, *,
                 weights: dict[str, float] | None = None, seed: int = 0, rank: int = 0, world_size: int = 1) -> None:
        if seq_len < 1:
            raise UserError(f"seq_len must be >= 1, got {seq_len}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise UserError(f"rank must be in [0, world_size), got rank {rank} of {world_size}")
        if not files_by_domain:
            raise UserError("no domains to read")
        self.seq_len, self.seed, self.rank, self.world_size = seq_len, seed, rank, world_size
        self._data = {d: _DomainSequences(d, [Path(p) for p in files], seq_len) for d, files in files_by_domain.items()}
        self.weights = self._normalize_weights(weights)
        self.domains = [d for d in self._data if self.weights[d] > 0]
        for d in self.domains:
            if self._data[d].size < world_size:
                raise UserError(f"domain {d} has {self._data[d].size} sequences of {seq_len} tokens, fewer than "
                                f"the {world_size} ranks (use shorter sequences, fewer ranks, or weight 0)")
        self._consumed = dict.fromkeys(self.domains, 0)
        self._perms: dict[str, tuple[int, np.ndarray]] = {}

    def _normalize_weights(self, weights: dict[str, float] | None) -> dict[str, float]:
        if weights is None:
            raw = {d: float(s.size) for d, s in self._data.items()}
        else:
            unknown = sorted(set(weights) - set(self._data))
            if unknown:
                raise UserError(f"weights name domain(s) without data: {', '.join(unknown)}")
            raw = {d: float(weights.get(d, 0.0)) for d in self._data}
            if any(w < 0 or not np.isfinite(w) for w in raw.values()):
                raise UserError(f"domain weights must be finite and >= 0, got {weights}")
        total = sum(raw.values())
        if total <= 0:
            raise UserError("domain weights sum to zero (or every domain is shorter than one sequence)")
        for d, w in raw.items():
            if w > 0 and self._data[d].size == 0:
                raise UserError(f"domain {d} has weight {w} but no sequence of {self.seq_len} tokens")
        return {d: w / total for d, w in raw.items()}

    # -- sizes and positions
    def sequences(self, domain: str) -> int:
        """Sequences of ``domain`` in one epoch, over all ranks."""
        return self._data[domain].size

    def _rank_share(self, domain: str) -> int:
        n, w, r = self._data[domain].size, self.world_size, self.rank
        return (n - r + w - 1) // w

    def epoch(self, domain: str) -> int:
        return self._consumed[domain] // self._rank_share(domain)

    def _permutation(self, domain: str, epoch: int) -> np.ndarray:
        cached = self._perms.get(domain)
        if cached is None or cached[0] != epoch:
            rng = np.random.default_rng([self.seed, _domain_salt(domain), epoch])
            cached = (epoch, rng.permutation(self._data[domain].size))
            self._perms[domain] = cached
        return cached[1]

    def _next_domain(self) -> str:
        k = sum(self._consumed.values()) + 1
        return max(self.domains, key=lambda d: (self.weights[d] * k - self._consumed[d], -self.domains.index(d)))

    def _take(self, out: np.ndarray) -> str:
        domain = self._next_domain()
        c = self._consumed[domain]
        epoch, j = divmod(c, self._rank_share(domain))
        g = int(self._permutation(domain, epoch)[self.rank + j * self.world_size])
        self._data[domain].get(g, out)
        self._consumed[domain] = c + 1
        return domain

    def next_sequence_id(self) -> tuple[str, int]:
        """(domain, sequence index) the next call will return, without consuming it (for tests/logs)."""
        domain = self._next_domain()
        epoch, j = divmod(self._consumed[domain], self._rank_share(domain))
        return domain, int(self._permutation(domain, epoch)[self.rank + j * self.world_size])

    # -- reading
    def next_batch(self, batch_size: int) -> torch.Tensor:
        """``LongTensor[batch_size, seq_len]`` of the next sequences of this rank."""
        buf = np.empty((batch_size, self.seq_len), dtype=np.int64)
        for i in range(batch_size):
            self._take(buf[i])
        return torch.from_numpy(buf)

    def __iter__(self) -> Iterator[torch.Tensor]:
        while True:
            buf = np.empty(self.seq_len, dtype=np.int64)
            self._take(buf)
            yield torch.from_numpy(buf)

    # -- checkpointing
    def state_dict(self) -> dict:
        """JSON-serializable position; everything else is recomputed from the files and the seed."""
        return {"version": 1, "seq_len": self.seq_len, "seed": self.seed, "rank": self.rank,
                "world_size": self.world_size, "sizes": {d: self._data[d].size for d in self.domains},
                "weights": {d: self.weights[d] for d in self.domains}, "consumed": dict(self._consumed)}

    def load_state_dict(self, state: dict) -> None:
        """Resume at ``state``'s position; the data, seed, ranks and mix must be the ones it was saved with."""
        mine = self.state_dict()
        for field in ("seq_len", "seed", "rank", "world_size", "sizes"):
            if state.get(field) != mine[field]:
                raise UserError(f"reader state does not match this data: {field} was {state.get(field)}, "
                                f"now {mine[field]}")
        if set(state.get("weights", {})) != set(self.domains) or any(
                abs(state["weights"][d] - self.weights[d]) > 1e-12 for d in self.domains):
            raise UserError(f"reader state was saved with domain weights {state.get('weights')}, now {self.weights}")
        consumed = state.get("consumed")
        if not isinstance(consumed, dict) or set(consumed) != set(self.domains):
            raise UserError(f"reader state has no position for domains {self.domains}")
        self._consumed = {d: int(consumed[d]) for d in self.domains}


# ---------------------------------------------------------------------------- evaluation iterators
def iter_domain_sequences(prepared: PreparedData, split: str, domain: str, seq_len: int,
                          max_tokens: int | None = None) -> Iterator[torch.Tensor]:
    """Consecutive ``seq_len``-token windows of one domain's shards, in file order (no shuffle).

    For evaluation and routing analysis, where every run must see the same tokens. Files are one
    stream (a window may span two files, documents stay separated by their eos); the last partial
    window is dropped; ``max_tokens`` stops before a window that would exceed it. ``split="all"``
    reads train, validation and test (e.g. to reach the paper's ~205k routing tokens per domain).
    """
    if seq_len < 1:
        raise UserError(f"seq_len must be >= 1, got {seq_len}")
    return iter_windows(prepared.shard_files(split, domain), seq_len,
                        None if max_tokens is None else max_tokens // seq_len)


def iter_windows(files: list[Path], seq_len: int, limit: int | None = None) -> Iterator[torch.Tensor]:
    """Consecutive ``seq_len``-token windows of token ``files`` read as one stream (at most ``limit``)."""
    buf = np.empty(seq_len, dtype=np.int64)
    fill = n = 0
    for path in files:
        tokens, pos = read_shard(path), 0
        while pos < len(tokens):
            if limit is not None and n >= limit:
                return
            take = min(seq_len - fill, len(tokens) - pos)
            buf[fill:fill + take] = tokens[pos:pos + take]
            fill, pos = fill + take, pos + take
            if fill == seq_len:
                yield torch.from_numpy(buf.copy())
                fill, n = 0, n + 1


def iter_documents(prepared: PreparedData, split: str, domain: str) -> Iterator[str]:
    """The raw text of each document of one domain in one split (or ``"all"``), in file order."""
    files = [f for s in _splits_of(split) for f in jsonl_files(Path(prepared.splits_dir) / s, domain)]
    if not files:
        raise UserError(f"no documents for {split}/{domain} under {prepared.splits_dir}")
    for path in files:
        with open(path, encoding="utf-8") as f:
            for line in f:
                yield json.loads(line)["text"]


# ---------------------------------------------------------------------------- CLI
def configure_parser(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="step", required=True, metavar="STEP")
    p = sub.add_parser("corpus", help="verify (or download) the corpus and write JSONL train/validation/test splits")
    p.add_argument("--corpus", type=Path, metavar="DIR", help="corpus folder (default: $DROP_UPCYCLING_CORPUS, "
                   "the user cache, else download)")
    p.add_argument("--input", action="append", metavar="DOMAIN=PATH", default=[],
                   help="another corpus instead: a .jsonl[.gz]/.parquet file, folder or quoted glob, or hf:NAME "
                        "(a Hugging Face dataset), per domain (repeat)")
    p.add_argument("--out", type=Path, required=True, metavar="DIR")
    _input_options(p, fractions_default=(DEFAULT_VAL_FRACTION, DEFAULT_TEST_FRACTION))
    p.add_argument("--max-docs-per-domain", type=int, help="keep the first N documents per domain (quick runs)")
    p.add_argument("--unpinned", action="store_true", help="--corpus is a folder of your own (same four files, "
                   "any text): skip the check against the authors' sha256")
    p.add_argument("--overwrite", action="store_true")
    p = sub.add_parser("tokenizer", help="train a byte-level BPE on the train split")
    p.add_argument("--train", type=Path, required=True, metavar="DIR", help="the train split folder (<domain>.jsonl)")
    p.add_argument("--out", type=Path, required=True, metavar="DIR")
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--overwrite", action="store_true")
    p = sub.add_parser("tokenize", help="datatrove: JSONL splits or corpus files -> .ds token shards per split and "
                       "domain, and manifest.json beside them (what a training YAML's data: {shards: DIR} reads)")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--splits", type=Path, metavar="DIR", help="folder with train/ validation/ test/ "
                        "(`data corpus`)")
    source.add_argument("--input", action="append", metavar="DOMAIN=PATH",
                        help="corpus files straight into shards instead, read in the datatrove tasks: a "
                             ".jsonl[.gz]/.parquet file, folder or quoted glob, or hf:NAME (a Hugging Face dataset), "
                             "per domain (repeat); not deduplicated")
    p.add_argument("--tokenizer", required=True, metavar="DIR|ID",
                   help="folder with tokenizer.json, a tokenizer.json, or a hub id (e.g. llm-jp/llm-jp-3-1.8b)")
    p.add_argument("--eos-token", default=None, help="appended after every document (default: the tokenizer's own "
                   f"eos, from its tokenizer_config.json, else {EOS_TOKEN})")
    p.add_argument("--out", type=Path, required=True, metavar="DIR")
    p.add_argument("--tasks", type=int, default=1, help="datatrove tasks per (split, domain) (split by input file)")
    p.add_argument("--workers", type=int, default=None,
                   help="tasks run at once (local: processes, default 1; slurm: array tasks, default no limit)")
    direct = p.add_argument_group("--input only")
    _input_options(direct, fractions_default=None)
    p.add_argument("--executor", choices=EXECUTORS, default="local",
                   help="local: run the tasks here; slurm: submit them as a job array, and the manifest as a job "
                        "after it, and return")
    slurm = p.add_argument_group("--executor slurm only")
    slurm.add_argument("--partition", help="sbatch --partition (required)")
    slurm.add_argument("--time", help="sbatch --time per task, e.g. 24:00:00 (required)")
    slurm.add_argument("--cpus-per-task", type=int, default=None, help="default 1")
    slurm.add_argument("--mem-per-cpu-gb", type=int, default=None, help="default 2")
    slurm.add_argument("--slurm-arg", action="append", default=[], metavar="KEY=VALUE",
                       help="another sbatch option, e.g. account=abc or qos=normal (repeat)")
    slurm.add_argument("--env-command", help="shell line that prepares a job's environment (default: activate "
                       "this Python environment)")
    p = sub.add_parser("prepare", help="all three steps into the cache (what training and evaluation use)")
    p.add_argument("--corpus", type=Path, metavar="DIR")
    p.add_argument("--unpinned", action="store_true", help="--corpus is a folder of your own (see corpus --unpinned)")
    p.add_argument("--cache-dir", type=Path, metavar="DIR", help="default $DROP_UPCYCLING_CACHE/data")
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=1)


def _input_options(group: argparse._ActionsContainer, fractions_default: tuple[float, float] | None) -> None:
    """Options of ``--input`` records and of the document-hash split, shared by ``corpus`` and ``tokenize``
    (there, ``None`` defaults: given only with ``--input``, and all documents train)."""
    group.add_argument("--text-key", default=None, help="text field of --input records (default text)")
    group.add_argument("--hf-split", default=None, help="split of an hf:NAME input (default train)")
    group.add_argument("--strict", action="store_true",
                       help="refuse an --input record that is not JSON with a string text field (default: drop it, "
                            "count the drops and warn)")
    group.add_argument("--seed", type=int, default=None if fractions_default is None else 0,
                       help="salt of the document-hash split (default 0)")
    val, test = fractions_default or (None, None)
    group.add_argument("--val-fraction", type=float, default=val,
                       help=f"documents held out for validation (default {val or 0})")
    group.add_argument("--test-fraction", type=float, default=test,
                       help=f"documents held out for test (default {test or 0})")


def input_specs(specs: list[str]) -> dict[str, str]:
    """``DOMAIN=PATH`` arguments by domain, each input checked now, before anything is written."""
    inputs: dict[str, str] = {}
    for spec in specs:
        domain, sep, path = spec.partition("=")
        if not sep or not domain or not path:
            raise UserError(f"--input must be DOMAIN=PATH, got {spec!r}")
        if domain in inputs:
            raise UserError(f"--input names domain {domain} twice")
        if not path.startswith(HF_PREFIX):
            input_files(path)
        inputs[domain] = path
    return inputs


def _parse_inputs(specs: list[str], text_key: str, limit: int | None, strict: bool = False,
                  hf_split: str = "train") -> dict[str, Iterator[str]]:
    return {domain: _first(read_texts(path, text_key, strict=strict, hf_split=hf_split), limit)
            for domain, path in input_specs(specs).items()}


def _first(texts: Iterator[str], limit: int | None) -> Iterator[str]:
    """The first ``limit`` texts; ``texts`` is closed right after, so that its count of dropped records
    is logged when the domain is done, not when the generator is garbage-collected."""
    with contextlib.closing(texts):  # type: ignore[type-var]
        yield from itertools.islice(texts, limit)


def _slurm_options(args: argparse.Namespace) -> SlurmOptions | None:
    """The Slurm options of ``tokenize``: all of them with ``--executor slurm``, none without."""
    given = [f"--{k.replace('_', '-')}" for k in ("partition", "time", "cpus_per_task", "mem_per_cpu_gb",
                                                   "env_command", "slurm_arg") if getattr(args, k)]
    if args.executor != "slurm":
        if given:
            raise UserError(f"{', '.join(given)} apply to --executor slurm")
        return None
    missing = [f"--{k}" for k in ("partition", "time") if not getattr(args, k)]
    if missing:
        raise UserError(f"--executor slurm needs {' and '.join(missing)}")
    sbatch = {}
    for item in args.slurm_arg:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UserError(f"--slurm-arg must be KEY=VALUE, got {item!r}")
        sbatch[key.lstrip("-")] = value
    for flag, value in (("--cpus-per-task", args.cpus_per_task), ("--mem-per-cpu-gb", args.mem_per_cpu_gb)):
        if value is not None and value < 1:
            raise UserError(f"{flag} must be >= 1, got {value}")
    return SlurmOptions(partition=args.partition, time=args.time, cpus_per_task=args.cpus_per_task or 1,
                        mem_per_cpu_gb=args.mem_per_cpu_gb or 2, env_command=args.env_command, sbatch_args=sbatch)


def _direct_inputs(args: argparse.Namespace) -> DirectInputs | None:
    """``tokenize --input``'s inputs and split options; those options without ``--input`` are refused."""
    options = {"text_key": "--text-key", "hf_split": "--hf-split", "seed": "--seed", "val_fraction": "--val-fraction",
               "test_fraction": "--test-fraction", "strict": "--strict"}
    given = {k: getattr(args, k) for k in options if getattr(args, k) not in (None, False)}
    if not args.input:
        if given:
            raise UserError(f"{', '.join(options[k] for k in given)} apply to --input")
        return None
    return DirectInputs(input_specs(args.input), **given)


def run(args: argparse.Namespace) -> int:
    if args.step == "corpus" and args.strict and not args.input:
        raise UserError("--strict applies to --input records")
    if args.step == "corpus" and args.input:
        inputs = _parse_inputs(args.input, args.text_key or "text", args.max_docs_per_domain, args.strict,
                               args.hf_split or "train")
        out = write_splits(inputs, args.out, seed=args.seed, val_fraction=args.val_fraction,
                           test_fraction=args.test_fraction, overwrite=args.overwrite)
        print(json.dumps(json.loads((out / "splits.json").read_text())["documents"]))
    elif args.step == "corpus":
        corpus = resolve_corpus(args.corpus, pinned=not args.unpinned)
        out = prepare_corpus(corpus, args.out, seed=args.seed, val_fraction=args.val_fraction,
                             test_fraction=args.test_fraction, max_docs_per_domain=args.max_docs_per_domain,
                             overwrite=args.overwrite, pinned=not args.unpinned)
        print(json.dumps(json.loads((out / "splits.json").read_text())["documents"]))
    elif args.step == "tokenizer":
        out = train_tokenizer(args.train, args.out, vocab_size=args.vocab_size, overwrite=args.overwrite)
        print(f"{out}: {check_vocab(out, 2**32)} tokens")
    elif args.step == "tokenize":
        slurm, inputs = _slurm_options(args), _direct_inputs(args)
        out = tokenize_shards(args.splits, args.tokenizer, args.out, tasks=args.tasks, workers=args.workers,
                              eos_token=args.eos_token, inputs=inputs, executor=args.executor, slurm=slurm)
        if slurm is not None:
            print(f"submitted to Slurm (partition {slurm.partition}): the tasks, then the job that writes "
                  f"{out / MANIFEST_FILE}; logs in {out / 'logs'}. Rerun this command to resubmit tasks that fail.")
        else:
            print(out)
    else:
        prepared = prepare_all(args.corpus, args.cache_dir, vocab_size=args.vocab_size, seed=args.seed,
                               workers=args.workers, pinned=not args.unpinned)
        print(prepared.root)
    return 0
