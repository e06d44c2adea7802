"""The data pipeline on the synthetic corpus (and the real one where it is the subject): splits, tokenizer,
datatrove shards, reader, errors."""

from __future__ import annotations

import json
import os
import shutil
import socket
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from drop_upcycling import data
from drop_upcycling.cli import main
from drop_upcycling.data import (
    CORPUS_SHA256,
    DOMAINS,
    EOS_TOKEN,
    SPLITS,
    PreparedData,
    TokenSequenceReader,
    iter_documents,
    iter_domain_sequences,
    prepare_all,
    read_shard,
)
from drop_upcycling.data_pipeline import DOC_UNITS, corpus_file, read_documents, sha256_file
from drop_upcycling.errors import UserError

MAX_DOCS = 150
VOCAB = 1024


@pytest.fixture(scope="session")
def prepared(corpus_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> PreparedData:
    """The full pipeline on the first documents of each domain (what training and eval would call)."""
    return prepare_all(corpus_dir, tmp_path_factory.mktemp("cache"), vocab_size=VOCAB, seed=0,
                       val_fraction=0.1, test_fraction=0.1, max_docs_per_domain=MAX_DOCS, pinned=False)


@pytest.fixture(scope="session")
def tokenizer(prepared: PreparedData):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(prepared.tokenizer_dir / "tokenizer.json"))


def _linked_corpus(corpus_dir: Path, dest: Path, name: str = "{d}.txt") -> Path:
    dest.mkdir(parents=True)
    for d in DOMAINS:
        os.symlink(corpus_dir / f"{d}.txt", dest / name.format(d=d))
    return dest


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


# ---------------------------------------------------------------------------- corpus
def test_resolution_order(pinned_corpus: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    corpus_dir = pinned_corpus
    monkeypatch.setenv("DROP_UPCYCLING_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("DROP_UPCYCLING_CORPUS", str(tmp_path / "nowhere"))
    assert data.resolve_corpus(corpus_dir) == corpus_dir  # the argument wins over the environment
    with pytest.raises(UserError, match="does not exist"):  # an explicit wrong path is an error, no fallback
        data.resolve_corpus()
    monkeypatch.delenv("DROP_UPCYCLING_CORPUS")
    # No cache, a "network" (file:// mirror) with the upstream file names: downloaded into the cache, verified.
    mirror = _linked_corpus(corpus_dir, tmp_path / "mirror", "{d}_texts.txt")
    monkeypatch.setenv("DROP_UPCYCLING_CORPUS_URL", mirror.as_uri())
    got = data.resolve_corpus()
    assert got == tmp_path / "cache" / "corpus"
    assert sorted(p.name for p in got.iterdir()) == sorted(f"{d}.txt" for d in DOMAINS)
    # The cache is used from now on, even with the mirror gone.
    monkeypatch.setenv("DROP_UPCYCLING_CORPUS_URL", (tmp_path / "gone").as_uri())
    assert data.resolve_corpus() == got


def test_download_failures_leave_nothing(pinned_corpus: Path, tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    corpus_dir = pinned_corpus
    monkeypatch.setenv("DROP_UPCYCLING_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("DROP_UPCYCLING_CORPUS", raising=False)
    monkeypatch.setenv("DROP_UPCYCLING_CORPUS_URL", (tmp_path / "offline").as_uri())
    with pytest.raises(UserError, match=r"--corpus DIR.*DROP_UPCYCLING_CORPUS.*network"):
        data.resolve_corpus()
    mirror = _linked_corpus(corpus_dir, tmp_path / "mirror", "{d}_texts.txt")
    (mirror / "ja_mc4_texts.txt").unlink()
    (mirror / "ja_mc4_texts.txt").write_text("tampered\n")
    monkeypatch.setenv("DROP_UPCYCLING_CORPUS_URL", mirror.as_uri())
    with pytest.raises(UserError, match="sha256 mismatch"):
        data.resolve_corpus()
    assert not (tmp_path / "cache" / "corpus").exists()
    assert list((tmp_path / "cache").iterdir()) == []  # no temp dir left either


@pytest.mark.parametrize("damage", ["missing_dir", "missing_file", "empty", "changed"])
def test_bad_corpus(pinned_corpus: Path, tmp_path: Path, damage: str) -> None:
    corpus_dir, bad = pinned_corpus, tmp_path / "corpus"
    if damage != "missing_dir":
        _linked_corpus(corpus_dir, bad)
        target = bad / "code_stack.txt"
        target.unlink()
        if damage == "empty":
            target.write_text("")
        elif damage == "changed":
            target.write_bytes((corpus_dir / "code_stack.txt").read_bytes()[:-1])
    message = {"missing_dir": "does not exist", "missing_file": "lacks code_stack.txt", "empty": "is empty",
               "changed": "sha256 mismatch"}[damage]
    with pytest.raises(UserError, match=message):
        data.prepare_corpus(bad, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert main(["data", "corpus", "--corpus", str(bad), "--out", str(tmp_path / "out")]) == 2


@pytest.mark.real_corpus
def test_corpus_hashes_are_the_readme_ones(real_corpus: Path) -> None:
    assert data.verify_corpus(real_corpus) == {d: corpus_file(real_corpus, d) for d in DOMAINS}
    assert CORPUS_SHA256["c4"] == "ee2fb5542e72c3b6979b362f41182d2dd043549912b32fe1438685bc16c563e3"
    assert data.CORPUS_URLS["ja_mc4"].endswith(f"/{data.CORPUS_COMMIT}/analysis/routing_output/text/ja_mc4_texts.txt")


# ---------------------------------------------------------------------------- splits
def test_splits_are_disjoint_complete_and_deterministic(corpus_dir: Path, prepared: PreparedData,
                                                         tmp_path: Path) -> None:
    texts: dict[str, str] = {}
    for split in SPLITS:
        for domain in DOMAINS:
            rows = _jsonl(prepared.splits_dir / split / f"{domain}.jsonl")
            assert rows, f"{split}/{domain} is empty"
            for row in rows:
                assert row["domain"] == domain
                assert row["text"] not in texts, f"a document is in {texts.get(row['text'])} and {split}"
                texts[row["text"]] = split
    # Every distinct source document of the slice landed in exactly one split.
    source = set()
    for d in DOMAINS:
        docs = list(read_documents(corpus_file(corpus_dir, d), DOC_UNITS[d]))[:MAX_DOCS]
        source |= set(docs)
    assert set(texts) == source
    again = data.prepare_corpus(corpus_dir, tmp_path / "again", seed=0, val_fraction=0.1, test_fraction=0.1,
                                max_docs_per_domain=MAX_DOCS, pinned=False)
    for split in SPLITS:
        for d in DOMAINS:
            assert (again / split / f"{d}.jsonl").read_bytes() == (prepared.splits_dir / split / f"{d}.jsonl").read_bytes()
    other = data.prepare_corpus(corpus_dir, tmp_path / "other", seed=1, val_fraction=0.1, test_fraction=0.1,
                                max_docs_per_domain=MAX_DOCS, pinned=False)
    assert (other / "train" / "c4.jsonl").read_bytes() != (again / "train" / "c4.jsonl").read_bytes()


def test_zero_documents_in_a_split_is_an_error(corpus_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(UserError, match="zero documents"):
        data.prepare_corpus(corpus_dir, tmp_path / "out", max_docs_per_domain=2, pinned=False)
    assert not (tmp_path / "out").exists()
    assert [p for p in tmp_path.iterdir()] == []


# ---------------------------------------------------------------------------- tokenizer
def test_tokenizer_round_trip_and_transformers(prepared: PreparedData, tokenizer) -> None:
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(prepared.tokenizer_dir)
    assert hf.eos_token == hf.bos_token == EOS_TOKEN and hf.pad_token == "<pad>"
    assert hf.eos_token_id == tokenizer.token_to_id(EOS_TOKEN) and hf.pad_token_id == tokenizer.token_to_id("<pad>")
    assert len(hf) == tokenizer.get_vocab_size() <= VOCAB
    for domain in DOMAINS:
        for text in list(iter_documents(prepared, "test", domain))[:5]:
            ids = tokenizer.encode(text).ids
            assert tokenizer.decode(ids) == text
            assert hf(text)["input_ids"] == ids
            assert hf.decode(ids) == text


def test_tokenizer_is_deterministic(prepared: PreparedData, tmp_path: Path) -> None:
    out = data.train_tokenizer(prepared.splits_dir / "train", tmp_path / "tok", vocab_size=VOCAB)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        assert (out / name).read_bytes() == (prepared.tokenizer_dir / name).read_bytes()


def test_bad_tokenizer_options(prepared: PreparedData, tmp_path: Path) -> None:
    with pytest.raises(UserError, match="at least 512"):
        data.train_tokenizer(prepared.splits_dir / "train", tmp_path / "tok", vocab_size=300)
    assert main(["data", "tokenizer", "--train", str(tmp_path / "none"), "--out", str(tmp_path / "tok")]) == 2
    assert not (tmp_path / "tok").exists()


def test_vocab_larger_than_model_is_an_error(prepared: PreparedData) -> None:
    size = data.check_vocab(prepared.tokenizer_dir, VOCAB)
    with pytest.raises(UserError, match="more than the model's vocab"):
        data.check_vocab(prepared.tokenizer_dir, size - 1)


# ---------------------------------------------------------------------------- shards
def test_shards_round_trip_to_documents(prepared: PreparedData, tokenizer) -> None:
    eos = tokenizer.token_to_id(EOS_TOKEN)
    for split in SPLITS:
        for domain in DOMAINS:
            docs = list(iter_documents(prepared, split, domain))
            (path,) = prepared.shard_files(split, domain)
            tokens = np.asarray(read_shard(path))
            assert tokens.dtype == np.uint16
            ends = np.fromfile(str(path) + ".index", dtype="<u8").astype(np.int64).tolist()
            assert len(ends) == len(docs)
            starts = [0, *ends[:-1]]
            for text, s, e in zip(docs, starts, ends, strict=True):
                assert tokens[e - 1] == eos  # an eos after every document
                assert tokenizer.decode(tokens[s:e - 1].tolist()) == text


def test_tokenize_skips_completed_work(prepared: PreparedData, tmp_path: Path) -> None:
    out = tmp_path / "shards"
    data.tokenize_shards(prepared.splits_dir, prepared.tokenizer_dir, out, splits=["validation"])
    files = sorted(out.glob("validation/*/*.ds"))
    assert len(files) == len(DOMAINS) and (out / "DONE").is_file()
    stamps = {f: f.stat().st_mtime_ns for f in files}
    # Simulate a task killed before completion: its completion mark is missing and its file half-written.
    victim = next(f for f in files if f.parent.name == "c4")
    completions = sorted((out / "logs" / "completions").iterdir())
    assert len(completions) == len(DOMAINS)
    assert completions[0].name == "00000"
    completions[0].unlink()  # task 0 is the first (split, domain): validation/c4
    victim.write_bytes(victim.read_bytes()[:10])
    data.tokenize_shards(prepared.splits_dir, prepared.tokenizer_dir, out, splits=["validation"])
    for f in files:
        if f == victim:
            assert f.read_bytes() == (prepared.shards_dir / "validation" / "c4" / f.name).read_bytes()
        else:
            assert f.stat().st_mtime_ns == stamps[f], f"{f} was rewritten"
    with pytest.raises(UserError, match="other inputs, tokenizer or --tasks"):
        data.tokenize_shards(prepared.splits_dir, prepared.tokenizer_dir, out, splits=["validation"], tasks=2)


@pytest.mark.parametrize("damage", ["truncated_ds", "truncated_index", "mismatched", "no_index"])
def test_bad_shards(prepared: PreparedData, tmp_path: Path, damage: str) -> None:
    (src,) = prepared.shard_files("train", "c4")
    path = tmp_path / src.name
    for suffix in ("", ".index", ".metadata"):
        shutil.copy(str(src) + suffix, str(path) + suffix)
    index = Path(str(path) + ".index")
    if damage == "truncated_ds":
        path.write_bytes(path.read_bytes()[:-2])
    elif damage == "truncated_index":
        index.write_bytes(index.read_bytes()[:-3])
    elif damage == "mismatched":
        (other,) = prepared.shard_files("train", "ja_mc4")
        shutil.copy(str(other) + ".index", index)
    else:
        index.unlink()
    message = {"truncated_ds": "truncated or does not match", "truncated_index": "truncated",
               "mismatched": "truncated or does not match", "no_index": "has no"}[damage]
    with pytest.raises(UserError, match=message):
        read_shard(path)
    with pytest.raises(UserError, match=message):
        TokenSequenceReader({"c4": [path]}, 16, seed=0)


# ---------------------------------------------------------------------------- reader
def _windows(files: list[Path], seq_len: int) -> list[bytes]:
    """Independent reference: every non-overlapping window of each file, as bytes of int64."""
    out = []
    for f in files:
        tokens = np.fromfile(f, dtype="<u2").astype(np.int64)
        out += [tokens[i:i + seq_len].tobytes() for i in range(0, len(tokens) - seq_len + 1, seq_len)]
    return out


def _take_ids(reader: TokenSequenceReader, n: int) -> list[tuple[str, int]]:
    """(domain, sequence id) of the next ``n`` sequences, consuming them."""
    ids = []
    for _ in range(n):
        ids.append(reader.next_sequence_id())
        reader.next_batch(1)
    return ids


def test_rank_sharding_reads_every_sequence_once_per_epoch(prepared: PreparedData) -> None:
    seq_len, world = 32, 3
    files = prepared.files_by_domain("validation")
    for domain in DOMAINS:  # content: one domain, all ranks, one epoch = every window exactly once
        expected = Counter(_windows(files[domain], seq_len))
        got: Counter[bytes] = Counter()
        for rank in range(world):
            reader = TokenSequenceReader({domain: files[domain]}, seq_len, seed=7, rank=rank, world_size=world)
            n = len(range(rank, reader.sequences(domain), world))
            batch = reader.next_batch(n)
            assert batch.dtype == torch.int64 and batch.shape == (n, seq_len)
            got.update(row.numpy().tobytes() for row in batch)
            assert reader.epoch(domain) == 1
        assert got == expected
    # ids: mixed domains, each rank's first epoch of each domain partitions that domain's sequences
    seen: dict[str, list[int]] = {d: [] for d in DOMAINS}
    for rank in range(world):
        reader = TokenSequenceReader(files, seq_len, seed=7, rank=rank, world_size=world)
        share = {d: len(range(rank, reader.sequences(d), world)) for d in DOMAINS}
        taken = Counter()
        while any(taken[d] < share[d] for d in DOMAINS):
            ((domain, g),) = _take_ids(reader, 1)
            if taken[domain] < share[domain]:
                seen[domain].append(g)
            taken[domain] += 1
    for d in DOMAINS:
        assert sorted(seen[d]) == list(range(len(seen[d])))


def test_resume_continues_at_the_same_sequence(prepared: PreparedData) -> None:
    files = prepared.files_by_domain("validation")
    kwargs = dict(weights={"ja_mc4": 0.5, "c4": 0.3, "code_stack": 0.2}, seed=3, rank=1, world_size=2)
    a = TokenSequenceReader(files, 256, **kwargs)
    a.next_batch(7)
    state = json.loads(json.dumps(a.state_dict()))
    expected = a.next_batch(100)
    assert all(a.epoch(d) >= 1 for d in a.domains)  # crossed every domain's epoch boundary
    b = TokenSequenceReader(files, 256, **kwargs)
    b.load_state_dict(state)
    assert torch.equal(b.next_batch(100), expected)
    fresh = TokenSequenceReader(files, 256, **kwargs)
    assert not torch.equal(fresh.next_batch(100), expected)
    with pytest.raises(UserError, match="seed"):
        TokenSequenceReader(files, 256, **{**kwargs, "seed": 4}).load_state_dict(state)
    with pytest.raises(UserError, match="weights"):
        TokenSequenceReader(files, 256, **{**kwargs, "weights": {"ja_mc4": 0.4, "c4": 0.4, "code_stack": 0.2}}).load_state_dict(state)


def test_mixing_weights_and_shuffling(prepared: PreparedData) -> None:
    files = prepared.files_by_domain("train")
    weights = {"ja_mc4": 0.49, "c4": 0.23, "en_wikipedia": 0.23, "code_stack": 0.05}
    reader = TokenSequenceReader(files, 16, weights=weights, seed=0)
    counts = Counter(d for d, _ in _take_ids(reader, 1000))
    for d, w in weights.items():
        assert abs(counts[d] - 1000 * w) <= 1, counts
    one = TokenSequenceReader({"c4": files["c4"]}, 16, seed=0)
    n = one.sequences("c4")
    order0 = [g for _, g in _take_ids(one, n)]
    order1 = [g for _, g in _take_ids(one, n)]
    assert sorted(order0) == sorted(order1) == list(range(n))
    assert order0 != order1 and order0 != sorted(order0)  # shuffled, and differently per epoch
    again = TokenSequenceReader({"c4": files["c4"]}, 16, seed=0)
    assert [g for _, g in _take_ids(again, n)] == order0
    with pytest.raises(UserError, match="without data"):
        TokenSequenceReader(files, 16, weights={"ja_wikipedia": 1.0}, seed=0)
    with pytest.raises(UserError, match="fewer than"):
        TokenSequenceReader({"c4": files["c4"]}, 16, seed=0, world_size=n + 1, rank=0)


def test_domain_iterators(prepared: PreparedData) -> None:
    files = prepared.shard_files("test", "en_wikipedia")
    stream = np.concatenate([np.fromfile(f, dtype="<u2") for f in files]).astype(np.int64)
    seqs = list(iter_domain_sequences(prepared, "test", "en_wikipedia", 100))
    assert len(seqs) == len(stream) // 100
    assert torch.equal(torch.cat(seqs), torch.from_numpy(stream[:len(seqs) * 100]))
    assert len(list(iter_domain_sequences(prepared, "test", "en_wikipedia", 100, max_tokens=350))) == 3
    everything = [f for s in SPLITS for f in prepared.shard_files(s, "ja_mc4")]
    stream = np.concatenate([np.fromfile(f, dtype="<u2") for f in everything]).astype(np.int64)
    seqs = list(iter_domain_sequences(prepared, "all", "ja_mc4", 1000))
    assert len(seqs) == len(stream) // 1000  # windows span file boundaries
    assert torch.equal(torch.cat(seqs), torch.from_numpy(stream[:len(seqs) * 1000]))
    assert len(list(iter_documents(prepared, "all", "c4"))) == sum(
        len(_jsonl(prepared.splits_dir / s / "c4.jsonl")) for s in SPLITS)
    rows = _jsonl(prepared.splits_dir / "test" / "en_wikipedia.jsonl")
    assert list(iter_documents(prepared, "test", "en_wikipedia")) == [r["text"] for r in rows]
    with pytest.raises(UserError, match="unknown domain"):
        prepared.shard_files("test", "ja_wikipedia")


# ---------------------------------------------------------------------------- prepare_all
def test_prepare_all_is_cached_and_atomic(corpus_dir: Path, prepared: PreparedData, tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    again = prepare_all(corpus_dir, prepared.root.parent, vocab_size=VOCAB, seed=0, val_fraction=0.1,
                        test_fraction=0.1, max_docs_per_domain=MAX_DOCS, pinned=False)
    assert again == prepared
    assert [p.name for p in prepared.root.parent.iterdir()] == [prepared.root.name]  # no temp dirs left
    assert PreparedData.load(prepared.root) == prepared
    meta = json.loads((prepared.root / "prepared.json").read_text())
    for split in SPLITS:
        for d in DOMAINS:
            assert meta["tokens"][split][d] == sum(len(read_shard(f)) for f in prepared.shard_files(split, d))

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    # A build whose process died (here: a pid that cannot exist) is removed by the next run.
    orphan = prepared.root.parent / ".prepared-0123456789abcdef.tmp-dead"
    orphan.mkdir()
    (orphan / "owner").write_text(f"{socket.gethostname()} {2**22 + 1}\n")
    prepare_all(corpus_dir, prepared.root.parent, vocab_size=VOCAB, seed=0, val_fraction=0.1,
                test_fraction=0.1, max_docs_per_domain=MAX_DOCS, pinned=False)
    assert not orphan.exists()

    monkeypatch.setattr(data, "tokenize_shards", killed)
    with pytest.raises(KeyboardInterrupt):
        prepare_all(corpus_dir, tmp_path / "cache", vocab_size=VOCAB, max_docs_per_domain=MAX_DOCS, pinned=False)
    assert list((tmp_path / "cache").iterdir()) == []


def test_a_corpus_of_ones_own_needs_pinned_false_and_is_keyed_by_its_content(
        corpus_dir: Path, prepared: PreparedData, tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"sha256 mismatch.*pinned: false"):
        prepare_all(corpus_dir, tmp_path / "cache", vocab_size=VOCAB, max_docs_per_domain=MAX_DOCS)
    assert main(["data", "corpus", "--corpus", str(corpus_dir), "--out", str(tmp_path / "s")]) == 2
    assert main(["data", "corpus", "--corpus", str(corpus_dir), "--unpinned", "--out", str(tmp_path / "s")]) == 0
    assert json.loads((prepared.root / "prepared.json").read_text())["corpus_sha256"] == {
        d: sha256_file(corpus_file(corpus_dir, d)) for d in DOMAINS}
    edited = tmp_path / "edited"
    shutil.copytree(corpus_dir, edited)
    with open(edited / "c4.txt", "a", encoding="utf-8") as f:
        f.write("One more document that was not there before.\n")
    other = prepare_all(edited, tmp_path / "cache", vocab_size=VOCAB, seed=0, val_fraction=0.1,
                        test_fraction=0.1, max_docs_per_domain=MAX_DOCS, pinned=False)
    assert other.root.name != prepared.root.name


@pytest.mark.real_corpus
def test_the_real_corpus_prepares(real_corpus: Path, tmp_path: Path) -> None:
    """The authors' files through the whole build: every domain in every split, Japanese kept intact."""
    got = prepare_all(real_corpus, tmp_path / "cache", vocab_size=VOCAB, seed=0, val_fraction=0.1,
                      test_fraction=0.1, max_docs_per_domain=MAX_DOCS)
    tokens = json.loads((got.root / "prepared.json").read_text())["tokens"]
    assert all(tokens[s][d] > 0 for s in SPLITS for d in DOMAINS)
    ja = next(iter_documents(got, "train", "ja_mc4"))
    assert any("\u3040" <= ch <= "\u30ff" for ch in ja)  # hiragana / katakana


# ---------------------------------------------------------------------------- other corpora and formats
def test_other_corpora_plug_in(prepared: PreparedData, tmp_path: Path) -> None:
    import gzip

    import pandas as pd

    texts = {d: list(iter_documents(prepared, "train", d))[:40] for d in ("ja_mc4", "code_stack")}
    folder = tmp_path / "ja"
    folder.mkdir()
    for i in range(2):  # a folder of compressed JSONL parts, records with another text field
        with gzip.open(folder / f"part{i}.jsonl.gz", "wt", encoding="utf-8") as f:
            for t in texts["ja_mc4"][i::2]:
                f.write(json.dumps({"content": t, "url": "x"}, ensure_ascii=False) + "\n")
    pd.DataFrame({"content": texts["code_stack"]}).to_parquet(tmp_path / "code.parquet")
    out = tmp_path / "splits"
    assert main(["data", "corpus", "--input", f"ja={folder}", "--input", f"code={tmp_path / 'code.parquet'}",
                 "--text-key", "content", "--seed", "5",  # seed 0 would reproduce the train split
                 "--val-fraction", "0.2", "--test-fraction", "0.2", "--out", str(out)]) == 0
    for domain, source in (("ja", "ja_mc4"), ("code", "code_stack")):
        got = [r["text"] for s in SPLITS for r in _jsonl(out / s / f"{domain}.jsonl")]
        assert sorted(got) == sorted(set(texts[source]))
    assert main(["data", "corpus", "--input", "ja", "--out", str(tmp_path / "x")]) == 2
    assert main(["data", "corpus", "--input", f"ja={tmp_path / 'none'}", "--out", str(tmp_path / "x")]) == 2
    assert not (tmp_path / "x").exists()

    # A domain given as a folder of JSONL parts is split over datatrove tasks, one shard per task.
    parts = tmp_path / "parts" / "train" / "ja"
    parts.mkdir(parents=True)
    for i in range(2):
        (parts / f"{i}.jsonl").write_text("".join(json.dumps({"text": t, "id": str(j)}) + "\n"
                                                  for j, t in enumerate(texts["ja_mc4"][i::2])))
    shards = data.tokenize_shards(tmp_path / "parts", prepared.tokenizer_dir, tmp_path / "shards", tasks=2,
                                  splits=["train"])
    files = sorted((shards / "train" / "ja").glob("*.ds"))
    assert len(files) == 2
    docs = [len(np.fromfile(str(f) + ".index", dtype="<u8")) for f in files]
    assert docs == [len(texts["ja_mc4"][0::2]), len(texts["ja_mc4"][1::2])]


def test_uint32_shards_and_bad_tokenizers(prepared: PreparedData, tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 100_000, size=1000, dtype=np.uint32)  # a vocab past 65,536 -> 4-byte tokens
    path = tmp_path / "big_00000_unshuffled.ds"
    tokens.astype("<u4").tofile(path)
    np.array([300, 700, 1000], dtype="<u8").tofile(str(path) + ".index")
    Path(str(path) + ".metadata").write_text("llm-jp/llm-jp-3-1.8b|4\n1000\n1 kT")
    assert np.array_equal(read_shard(path), tokens)
    reader = TokenSequenceReader({"big": [path]}, 100, seed=0)
    got = reader.next_batch(10)
    assert sorted(map(tuple, got.tolist())) == sorted(map(tuple, tokens.astype(np.int64).reshape(10, 100).tolist()))
    Path(str(path) + ".metadata").write_text("x|2\n1000\n1 kT")  # metadata disagreeing with the file size
    with pytest.raises(UserError, match="truncated or does not match"):
        read_shard(path)
    with pytest.raises(UserError, match="has no token"):
        data.tokenize_shards(prepared.splits_dir, prepared.tokenizer_dir, tmp_path / "s", eos_token="</s>")
    with pytest.raises(UserError, match="not loadable from the hub"):
        data.tokenize_shards(prepared.splits_dir, "no-such-org/no-such-tokenizer", tmp_path / "s")
    assert not (tmp_path / "s").exists()
