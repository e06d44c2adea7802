"""``drop-upcycling routing CKPT``: count top-k expert choices per domain by running a MoE checkpoint.

This is the half of the routing analysis that needs torch and the model: feed each domain's text
through the checkpoint in fixed-length chunks and count, per layer and expert, how many top-k
slots chose the expert (``assignments``) and how many different vocabulary ids it saw
(``distinct_tokens``). The text, by default, is what the authors' released analysis read: each
domain's routing text (the corpus files) tokenized whole as one stream and cut into 101 full chunks of
2048 tokens; ``--text test`` reads a held-out test split instead (documents with an end-of-text between
them), which is what a model trained on those very texts should be measured on. The result is a counts CSV (:mod:`.routing_csv`) that the other half,
:mod:`.routing` (metrics and Figure 5, ``drop-upcycling analyze routing``), reads without torch.

Shape legend: B batch, S sequence, T tokens (B*S), K top-k, L layers, E experts, V vocabulary.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

import pandas as pd
import torch

from .errors import UserError
from .fsio import sha256_file
from .routing_csv import COUNT_COLUMNS, COUNTS_FILE, write_counts

log = logging.getLogger(__name__)

DEFAULT_CHUNK = 2048  # tokens per forward pass, as in the paper's analysis (FACTS.md §6)
# The paper's "about 205k tokens" per domain: the released counts hold 413,696 top-2 assignments per
# (model, domain, layer), i.e. 206,848 tokens = 101 chunks of 2048.
DEFAULT_TOKENS_PER_DOMAIN = 101 * DEFAULT_CHUNK
# Documents -> token chunks, with the tokenizer, chunk length and budget already bound (see token_chunks).
Tokenize = Callable[[Iterable[str]], Iterator[torch.Tensor]]


# ============================================================================ counting
class RoutingCounter:
    """Accumulates top-k assignment counts and the distinct token ids each expert saw, per layer.

    Distinct tokens are kept as a boolean [L, E, V] table rather than sets of ids: marking is one
    vectorized ``index_put_`` per (layer, k) however many tokens a chunk holds, and the table's size
    is fixed (L*E*V bytes: 19 MB for 24 layers, 8 experts and a 99k vocabulary).
    """

    def __init__(self, num_layers: int, num_experts: int, vocab_size: int) -> None:
        self.num_layers, self.num_experts, self.vocab_size = num_layers, num_experts, vocab_size
        self.assignments_LE = torch.zeros(num_layers, num_experts, dtype=torch.int64)
        self.seen_LEV = torch.zeros(num_layers, num_experts, vocab_size, dtype=torch.bool)
        self.tokens = 0

    def update(self, input_ids: torch.Tensor, expert_ids_per_layer: Sequence[torch.Tensor]) -> None:
        """``input_ids`` [B, S] (or [T]); ``expert_ids_per_layer``: L tensors [T, K], T = B*S in the same order.

        The model flattens [B, S] row-major before routing, so the t-th routed token is the t-th
        entry of ``input_ids.reshape(-1)``: that pairing is what makes ``distinct_tokens`` right.
        """
        if len(expert_ids_per_layer) != self.num_layers:
            raise ValueError(f"expected {self.num_layers} layers of expert ids, got {len(expert_ids_per_layer)}")
        tok_T = input_ids.reshape(-1).cpu()
        self.tokens += tok_T.numel()
        for layer, ids_TK in enumerate(expert_ids_per_layer):
            ids_TK = ids_TK.cpu()
            if ids_TK.shape[0] != tok_T.numel():
                raise ValueError(f"layer {layer}: {ids_TK.shape[0]} routed tokens for {tok_T.numel()} inputs")
            self.assignments_LE[layer] += torch.bincount(ids_TK.reshape(-1), minlength=self.num_experts)
            for k in range(ids_TK.shape[1]):
                self.seen_LEV[layer].index_put_((ids_TK[:, k], tok_T), torch.tensor(True))

    def rows(self, model: str, domain: str) -> list[dict]:
        """One row per (layer, expert) with the columns of :data:`~.routing_csv.COUNT_COLUMNS`."""
        distinct_LE = self.seen_LEV.sum(dim=-1)
        return [
            {"model": model, "domain": domain, "layer": layer, "expert": e,
             "assignments": int(self.assignments_LE[layer, e]), "distinct_tokens": int(distinct_LE[layer, e])}
            for layer in range(self.num_layers) for e in range(self.num_experts)
        ]


def count_routing(model: torch.nn.Module, chunks: Iterable[torch.Tensor], model_name: str, domain: str,
                  batch_size: int = 1, progress: bool = False) -> pd.DataFrame:
    """Count one domain: ``chunks`` yields 1-D token-id tensors (one forward pass each, batched when
    consecutive chunks have the same length). Returns rows with :data:`~.routing_csv.COUNT_COLUMNS`."""
    cfg = model.config
    if not cfg.is_moe:
        raise UserError(f"{model_name} is a dense model: routing counts need a MoE checkpoint")
    counter = RoutingCounter(cfg.num_hidden_layers, cfg.num_experts, cfg.vocab_size)
    device = next(model.parameters()).device
    bar = _progress(progress, desc=f"{model_name} {domain}", unit="tok")
    with torch.inference_mode():
        for batch in _batches(chunks, batch_size):
            ids_BS = torch.stack(batch).to(device)
            if int(ids_BS.max()) >= cfg.vocab_size or int(ids_BS.min()) < 0:
                raise UserError(f"token id out of range for vocab size {cfg.vocab_size}: wrong tokenizer?")
            out = model(ids_BS, return_expert_ids=True)
            counter.update(ids_BS, out.expert_ids)
            bar.update(ids_BS.numel())
    bar.close()
    if counter.tokens == 0:
        raise UserError(f"domain {domain} gave no tokens")
    return pd.DataFrame(counter.rows(model_name, domain), columns=COUNT_COLUMNS)


def _batches(chunks: Iterable[torch.Tensor], batch_size: int) -> Iterator[list[torch.Tensor]]:
    """Groups of up to ``batch_size`` chunks of equal length.

    A group ends early when the length changes (a domain's last, shorter chunk), because only
    equal lengths stack into one [B, S] batch; padding would route pad tokens and count them.
    """
    batch: list[torch.Tensor] = []
    for chunk in chunks:
        if batch and (len(batch) == batch_size or chunk.shape[0] != batch[0].shape[0]):
            yield batch
            batch = []
        batch.append(chunk.reshape(-1).long())
    if batch:
        yield batch


def _progress(enabled: bool, **kwargs):
    from tqdm.auto import tqdm

    return tqdm(disable=not enabled, **kwargs)


def chunk_length(cfg, requested: int = DEFAULT_CHUNK) -> int:
    """Tokens per forward pass: the paper's 2048, or the model's context if that is shorter.

    A non-positive request is refused: clamping it to 1 would route one token at a time, without
    context, and count something else than the paper.
    """
    if requested < 1:
        raise UserError(f"--chunk-len must be >= 1, got {requested}")
    return min(requested, cfg.max_position_embeddings)


def count_checkpoint(model: torch.nn.Module, domain_chunks: dict[str, Iterable[torch.Tensor]], model_name: str,
                     batch_size: int = 1, progress: bool = True) -> pd.DataFrame:
    """Count every domain of ``domain_chunks`` (domain -> iterable of 1-D token-id tensors) on one model."""
    frames = []
    for domain, chunks in domain_chunks.items():
        df = count_routing(model, chunks, model_name, domain, batch_size=batch_size, progress=progress)
        log.info("%s: %d assignments per layer", domain, int(df[df["layer"] == 0]["assignments"].sum()))
        frames.append(df)
    if not frames:
        raise UserError("no domains to count")
    return pd.concat(frames, ignore_index=True)


# ============================================================================ text -> token chunks
def read_jsonl_texts(files: Sequence[Path]) -> Iterator[str]:
    """The ``text`` field of every record, file by file (``.jsonl`` or ``.jsonl.gz``), streamed."""
    import gzip
    import json

    for path in files:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rt", encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    text = json.loads(line)["text"]
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise UserError(f"{path}:{n} is not a JSON record with a 'text' field") from None
                yield text


def token_chunks(texts: Iterable[str], tokenizer, chunk_len: int, max_tokens: int | None,
                 eos_id: int | None = None, encode_batch: int = 64) -> Iterator[torch.Tensor]:
    """Documents -> token ids (``eos_id`` after each, as in training) -> consecutive ``chunk_len``
    chunks, stopping after ``max_tokens`` tokens (the last chunk may be shorter). Streams: only one
    batch of documents and one chunk are held at a time.

    Documents run on across chunk boundaries, as in the prepared shards that training reads, so the
    router sees the kind of context it was trained on and no chunk needs padding.
    """
    if chunk_len < 1:
        raise UserError(f"chunk length must be >= 1, got {chunk_len}")
    buffer: list[int] = []
    emitted = 0
    for ids in _encoded(texts, tokenizer, encode_batch):
        buffer.extend(ids)
        if eos_id is not None:
            buffer.append(eos_id)
        while len(buffer) >= chunk_len:
            take = chunk_len if max_tokens is None else min(chunk_len, max_tokens - emitted)
            yield torch.tensor(buffer[:take], dtype=torch.long)
            emitted += take
            del buffer[:take]
            if max_tokens is not None and emitted >= max_tokens:
                return
    if buffer and (max_tokens is None or emitted < max_tokens):
        take = len(buffer) if max_tokens is None else min(len(buffer), max_tokens - emitted)
        yield torch.tensor(buffer[:take], dtype=torch.long)


def _encoded(texts: Iterable[str], tokenizer, encode_batch: int) -> Iterator[list[int]]:
    """Token ids of each text, in order, encoded ``encode_batch`` texts at a time: the tokenizer's batch
    call can use several threads, and the batch bounds how much text is held at once."""
    batch: list[str] = []
    for text in texts:
        batch.append(text)
        if len(batch) == encode_batch:
            yield from (e.ids for e in tokenizer.encode_batch(batch))
            batch = []
    if batch:
        yield from (e.ids for e in tokenizer.encode_batch(batch))


def _load_tokenizer(tokenizer_dir: Path, model_vocab: int):
    from tokenizers import Tokenizer

    from .data_pipeline import EOS_TOKEN, check_vocab

    check_vocab(tokenizer_dir, model_vocab)
    tokenizer = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    return tokenizer, tokenizer.token_to_id(EOS_TOKEN)


TEXTS = ("routing-texts", "test")


def text_choice(args: argparse.Namespace) -> str:
    """``--text``, defaulting to the routing texts, or to the test split when --data / --splits name one."""
    chosen = args.text or ("test" if args.data is not None or args.splits is not None else "routing-texts")
    if chosen == "routing-texts" and (args.data is not None or args.splits is not None):
        raise UserError("--data and --splits select a test split: drop them or pass --text test")
    return chosen


def routing_text_chunks(text: str, tokenizer, chunk_len: int, max_tokens: int) -> Iterator[torch.Tensor]:
    """One domain's file as the released analysis read it: the whole text encoded at once (special tokens
    as the tokenizer adds them), then consecutive full ``chunk_len`` chunks until ``max_tokens``; a
    partial last chunk is dropped, as there."""
    ids = tokenizer.encode(text).ids
    usable = min(len(ids), max_tokens) // chunk_len * chunk_len
    for start in range(0, usable, chunk_len):
        yield torch.tensor(ids[start:start + chunk_len], dtype=torch.long)


def _routing_text_sources(args: argparse.Namespace, ckpt: Path, vocab_size: int, chunk_len: int) -> tuple[dict, dict]:
    """The authors' way: the corpus's domain files (``--corpus``, ``$DROP_UPCYCLING_CORPUS``, the user cache
    or the pinned download), each tokenized whole with the checkpoint's tokenizer (or ``--tokenizer``)."""
    from .data_pipeline import DOMAINS, corpus_file, resolve_corpus

    tokenizer_dir = _tokenizer_dir(args, ckpt, None)
    tokenizer, _ = _load_tokenizer(tokenizer_dir, vocab_size)
    corpus = resolve_corpus(args.corpus)
    domains = list(args.domains or DOMAINS)
    unknown = [d for d in domains if d not in DOMAINS]
    if unknown:
        raise UserError(f"unknown domain(s) {', '.join(unknown)} (the routing texts have {', '.join(DOMAINS)})")
    sources = {d: routing_text_chunks(corpus_file(corpus, d).read_text(encoding="utf-8"), tokenizer, chunk_len,
                                      args.tokens_per_domain) for d in domains}
    meta = {"source": "routing texts: each domain's file tokenized whole, full chunks (the released analysis)",
            "corpus": str(corpus.resolve()), "tokenizer": str(tokenizer_dir.resolve()),
            "tokenizer_sha256": sha256_file(tokenizer_dir / "tokenizer.json")}
    return sources, meta


def _domain_sources(args: argparse.Namespace, ckpt: Path, vocab_size: int, chunk_len: int) -> tuple[dict, dict]:
    """(domain -> iterator of token chunks, provenance) for the text chosen by the options: the routing
    texts (:func:`_routing_text_sources`) or a test split, as below.

    Text: ``--splits`` (a folder of ``<domain>.jsonl``, or one with ``test/``), else ``--data`` (a
    prepared data directory), else the project's prepared data (:func:`drop_upcycling.data.prepare_all`,
    built or reused). Tokenizer: ``--tokenizer``, else the checkpoint's own, else the prepared one.
    When the tokenizer is the prepared data's, the already tokenized test shards are read
    (:func:`drop_upcycling.data.iter_domain_sequences`, whole windows only); otherwise the test
    documents are tokenized here (:func:`token_chunks`).
    """
    if text_choice(args) == "routing-texts":
        return _routing_text_sources(args, ckpt, vocab_size, chunk_len)
    prepared = _prepared_data(args, vocab_size) if args.splits is None else None
    tokenizer_dir = _tokenizer_dir(args, ckpt, prepared)
    tokenizer, eos_id = _load_tokenizer(tokenizer_dir, vocab_size)
    tok_sha = sha256_file(tokenizer_dir / "tokenizer.json")
    meta = {"tokenizer": str(tokenizer_dir.resolve()), "tokenizer_sha256": tok_sha}

    def tokenize(texts: Iterable[str]) -> Iterator[torch.Tensor]:
        return token_chunks(texts, tokenizer, chunk_len, args.tokens_per_domain, eos_id)

    if prepared is None:
        sources, source_meta = _jsonl_sources(args.splits, args.domains, tokenize)
    else:
        sources, source_meta = _prepared_sources(prepared, args.domains, tok_sha, tokenize, chunk_len,
                                                 args.tokens_per_domain)
    return sources, {**meta, **source_meta}


def _prepared_data(args: argparse.Namespace, vocab_size: int):
    """``--data``, else the project's prepared data, built once and cached (``--vocab-size``, else the
    model's vocabulary, as training prepares it)."""
    from . import data

    if args.data is not None:
        return data.PreparedData.load(args.data)
    return data.prepare_all(corpus=args.corpus, cache_dir=args.cache_dir, vocab_size=args.vocab_size or vocab_size)


def _tokenizer_dir(args: argparse.Namespace, ckpt: Path, prepared) -> Path:
    """``--tokenizer``, else the checkpoint's own, else the prepared data's."""
    if args.tokenizer is not None:
        tokenizer_dir = args.tokenizer
    elif (ckpt / "tokenizer.json").is_file():
        tokenizer_dir = ckpt
    elif prepared is not None:
        tokenizer_dir = Path(prepared.tokenizer_dir)
    else:
        raise UserError(f"{ckpt} has no tokenizer.json: pass --tokenizer DIR")
    if not (tokenizer_dir / "tokenizer.json").is_file():
        raise UserError(f"{tokenizer_dir} has no tokenizer.json")
    return tokenizer_dir


def _prepared_sources(prepared, domains: Sequence[str] | None, tok_sha: str, tokenize: Tokenize, chunk_len: int,
                      budget: int) -> tuple[dict, dict]:
    """The prepared data's test split, and its provenance.

    Its token shards are read when the tokenizer is the data's own (same bytes: tokenizing again
    would give the same ids); with any other tokenizer its documents are tokenized here.
    """
    from .data import iter_documents, iter_domain_sequences
    domains = list(domains or prepared.domains)
    unknown = [d for d in domains if d not in prepared.domains]
    if unknown:
        raise UserError(f"unknown domain(s) {', '.join(unknown)} (prepared data has {', '.join(prepared.domains)})")
    meta = {"data": str(Path(prepared.root).resolve())}
    if tok_sha == sha256_file(Path(prepared.tokenizer_dir) / "tokenizer.json"):
        meta["source"] = "prepared test shards"
        return {d: iter_domain_sequences(prepared, "test", d, chunk_len, max_tokens=budget) for d in domains}, meta
    meta["source"] = "prepared test documents, tokenized with the checkpoint's tokenizer"
    return {d: tokenize(iter_documents(prepared, "test", d)) for d in domains}, meta


def _jsonl_sources(splits: Path, domains: Sequence[str] | None, tokenize: Tokenize) -> tuple[dict, dict]:
    """``--splits``: a folder of ``<domain>.jsonl`` test documents (or one holding ``test/``), tokenized
    here, and its provenance."""
    from .data_pipeline import jsonl_files, split_domains

    split_dir = splits / "test" if (splits / "test").is_dir() else splits
    if not split_dir.is_dir():
        raise UserError(f"{split_dir} is not a directory of <domain>.jsonl files")
    domains = list(domains or split_domains(split_dir))
    missing = [d for d in domains if not jsonl_files(split_dir, d)]
    if missing or not domains:
        raise UserError(f"{split_dir} has no <domain>.jsonl for: {', '.join(missing) or 'any domain'}")
    meta = {"source": "JSONL documents", "split_dir": str(split_dir.resolve())}
    return {d: tokenize(read_jsonl_texts(jsonl_files(split_dir, d))) for d in domains}, meta


# ============================================================================ CLI: routing CKPT
def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", type=Path, metavar="CKPT", help="a Mixtral (MoE) checkpoint directory")
    parser.add_argument("--out", required=True, type=Path, help="output directory (routing_counts.csv/.json)")
    parser.add_argument("--tokens-per-domain", type=int, default=DEFAULT_TOKENS_PER_DOMAIN,
                        help=f"tokens fed per domain (default {DEFAULT_TOKENS_PER_DOMAIN:,}, as in the released counts)")
    parser.add_argument("--tokenizer", type=Path, metavar="DIR",
                        help="tokenizer dir (default: the checkpoint's, else the prepared data's)")
    parser.add_argument("--text", choices=TEXTS, help="routing-texts: each domain's corpus file tokenized whole, "
                        "101 full 2048-token chunks, as the released analysis (default); test: a held-out test "
                        "split, for models trained on these texts (default when --data or --splits is given)")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--data", type=Path, metavar="DIR",
                        help="a prepared data directory (drop-upcycling data ...); its test split is used")
    source.add_argument("--splits", type=Path, metavar="DIR",
                        help="a folder of <domain>.jsonl test documents (or one holding test/)")
    parser.add_argument("--corpus", type=Path, metavar="DIR",
                        help="corpus folder (default: $DROP_UPCYCLING_CORPUS, the user cache, else the pinned download): "
                        "the routing texts, or the text prepared into a test split (once, cached)")
    parser.add_argument("--cache-dir", type=Path, metavar="DIR", help="cache for the prepared data")
    parser.add_argument("--vocab-size", type=int,
                        help="tokenizer size when preparing data (default: the model's vocab, as training does)")
    parser.add_argument("--domains", nargs="+", help="domains to count (default: every domain of the split)")
    parser.add_argument("--chunk-len", type=int, default=DEFAULT_CHUNK,
                        help="tokens per forward pass (default 2048, capped at the model's max positions)")
    parser.add_argument("--batch-size", type=int, default=1, help="chunks per forward pass")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    parser.add_argument("--model-name", help="the model column (default: the checkpoint folder's name)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing routing_counts.csv")


def run(args: argparse.Namespace) -> int:
    from .checkpoint import CheckpointReader, load_model
    from .parallel import resolve_device

    _check_options(args)
    text_choice(args)
    device = resolve_device(args.device)
    if (args.out / COUNTS_FILE).exists() and not args.overwrite:
        raise UserError(f"{args.out / COUNTS_FILE} exists (pass --overwrite to replace it)")
    cfg = CheckpointReader(args.checkpoint).config
    if not cfg.is_moe:
        raise UserError(f"{args.checkpoint} is a dense model: routing counts need a MoE checkpoint")
    chunk_len = chunk_length(cfg, args.chunk_len)
    chunks, source_meta = _domain_sources(args, args.checkpoint, cfg.vocab_size, chunk_len)
    name = args.model_name or args.checkpoint.resolve().name
    model = load_model(args.checkpoint, dtype=getattr(torch, args.dtype), device=device).eval()
    log.info("counting %s: %d domains x %d tokens in %d-token chunks (%s)", name, len(chunks),
             args.tokens_per_domain, chunk_len, source_meta["source"])
    counts = count_checkpoint(model, chunks, name, batch_size=args.batch_size)
    meta = _provenance(args, cfg, name, chunk_len, _tokens_counted(counts, cfg, list(chunks), args), source_meta)
    path = write_counts(counts, args.out, meta)
    print(f"wrote {path} ({len(counts)} rows); next: drop-upcycling analyze routing --counts {path} --out DIR")
    return 0


def _check_options(args: argparse.Namespace) -> None:
    """The numeric options, before anything is read or loaded."""
    if args.tokens_per_domain < 1:
        raise UserError(f"--tokens-per-domain must be >= 1, got {args.tokens_per_domain}")
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.chunk_len < 1:
        raise UserError(f"--chunk-len must be >= 1, got {args.chunk_len}")
    if args.vocab_size is not None and args.vocab_size < 1:
        raise UserError(f"--vocab-size must be >= 1, got {args.vocab_size}")


def _tokens_counted(counts: pd.DataFrame, cfg, domains: list[str], args: argparse.Namespace) -> dict[str, int]:
    """Tokens routed per domain: layer 0's assignments / K (every token fills K slots in every layer).

    Warns when a domain gave less than ``--tokens-per-domain``: a small test split, or the prepared
    shards, which hold whole training windows only.
    """
    per_layer = counts[counts["layer"] == 0].groupby("domain")["assignments"].sum() // cfg.num_experts_per_tok
    tokens = {d: int(per_layer[d]) for d in domains}
    short = {d: n for d, n in tokens.items() if n < args.tokens_per_domain}
    if short:
        log.warning("fewer tokens than requested (text too short, or whole windows / chunks only): %s", short)
    return tokens


def _provenance(args: argparse.Namespace, cfg, name: str, chunk_len: int, tokens: dict[str, int],
                source_meta: dict) -> dict:
    """``routing_counts.json``: what was counted, on what text, with which code."""
    from . import __version__

    return {
        "model": name, "checkpoint": str(args.checkpoint.resolve()), "num_experts": cfg.num_experts,
        "top_k": cfg.num_experts_per_tok, "num_layers": cfg.num_hidden_layers, "chunk_len": chunk_len,
        "tokens_per_domain_requested": args.tokens_per_domain, "tokens_per_domain": tokens,
        **source_meta, "dtype": args.dtype, "drop_upcycling_version": __version__,
    }
