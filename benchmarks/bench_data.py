"""Data pipeline throughput: datatrove tokenization (tokens/s) and the training reader (sequences/s).

References in the same run:
- tokenization: ``tokenizers.Tokenizer.encode_batch`` on the same documents, in memory, nothing
  written. The ratio (datatrove pipeline) / (bare encode) is what reading JSONL, the executor and
  writing ``.ds`` + index cost on top of the tokenizer itself.
- reader: copying the same number of contiguous ``seq_len`` windows out of one memory-mapped shard
  into an int64 array. The ratio (TokenSequenceReader.next_batch) / (contiguous copy) is the price
  of the shuffle, the domain mix and the rank sharding.
Throughputs are in each benchmark's ``extra_info`` (``--benchmark-json``) and printed.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest

from drop_upcycling import data

MAX_DOCS = 1500  # per domain: about a third of the corpus, a few seconds per round on 2 cores
SEQ_LEN, BATCH = 2048, 16
_counter = itertools.count()


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> data.PreparedData:
    return data.prepare_all(None, tmp_path_factory.mktemp("cache"), vocab_size=8192,
                            max_docs_per_domain=MAX_DOCS)


def _train_texts(prepared: data.PreparedData) -> list[str]:
    return [t for d in data.DOMAINS for t in data.iter_documents(prepared, "train", d)]


def _train_tokens(prepared: data.PreparedData) -> int:
    return sum(len(data.read_shard(f)) for d in data.DOMAINS for f in prepared.shard_files("train", d))


@pytest.mark.benchmark(group="tokenize")
def test_tokenize_bare_tokenizers(benchmark, prepared) -> None:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(prepared.tokenizer_dir / "tokenizer.json"))
    texts = _train_texts(prepared)
    n = benchmark.pedantic(lambda: sum(len(e.ids) for e in tok.encode_batch(texts)), rounds=3, warmup_rounds=1)
    benchmark.extra_info["tokens_per_s"] = n / benchmark.stats.stats.min
    print(f"\nbare encode_batch: {n:,} tokens, {benchmark.extra_info['tokens_per_s']:,.0f} tokens/s")


@pytest.mark.benchmark(group="tokenize")
def test_tokenize_datatrove_pipeline(benchmark, prepared, tmp_path: Path) -> None:
    def fresh():
        return (), {"out": tmp_path / f"shards{next(_counter)}"}

    def run(out: Path) -> None:
        data.tokenize_shards(prepared.splits_dir, prepared.tokenizer_dir, out, splits=["train"])

    benchmark.pedantic(run, setup=fresh, rounds=3)
    n = _train_tokens(prepared) - sum(  # the eos tokens are the pipeline's, not the tokenizer's
        json.loads((prepared.splits_dir / "splits.json").read_text())["documents"]["train"].values())
    benchmark.extra_info["tokens_per_s"] = n / benchmark.stats.stats.min
    print(f"\ndatatrove pipeline: {n:,} tokens, {benchmark.extra_info['tokens_per_s']:,.0f} tokens/s")


@pytest.mark.benchmark(group="reader")
def test_reader_contiguous_copy(benchmark, prepared) -> None:
    tokens = data.read_shard(prepared.shard_files("train", "en_wikipedia")[0])
    n_seq = len(tokens) // SEQ_LEN
    out = np.empty((BATCH, SEQ_LEN), dtype=np.int64)
    start = itertools.count()

    def copy() -> None:
        base = next(start) * BATCH
        for i in range(BATCH):
            j = (base + i) % n_seq
            out[i] = tokens[j * SEQ_LEN:(j + 1) * SEQ_LEN]

    benchmark.pedantic(copy, rounds=200, warmup_rounds=5)
    benchmark.extra_info["sequences_per_s"] = BATCH / benchmark.stats.stats.mean
    print(f"\ncontiguous copy: {benchmark.extra_info['sequences_per_s']:,.0f} sequences/s")


@pytest.mark.benchmark(group="reader")
def test_reader_token_sequence_reader(benchmark, prepared) -> None:
    weights = {"ja_mc4": 0.49, "en_wikipedia": 0.23, "c4": 0.23, "code_stack": 0.05}
    reader = data.TokenSequenceReader(prepared.files_by_domain("train"), SEQ_LEN, weights=weights, seed=0,
                                      rank=1, world_size=2)
    benchmark.pedantic(lambda: reader.next_batch(BATCH), rounds=200, warmup_rounds=5)
    benchmark.extra_info["sequences_per_s"] = BATCH / benchmark.stats.stats.mean
    print(f"\nTokenSequenceReader: {benchmark.extra_info['sequences_per_s']:,.0f} sequences/s "
          f"({benchmark.extra_info['sequences_per_s'] * SEQ_LEN:,.0f} tokens/s)")
