"""The real-data route end to end, offline, on the synthetic corpus: corpus files in the three input kinds
(JSONL.gz parts, a Hugging Face dataset folder, Parquet) + a seed's tokenizer folder -> datatrove shards and
their manifest (local executor, and the Slurm executor with sbatch mocked and its jobs run here) -> a dense
seed carrying that tokenizer, upcycled -> a training run on ``data: {shards: DIR}``. And the one-line
refusals: data tokenized with another tokenizer than the init checkpoint's, ids beyond the vocabulary,
shards together with the built-in corpus; and the message on how often a run repeats its data."""

from __future__ import annotations

import gzip
import itertools
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import random_model

from drop_upcycling.checkpoint import save_model
from drop_upcycling.cli import main
from drop_upcycling.configs import TINY_DENSE, TrainConfig
from drop_upcycling.data import TokenShards, read_shard, train_tokenizer
from drop_upcycling.data_pipeline import DOC_UNITS, corpus_file, read_documents, sha256_file, split_of
from drop_upcycling.errors import UserError
from drop_upcycling.parallel import free_port
from drop_upcycling.recipes import main as recipes_main
from drop_upcycling.recipes import resolve
from drop_upcycling.train import build_reader, configure_parser
from drop_upcycling.train import run as train_run

REPO = Path(__file__).resolve().parents[1]
SOURCES = {"ja": "ja_mc4", "en": "c4", "code": "code_stack"}  # our domains <- the synthetic corpus's files
DOCS = 120  # documents per domain
TEST_FRACTION = 0.1
VOCAB = 1024  # the tokenizer's requested size and the model's vocabulary
WEIGHTS = {"ja": 0.5, "en": 0.3, "code": 0.2}


@pytest.fixture(scope="module")
def texts(corpus_dir: Path) -> dict[str, list[str]]:
    return {d: list(itertools.islice(read_documents(corpus_file(corpus_dir, src), DOC_UNITS[src]), DOCS))
            for d, src in SOURCES.items()}


@pytest.fixture(scope="module")
def inputs(texts: dict[str, list[str]], tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """One input per domain, one of each kind: ja a folder of JSONL.gz parts, en a Hugging Face dataset (a
    local folder that datasets.load_dataset reads), code a Parquet file."""
    import pandas as pd

    root = tmp_path_factory.mktemp("inputs")
    (root / "ja").mkdir()
    for i in range(2):
        with gzip.open(root / "ja" / f"part{i}.jsonl.gz", "wt", encoding="utf-8") as f:
            f.writelines(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts["ja"][i::2])
    (root / "en").mkdir()
    (root / "en" / "train.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts["en"]))
    pd.DataFrame({"text": texts["code"]}).to_parquet(root / "code.parquet")
    return {"ja": str(root / "ja"), "en": f"hf:{root / 'en'}", "code": str(root / "code.parquet")}


def _input_args(inputs: dict[str, str]) -> list[str]:
    return [a for d, path in inputs.items() for a in ("--input", f"{d}={path}")]


@pytest.fixture(scope="module")
def tokenizer_dir(texts: dict[str, list[str]], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The seed's tokenizer, a local folder (tokenizer.json + the HF files naming its eos)."""
    root = tmp_path_factory.mktemp("tokenizer")
    (root / "train").mkdir()
    for d, ts in texts.items():
        (root / "train" / f"{d}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in ts))
    return train_tokenizer(root / "train", root / "tokenizer", vocab_size=VOCAB)


def _tokenize_args(inputs: dict[str, str], tokenizer_dir: Path, out: Path) -> list[str]:
    return ["data", "tokenize", *_input_args(inputs), "--tokenizer", str(tokenizer_dir), "--out", str(out),
            "--tasks", "2", "--test-fraction", str(TEST_FRACTION)]


@pytest.fixture(scope="module")
def shards(inputs: dict[str, str], tokenizer_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``drop-upcycling data tokenize --input ...`` on the local executor (2 tasks per domain and split)."""
    out = tmp_path_factory.mktemp("shards") / "shards"
    assert main(_tokenize_args(inputs, tokenizer_dir, out)) == 0
    return out


@pytest.fixture(scope="module")
def moe_seed(tokenizer_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A dense seed with the tokenizer in its folder (as the llm-jp seeds have theirs), upcycled by DU-0.5."""
    root = tmp_path_factory.mktemp("seed")
    dense = save_model(random_model(TINY_DENSE.replace(vocab_size=VOCAB), seed=3), root / "dense",
                       tokenizer_from=tokenizer_dir)
    assert main(["upcycle", str(dense), str(root / "moe"), "--method", "drop", "--ratio", "0.5",
                 "--num-experts", "4"]) == 0
    return root / "moe"


def _run_config(shards: Path | str, **changes) -> dict:
    return {"model": {"base": "tiny-moe", "vocab_size": VOCAB}, "data": {"shards": str(shards), "weights": WEIGHTS},
            "seq_len": 32, "global_batch_tokens": 256, "micro_batch_size": 2, "steps": 3, "lr": 3e-3,
            "min_lr": 3e-4, "warmup_steps": 1, "dtype": "fp32", "seed": 0, **changes}


def _single_process(monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(free_port())}.items():
        monkeypatch.setenv(key, value)


def _train(config: dict, path: Path, *argv: str) -> int:
    import argparse

    path.write_text(yaml.safe_dump(config))
    parser = argparse.ArgumentParser()
    configure_parser(parser)
    return train_run(parser.parse_args([str(path), *argv]))


def _documents(shard: Path) -> list[np.ndarray]:
    tokens = read_shard(shard)
    ends = np.fromfile(str(shard) + ".index", dtype="<u8").astype(np.int64)
    starts = np.concatenate([[0], ends[:-1]]) if len(ends) else ends
    return [np.asarray(tokens[s:e]) for s, e in zip(starts, ends, strict=True)]


# ---------------------------------------------------------------------------- corpus files -> shards + manifest
def test_corpus_files_become_shards_with_a_manifest(shards: Path, tokenizer_dir: Path,
                                                    texts: dict[str, list[str]]) -> None:
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    eos = tokenizer.token_to_id("<|endoftext|>")  # the eos its tokenizer_config.json names
    manifest = json.loads((shards / "manifest.json").read_text())
    assert manifest["format"] == "drop-upcycling token shards" and manifest["version"] == 1
    assert manifest["tokenizer"] == {"name": str(tokenizer_dir), "sha256": sha256_file(tokenizer_dir / "tokenizer.json"),
                                     "vocab_size": tokenizer.get_vocab_size(), "eos_token": "<|endoftext|>",
                                     "eos_id": eos}
    assert manifest["token_bytes"] == 2
    assert {"python", "drop-upcycling", "datatrove", "tokenizers"} <= set(manifest["versions"])
    assert set(manifest["tokens"]) == {"train", "test"}  # no validation fraction: no validation shards
    # The shards carry their tokenizer (a run without an init checkpoint puts it into its checkpoints).
    assert (shards / "tokenizer" / "tokenizer.json").read_bytes() == (tokenizer_dir / "tokenizer.json").read_bytes()
    assert (shards / "tokenizer" / "tokenizer_config.json").is_file()
    for domain, docs in texts.items():
        # Documents go to test exactly as `data corpus` splits them (same seed and fractions).
        expected = {s: sorted(t for t in docs if split_of(t, 0, 0.0, TEST_FRACTION) == s) for s in ("train", "test")}
        for split in ("train", "test"):
            files = sorted((shards / split / domain).glob("*.ds"))
            assert len(files) == 2  # --tasks 2
            got = [d for f in files for d in _documents(f)]
            assert all(d[-1] == eos for d in got)  # an eos after every document
            assert sorted(tokenizer.decode(d[:-1].tolist()) for d in got) == expected[split]
            assert manifest["documents"][split][domain] == len(expected[split])
            assert manifest["tokens"][split][domain] == sum(len(d) for d in got)


def test_tokenize_options_are_checked(inputs: dict[str, str], tokenizer_dir: Path, shards: Path, tmp_path: Path) -> None:
    base = ["data", "tokenize", "--tokenizer", str(tokenizer_dir), "--out", str(tmp_path / "s")]
    assert main([*base, "--splits", str(tmp_path), "--test-fraction", "0.1"]) == 2  # an --input option
    assert main([*base, *_input_args(inputs), "--partition", "cpu"]) == 2  # a slurm option, local executor
    assert main([*base, *_input_args(inputs), "--executor", "slurm", "--partition", "cpu"]) == 2  # no --time
    assert main([*base, "--input", f"ja={tmp_path / 'none' / '*.jsonl.gz'}"]) == 2  # a glob matching nothing
    assert not (tmp_path / "s").exists()
    # Rerunning into the same folder with another split of the documents is refused.
    args = _tokenize_args(inputs, tokenizer_dir, shards)
    assert main([*args[:-1], "0.2"]) == 2


# ---------------------------------------------------------------------------- the Slurm executor
def test_slurm_executor_submits_an_array_then_the_manifest_job(inputs: dict[str, str], tokenizer_dir: Path,
                                                               shards: Path, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """sbatch is mocked: the array and the manifest job after it are submitted, nothing runs; then each
    array task and the manifest job run here the way Slurm starts them (launch_pickled_pipeline) and
    produce the local build's shards and manifest."""
    import dill
    from datatrove.executor import slurm

    submitted: list[tuple[str, tuple[str, ...]]] = []

    def sbatch(script: str, retriever: object, *args: str) -> str:
        submitted.append((script, args))
        return str(100 + len(submitted))

    monkeypatch.setattr(slurm, "launch_slurm_job", sbatch)
    out = tmp_path / "shards"
    assert main([*_tokenize_args(inputs, tokenizer_dir, out), "--executor", "slurm", "--partition", "cpu",
                 "--time", "02:00:00", "--slurm-arg", "account=du", "--workers", "4"]) == 0
    assert not (out / "manifest.json").exists()  # submitted, not run
    array, manifest_job = submitted[0], submitted[2]  # [1] and [3]: datatrove's stats merges
    tasks = 2 * 3 * 2  # (train, test) x 3 domains x 2 tasks
    for line in ("#SBATCH --partition=cpu", "#SBATCH --time=02:00:00", f"#SBATCH --array=0-{tasks - 1}%4",
                 "#SBATCH --account=du", "#SBATCH --job-name=drop-upcycling-shards", "launch_pickled_pipeline"):
        assert line in array[0], line
    if sys.prefix != sys.base_prefix:  # the jobs run in this virtual environment
        assert f"source {Path(sys.prefix) / 'bin' / 'activate'}" in array[0]
    assert "--qos" not in array[0]
    assert "#SBATCH --job-name=drop-upcycling-shards-manifest" in manifest_job[0]
    assert "--dependency=afterok:101" in manifest_job[1]

    environ, handler = dict(os.environ), signal.getsignal(signal.SIGUSR1)
    monkeypatch.setattr(slurm, "expand_slurm_nodelist", lambda nodelist: ["node1"])
    try:
        os.environ["SLURM_NODELIST"] = "node1"
        for folder, n in (("logs", tasks), ("logs-manifest", 1)):
            for i in range(n):
                os.environ["SLURM_ARRAY_TASK_ID"] = str(i)
                with open(out / folder / "executor.pik", "rb") as f:
                    dill.load(f).run()
    finally:
        os.environ.clear()
        os.environ.update(environ)
        signal.signal(signal.SIGUSR1, handler)
    built, local = (json.loads((d / "manifest.json").read_text()) for d in (out, shards))
    assert built["tokens"] == local["tokens"] and built["tokenizer"] == local["tokenizer"]
    for f in sorted(shards.glob("*/*/*.ds")):
        assert (out / f.relative_to(shards)).read_bytes() == f.read_bytes()


# ---------------------------------------------------------------------------- training on the shards
def test_upcycled_seed_trains_on_the_shards(shards: Path, moe_seed: Path, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    _single_process(monkeypatch)
    assert (moe_seed / "tokenizer.json").read_bytes() == (shards / "tokenizer" / "tokenizer.json").read_bytes()
    config = _run_config(shards, init=str(moe_seed), model=None)
    assert _train(config, tmp_path / "run.yaml", "--out", str(tmp_path / "out")) == 0
    rows = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3] and all(np.isfinite(r["loss"]) for r in rows)
    final = tmp_path / "out" / "checkpoints" / "step-00000003"
    assert sha256_file(final / "tokenizer.json") == TokenShards.load(shards).tokenizer_sha256


def test_epochs_message(shards: Path, caplog: pytest.LogCaptureFixture) -> None:
    steps = 5000
    run = TrainConfig.from_mapping(_run_config(shards, steps=steps))
    with caplog.at_level(logging.WARNING, logger="drop_upcycling.train"):
        reader, _ = build_reader(run, run.model_config(), 0, 1)
    sequences = steps * 256 // 32
    (message,) = [r.getMessage() for r in caplog.records if "epochs per domain" in r.getMessage()]
    assert f"reads {sequences * 32:,} tokens" in message
    for domain, weight in WEIGHTS.items():
        assert reader.weights[domain] == pytest.approx(weight / sum(WEIGHTS.values()))
        epochs = sequences * reader.weights[domain] / reader.sequences(domain)
        assert epochs > 1 and f"{domain} {epochs:.2f}" in message
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="drop_upcycling.train"):
        build_reader(TrainConfig.from_mapping(_run_config(shards, steps=1)), run.model_config(), 0, 1)
    assert not [r for r in caplog.records if "epochs per domain" in r.getMessage()]


# ---------------------------------------------------------------------------- refusals, one line each
def _refusal(config: dict, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, match: str) -> str:
    _single_process(monkeypatch)
    tmp_path.mkdir(parents=True, exist_ok=True)
    with pytest.raises(UserError, match=match) as e:
        _train(config, tmp_path / "run.yaml", "--out", str(tmp_path / "out"))
    assert "\n" not in str(e.value)
    assert not (tmp_path / "out" / "metrics.jsonl").exists()
    return str(e.value)


def test_another_tokenizer_than_the_init_checkpoints_is_refused(shards: Path, moe_seed: Path, texts: dict,
                                                               tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    other = tmp_path / "other"
    shutil.copytree(moe_seed, other)
    tok = json.loads((other / "tokenizer.json").read_text())
    tok["model"]["vocab"] = {k: (v + 1) % len(tok["model"]["vocab"]) for k, v in tok["model"]["vocab"].items()}
    (other / "tokenizer.json").write_text(json.dumps(tok))  # same size, other ids
    message = _refusal(_run_config(shards, init=str(other), model=None), monkeypatch, tmp_path,
                       "is not the tokenizer of init checkpoint")
    assert f"drop-upcycling data tokenize --tokenizer {other}" in message


def test_the_built_in_corpus_refuses_an_init_with_another_tokenizer(corpus_dir: Path, moe_seed: Path, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """The issue's silent failure: an llm-jp seed trained on the built-in corpus's own BPE ids."""
    data = {"corpus": str(corpus_dir), "pinned": False, "cache_dir": str(tmp_path / "cache"), "vocab_size": 600,
            "max_docs_per_domain": 150}
    _refusal(_run_config("", init=str(moe_seed), model=None, data=data), monkeypatch, tmp_path,
             "the corpus's tokenizer .* is not the tokenizer of init checkpoint")


def test_ids_beyond_the_vocabulary_are_refused(shards: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    vocab = TokenShards.load(shards).vocab_size
    _refusal(_run_config(shards, model={"base": "tiny-moe", "vocab_size": vocab - 1}), monkeypatch, tmp_path,
             f"{vocab} ids: more than the model's vocabulary of {vocab - 1}")
    # A shard whose ids are not its manifest's tokenizer's (e.g. swapped in from another build).
    copy = tmp_path / "copy"
    shutil.copytree(shards, copy)
    victim = sorted((copy / "train" / "en").glob("*.ds"))[-1]
    tokens = np.memmap(victim, dtype="<u2", mode="r+")
    tokens[-1] = VOCAB + 5
    tokens.flush()
    del tokens
    _refusal(_run_config(copy), monkeypatch, tmp_path / "b", f"shard {victim} holds token id {VOCAB + 5}, outside")


def test_bad_data_sections_are_refused(shards: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _refusal(_run_config(shards, data={"shards": str(shards), "corpus": "x"}), monkeypatch, tmp_path,
             "data.corpus belong to the built-in corpus: give one or the other")
    _refusal(_run_config(tmp_path), monkeypatch, tmp_path / "a", "has no manifest.json")
    _refusal(_run_config(shards, data={"shards": str(shards), "weights": {"fr": 1.0}}), monkeypatch, tmp_path / "b",
             "no domain fr in train")
    _refusal(_run_config(shards, data={"shards": str(shards), "split": "validation"}), monkeypatch, tmp_path / "c",
             "no validation split")


# ---------------------------------------------------------------------------- the recipes: DATA=DIR
def test_recipes_take_data_dir(shards: Path, moe_seed: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    base = REPO / "recipes" / "configs" / "8x1.5b.yaml"
    recipe = resolve(base, "du0.5", data=str(shards), weights={"ja": 0.5, "en": 0.4, "code": 0.1})
    assert recipe.train["data"] == {"shards": str(shards), "weights": {"ja": 0.5, "en": 0.4, "code": 0.1}}
    assert resolve(base, "fs", data=str(shards)).train["data"] == {"shards": str(shards)}
    assert recipes_main([str(base), "du0.5", "--runs", str(tmp_path), "--write-dir", str(tmp_path), "--data",
                         str(shards), "--data-weights", "ja=0.5,en=0.4,code=0.1"]) == 0
    written = yaml.safe_load((tmp_path / "8x1.5b_du0.5.yaml").read_text())
    assert written["data"] == {"shards": str(shards), "weights": {"ja": 0.5, "en": 0.4, "code": 0.1}}
    assert recipes_main([str(base), "du0.5", "--data-weights", "ja"]) == 2
    # Before anything runs, the launcher checks the shards against each recipe's model and the dense seed:
    # the 8x1.5B model's 48,640 ids fit; the seed's tokenizer is the shards'.
    dense = moe_seed.parent / "dense"
    assert recipes_main([str(base), "du0.5", "fs", "--data", str(shards), "--check-shards", "--dense",
                         str(dense)]) == 0
    tiny = tmp_path / "tiny.yaml"
    tiny.write_text(yaml.safe_dump({**_run_config(""), "model": {"base": "tiny-moe", "vocab_size": 300},
                                    "data": {}}))
    assert recipes_main([str(tiny), "fs", "--data", str(shards), "--check-shards"]) == 2
    assert "more than the model's vocabulary of 300" in capsys.readouterr().err


def test_run_script_takes_data_and_data_weights(shards: Path, tmp_path: Path) -> None:
    env = {**os.environ, "PYTHON": sys.executable, "GPUS_PER_NODE": "0", "DATA": str(shards),
           "DATA_WEIGHTS": "ja=0.5,en=0.4,code=0.1", "RUNS": str(tmp_path)}
    env.pop("NNODES", None)
    res = subprocess.run(["bash", str(REPO / "recipes" / "run_8x1.5B.sh"), "--dry-run", "du0.5"], env=env,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "steps             119,210" in res.stdout
    env["DATA_WEIGHTS"] = "ja=x"
    res = subprocess.run(["bash", str(REPO / "recipes" / "run_8x1.5B.sh"), "--dry-run", "du0.5"], env=env,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "data weights must be DOMAIN=WEIGHT" in res.stderr
