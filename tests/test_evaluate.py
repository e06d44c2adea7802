"""``drop-upcycling evaluate``: the local suite, lm-eval runs on our checkpoints, the CSV, bad input.

The references are independent of lm-eval and of transformers: log-likelihoods computed with our
own :class:`~drop_upcycling.model.CausalLM` in float64, following lm-eval's documented request
layout (rolling windows with the EOS token as prefix; continuation tokens = tokens of
context + choice after the tokens of the context).
"""

from __future__ import annotations

import csv
import itertools
import json
import math
import random
from pathlib import Path

import pytest
import torch

from drop_upcycling.checkpoint import load_model, save_model
from drop_upcycling.cli import main
from drop_upcycling.configs import MODEL_CONFIGS
from drop_upcycling.data import PreparedData, iter_domain_sequences, prepare_all
from drop_upcycling.errors import UserError
from drop_upcycling.evaluate import (
    CSV_COLUMNS,
    PAPER_DIR,
    PAPER_GROUP,
    EvalOptions,
    check_requirements,
    checkpoint_labels,
    evaluate,
    leaf_tasks,
    plan_tasks,
    run_checkpoints,
    task_datasets,
    task_manager,
)
from drop_upcycling.local_suite import (
    LOCAL_GROUP,
    LOCAL_SIZES,
    build_local_suite,
    cloze_items,
    local_task_names,
)
from drop_upcycling.model import CausalLM
from drop_upcycling.upcycle import UpcycleOptions, upcycle

DOMAINS = ("c4", "en_wikipedia", "ja_mc4", "code_stack")
VOCAB = 512
# tiny-dense with the tokenizer's vocabulary and room for a whole CI document in one window.
CFG = MODEL_CONFIGS["tiny-dense"].replace(vocab_size=VOCAB, max_position_embeddings=1024, eos_token_id=0,
                                          bos_token_id=0)


# ---------------------------------------------------------------------------- fixtures
def _train(model: CausalLM, prepared: PreparedData, steps: int, seed: int) -> None:
    """A few AdamW steps on random 64-token windows of the prepared (tokenized) train split, all domains."""
    windows = torch.stack([w for d in DOMAINS for w in itertools.islice(
        iter_domain_sequences(prepared, "train", d, 64), 500)])
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    model.train()
    for _ in range(steps):
        x = windows[torch.randint(0, len(windows), (8,), generator=gen)]
        loss = model(x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


@pytest.fixture(scope="module")
def prepared(corpus_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> PreparedData:
    """The data pipeline on 500 documents per domain: splits, a 512-token BPE, tokenized shards."""
    return prepare_all(corpus=corpus_dir, cache_dir=tmp_path_factory.mktemp("data"), vocab_size=VOCAB,
                       max_docs_per_domain=500, pinned=False)


@pytest.fixture(scope="module")
def suite(prepared: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_local_suite(prepared.splits_dir / "test", tmp_path_factory.mktemp("suite") / "ci", size="ci", seed=0)


def _dense(seed: int) -> CausalLM:
    torch.manual_seed(seed)
    model = CausalLM(CFG)
    model.init_weights(seed=seed)
    with torch.no_grad():  # a non-uniform norm makes the model less trivially symmetric
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return model


@pytest.fixture(scope="module")
def checkpoints(prepared: PreparedData, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A random tiny dense model ("init") and the same model after 30 AdamW steps ("trained")."""
    root = tmp_path_factory.mktemp("ckpt")
    model = _dense(11)
    init = save_model(model, root / "init", tokenizer_from=prepared.tokenizer_dir)
    _train(model, prepared, steps=30, seed=0)
    trained = save_model(model, root / "trained", tokenizer_from=prepared.tokenizer_dir)
    return {"init": init, "trained": trained}


@pytest.fixture(scope="module")
def dense_dir(checkpoints: dict[str, Path]) -> Path:
    return checkpoints["trained"]


def _read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _table(rows: list[dict], checkpoint: str) -> dict[tuple[str, str], float]:
    return {(r["task"], r["metric"]): float(r["value"]) for r in rows if r["checkpoint"] == checkpoint}


# ---------------------------------------------------------------------------- the local suite
def test_cloze_choices_are_distinct_when_documents_repeat_a_continuation() -> None:
    """Boilerplate repeats: a repeated continuation is never a distractor twice, nor beside itself."""
    size = LOCAL_SIZES["ci"]
    n = size.context_chars + size.continuation_chars
    same = "x" * size.continuation_chars

    def doc(i: int, tail: str) -> dict:
        return {"id": f"d{i}", "text": f"{i:03d} " + "w" * (size.context_chars - 4) + tail + " end"}

    docs = [doc(i, same) for i in range(6)] + [doc(6 + i, f"{i}" * size.continuation_chars) for i in range(3)]
    for seed in range(20):
        for item in cloze_items(docs, size, random.Random(seed), "code"):
            assert len(set(item["choices"])) == 4, item
    with pytest.raises(UserError, match="only 3 distinct test documents"):
        cloze_items(docs[:8], size, random.Random(0), "code")
    assert all(len(d["text"]) >= n for d in docs)


def test_local_suite_items_are_faithful_and_seeded(prepared: PreparedData, suite: Path, tmp_path: Path) -> None:
    size = LOCAL_SIZES["ci"]
    test_dir = prepared.splits_dir / "test"
    test_docs = {d: {r["id"]: r["text"] for r in _jsonl(test_dir / f"{d}.jsonl")} for d in DOMAINS}
    group = (suite / f"{LOCAL_GROUP}.yaml").read_text()
    for task in local_task_names(DOMAINS):
        assert task in group
        assert (suite / f"{task}.yaml").is_file()
    for d in DOMAINS:
        ppl = _jsonl(suite / f"du_ppl_{d}.jsonl")
        assert len(ppl) == min(size.ppl_docs, len(test_docs[d]))
        for item in ppl:  # a prefix of a real test document, at most ppl_max_chars long
            assert test_docs[d][item["id"]].startswith(item["text"]) and 0 < len(item["text"]) <= size.ppl_max_chars
        cloze = _jsonl(suite / f"du_cloze_{d}.jsonl")
        assert len(cloze) == size.cloze_items, d
        golds = set()
        for item in cloze:
            doc = test_docs[d][item["id"]]
            assert len(item["choices"]) == 4 and len(set(item["choices"])) == 4
            # context + the gold choice is the document's own text; no other choice is
            assert doc.startswith(item["context"] + item["choices"][item["gold"]])
            assert sum(doc.startswith(item["context"] + c) for c in item["choices"]) == 1
            golds.add(item["gold"])
        assert len(golds) > 1, "the gold position must vary"
    # The same seed gives the same files; another seed other items.
    again = build_local_suite(test_dir, tmp_path / "again", size="ci", seed=0)
    other = build_local_suite(test_dir, tmp_path / "other", size="ci", seed=1)
    for d in DOMAINS:
        assert (again / f"du_cloze_{d}.jsonl").read_text() == (suite / f"du_cloze_{d}.jsonl").read_text()
    assert any((other / f"du_cloze_{d}.jsonl").read_text() != (suite / f"du_cloze_{d}.jsonl").read_text()
               for d in DOMAINS)


# ---------------------------------------------------------------------------- independent references
def _token_logprobs(model: CausalLM, ids: list[int]) -> torch.Tensor:
    """log p(ids[i] | ids[:i]) for i >= 1, in float64."""
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].double()
    return torch.log_softmax(logits[:-1], dim=-1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0]


def _reference_bits_per_byte(model: CausalLM, tok, texts: list[str]) -> float:
    """lm-eval's bits_per_byte: -sum(loglik) / sum(bytes) / ln 2, each text scored after the EOS token."""
    eos = tok.token_to_id("<|endoftext|>")
    total_ll, total_bytes = 0.0, 0
    for text in texts:
        ids = tok.encode(text).ids
        assert len(ids) < CFG.max_position_embeddings  # one window: no rolling overlap to model
        total_ll += float(_token_logprobs(model, [eos, *ids]).sum())
        total_bytes += len(text.encode())
    return -total_ll / total_bytes / math.log(2)


def _reference_acc(model: CausalLM, tok, items: list[dict]) -> float:
    """Fraction of items whose gold choice has the highest summed log-likelihood after the context."""
    correct = 0
    for item in items:
        ctx = tok.encode(item["context"]).ids
        scores = []
        for choice in item["choices"]:
            whole = tok.encode(item["context"] + choice).ids
            lp = _token_logprobs(model, whole)
            scores.append(float(lp[len(ctx) - 1:].sum()))
        correct += int(max(range(4), key=scores.__getitem__) == item["gold"])
    return correct / len(items)


# ---------------------------------------------------------------------------- the key test
def test_naive_upcycled_moe_scores_like_its_dense_parent(dense_dir: Path, prepared: PreparedData, suite: Path,
                                                         tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Function preservation seen through lm-eval: NU == dense on every metric, DU visibly not.

    Runs the CLI the way a user does: the local suite is built from the prepared data (``--data``)
    into the package cache; it must equal the suite built directly (same seed, same items).
    """
    monkeypatch.setenv("DROP_UPCYCLING_CACHE", str(tmp_path / "cache"))
    nu = tmp_path / "nu"
    du = tmp_path / "du"
    upcycle(dense_dir, nu, UpcycleOptions(method="naive", ratio=0.0, num_experts=4, top_k=2, seed=3), progress=False)
    upcycle(dense_dir, du, UpcycleOptions(method="drop", ratio=1.0, num_experts=4, top_k=2, seed=3), progress=False)
    out = tmp_path / "eval"
    rc = main(["evaluate", str(dense_dir), str(nu), str(du), "--suite", "local", "--size", "ci", "--data",
               str(prepared.root), "--out", str(out), "--device", "cpu", "--seed", "0"])
    assert rc == 0
    results = json.loads((out / "trained.json").read_text())
    built = Path(results["drop_upcycling"]["local_suite"])
    assert built.parent == tmp_path / "cache" / "lm_eval_local"
    for f in suite.glob("*.jsonl"):
        assert (built / f.name).read_text() == f.read_text()
    rows = _read_csv(out / "results.csv")
    dense, moe, drop = _table(rows, "trained"), _table(rows, "nu"), _table(rows, "du")
    assert dense.keys() == moe.keys() == drop.keys()
    assert {t for t, _ in dense} == set(local_task_names(DOMAINS))
    for key, value in dense.items():
        if key[1].startswith("acc"):
            assert moe[key] == value, key
        else:  # fp32 sums of the two top-k experts' identical outputs: equal up to rounding
            assert moe[key] == pytest.approx(value, rel=1e-5), key
    # The comparison can fail: re-initialized experts (DU, r = 1) change every perplexity, by far more
    # than the tolerance above (a 30-step model leans little on its FFNs, so "far" is 10x, not 1000x).
    for d in DOMAINS:
        key = (f"du_ppl_{d}", "bits_per_byte")
        assert abs(drop[key] - dense[key]) > 1e-4 * dense[key], (key, dense[key], drop[key])

    # The CSV schema, and lm-eval's numbers against our own float64 model.
    with open(out / "results.csv", newline="") as f:
        assert next(csv.reader(f)) == list(CSV_COLUMNS)
    for r in rows:
        float(r["value"])
        assert int(r["n"]) > 0
        if r["metric"] in ("acc", "acc_norm"):
            assert 0.0 <= float(r["value"]) <= 1.0 and float(r["stderr"]) >= 0.0
    for d in DOMAINS:
        assert {m for t, m in dense if t == f"du_ppl_{d}"} == {"word_perplexity", "byte_perplexity", "bits_per_byte"}
        assert {m for t, m in dense if t == f"du_cloze_{d}"} == {"acc", "acc_norm"}
        n = {r["task"]: int(r["n"]) for r in rows}
        assert n[f"du_ppl_{d}"] == len(_jsonl(suite / f"du_ppl_{d}.jsonl"))
        assert n[f"du_cloze_{d}"] == len(_jsonl(suite / f"du_cloze_{d}.jsonl"))
    assert results["drop_upcycling"]["checkpoint"] == str(dense_dir.resolve())
    assert set(results["results"]) >= set(local_task_names(DOMAINS))

    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(dense_dir / "tokenizer.json"))
    ref = load_model(dense_dir, dtype=torch.float64).eval()
    for d in ("c4", "ja_mc4"):
        texts = [r["text"] for r in _jsonl(suite / f"du_ppl_{d}.jsonl")]
        bpb = _reference_bits_per_byte(ref, tok, texts)
        assert dense[(f"du_ppl_{d}", "bits_per_byte")] == pytest.approx(bpb, rel=1e-5)
        assert dense[(f"du_ppl_{d}", "byte_perplexity")] == pytest.approx(2**bpb, rel=1e-5)
        acc = _reference_acc(ref, tok, _jsonl(suite / f"du_cloze_{d}.jsonl"))
        assert dense[(f"du_cloze_{d}", "acc")] == pytest.approx(acc)


# ---------------------------------------------------------------------------- training helps
def test_briefly_trained_checkpoint_beats_its_random_init(checkpoints: dict[str, Path], suite: Path,
                                                          tmp_path: Path) -> None:
    out = evaluate([checkpoints["init"], checkpoints["trained"]], tmp_path / "eval",
                   EvalOptions(local_dir=suite, device="cpu"))
    rows = _read_csv(out / "results.csv")
    before, after = _table(rows, "init"), _table(rows, "trained")
    for d in DOMAINS:
        key = (f"du_ppl_{d}", "bits_per_byte")
        assert after[key] < 0.95 * before[key], (key, before[key], after[key])


# ---------------------------------------------------------------------------- bad input
def test_not_a_checkpoint(tmp_path: Path, suite: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "empty").mkdir()
    for bad in (tmp_path / "missing", tmp_path / "empty"):
        rc = main(["evaluate", str(bad), "--local-dir", str(suite), "--out", str(tmp_path / "out")])
        err = capsys.readouterr().err
        assert rc == 2 and str(bad) in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_checkpoint_without_tokenizer(tiny_dense_dir: Path, suite: Path,
                                      tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"no tokenizer.*--tokenizer"):
        evaluate([tiny_dense_dir], tmp_path / "out", EvalOptions(local_dir=suite))
    with pytest.raises(UserError, match="holds no tokenizer"):
        evaluate([tiny_dense_dir], tmp_path / "out", EvalOptions(local_dir=suite, tokenizer=tmp_path))
    assert not (tmp_path / "out").exists()


def test_unknown_task(dense_dir: Path, suite: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    rc = main(["evaluate", str(dense_dir), "--suite", "du_ppl_c4,du_ppl_c5", "--local-dir", str(suite),
               "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2 and "unknown lm-eval task 'du_ppl_c5' (did you mean du_ppl_c4" in err
    assert not (tmp_path / "out").exists()
    with pytest.raises(UserError, match=r"unknown lm-eval task 'hellaswag_typo'.*hellaswag"):
        task_manager(plan_tasks("hellaswag_typo", None))


def test_existing_output_is_not_replaced(dense_dir: Path, suite: Path, tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    with pytest.raises(UserError, match="already exists"):
        evaluate([dense_dir], tmp_path / "out", EvalOptions(local_dir=suite))


def test_runs_give_their_latest_checkpoints(dense_dir: Path, tmp_path: Path) -> None:
    """``--runs`` (tox -e eval): each run's ``checkpoints/latest``, labelled RUN__step-N; no run: an error."""
    import shutil

    runs = tmp_path / "runs"
    for run, steps in (("dense", (5, 10)), ("nu", (10,))):
        for step in steps:
            shutil.copytree(dense_dir, runs / run / "checkpoints" / f"step-{step:08d}")
        (runs / run / "checkpoints" / "latest").write_text(f"step-{steps[-1]:08d}\n")
    shutil.copytree(dense_dir, runs / "unfinished" / "checkpoints" / "step-00000001")  # no pointer: skipped
    found = run_checkpoints(runs)
    assert found == [runs / "dense" / "checkpoints" / "step-00000010", runs / "nu" / "checkpoints" / "step-00000010"]
    assert checkpoint_labels(found) == ["dense__step-00000010", "nu__step-00000010"]
    with pytest.raises(UserError, match="no training run"):
        run_checkpoints(tmp_path / "runs" / "unfinished")
    with pytest.raises(UserError, match="given twice"):
        checkpoint_labels([found[0], found[0]])


def test_evaluation_does_not_import_training() -> None:
    """Evaluation reads run folders through :mod:`drop_upcycling.layout`, not the training code."""
    import subprocess
    import sys

    code = ("import sys, drop_upcycling.evaluate, drop_upcycling.local_suite; "
            "sys.exit('drop_upcycling.train' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr


def test_bad_options(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    for args, message in ((["--limit", "0"], "--limit must be > 0"), (["--batch-size", "x"], "--batch-size must be"),
                          ([], "no checkpoint given")):
        rc = main(["evaluate", *(["ckpt"] if args else []), "--out", str(tmp_path / "out"), *args])
        assert rc == 2 and message in capsys.readouterr().err


# ---------------------------------------------------------------------------- the paper suite
PAPER_TASKS = {  # lm-eval 0.4.13 name -> shots (FACTS §5: 4-shot except XL-Sum, lm-eval's 1-shot)
    "openbookqa": 4, "triviaqa": 4, "hellaswag": 4, "squadv2": 4, "xwinograd_en": 4, "gsm8k": 4,
    "ja_leaderboard_jsquad": 4, "ja_leaderboard_xlsum": 1,
    "du_jemhopqa": 4, "du_niilc": 4, "du_wmt20_en_ja": 4, "du_wmt20_ja_en": 4,
}


def test_paper_group_resolves_to_the_papers_tasks() -> None:
    import yaml

    tm = task_manager(plan_tasks("paper", None))
    leaves = leaf_tasks(tm, [PAPER_GROUP])
    assert set(leaves) == set(PAPER_TASKS)
    group = yaml.safe_load((PAPER_DIR / f"{PAPER_GROUP}.yaml").read_text())
    shots = {m["task"]: m["num_fewshot"] for m in group["task"]}
    assert shots == PAPER_TASKS
    hub = task_datasets(tm, leaves)
    assert set(hub) == set(PAPER_TASKS)  # every task reads a Hub dataset
    assert hub["squadv2"][0] == "lighteval/squad_v2" and hub["du_niilc"][0] == "sbintuitions/niilc-qa"


@pytest.mark.paper_eval
def test_every_paper_task_yaml_loads_with_the_paper_eval_extra() -> None:
    """tox -e paper-eval: with the extra installed, every leaf task of the paper group loads in lm-eval
    offline, its ``!function`` hooks imported (XL-Sum's pulls in MeCab), and no requirement is missing."""
    from lm_eval.tasks._yaml_loader import load_yaml

    tm = task_manager(plan_tasks("paper", None))
    leaves = leaf_tasks(tm, [PAPER_GROUP])
    assert set(leaves) == set(PAPER_TASKS)
    check_requirements(leaves)
    for task in leaves:
        config = load_yaml(tm.task_index[task].yaml_path, resolve_func=True)
        assert config["task"] == task
    xlsum = load_yaml(tm.task_index["ja_leaderboard_xlsum"].yaml_path, resolve_func=True)
    assert callable(xlsum["metric_list"][0]["metric"])  # the hook module imported
    import fugashi

    assert fugashi.Tagger().parse("日本語の要約")  # MeCab and its dictionary work


def test_paper_suite_offline_names_the_missing_datasets(dense_dir: Path, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture) -> None:
    import datasets
    import evaluate.config
    import huggingface_hub.constants

    # An empty cache, and the offline flags restored afterwards (the command sets them process-wide).
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "empty_cache")
    monkeypatch.setattr(evaluate.config, "HF_MODULES_CACHE", tmp_path / "empty_modules")
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "HF_EVALUATE_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(var, "1")
    for module, attr in ((datasets.config, "HF_HUB_OFFLINE"), (datasets.config, "HF_DATASETS_OFFLINE"),
                         (huggingface_hub.constants, "HF_HUB_OFFLINE"), (evaluate.config, "HF_EVALUATE_OFFLINE")):
        monkeypatch.setattr(module, attr, getattr(module, attr))
    rc = main(["evaluate", str(dense_dir), "--suite", "paper", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1
    for name in ("allenai/openbookqa", "Rowan/hellaswag", "sbintuitions/JEMHopQA", "lighteval/sacrebleu_manual",
                 "metric squad_v2"):
        assert name in err
    assert not (tmp_path / "out").exists()


def test_our_paper_task_yamls_run_in_lm_eval(dense_dir: Path, tmp_path: Path) -> None:
    """JEMHopQA, NIILC and WMT20 YAMLs end to end in lm-eval, on stand-in data with the Hub schemas.

    Each task is included unchanged and only pointed at local JSON files (plus 4 generated tokens).
    """
    import yaml

    from drop_upcycling.evaluate import _cached_task_manager, evaluate_checkpoint, results_rows

    def jsonl(name: str, rows: list[dict]) -> str:
        (tmp_path / name).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        return str(tmp_path / name)

    qa = [{"qid": str(i), "question": f"日本の首都はどこ？{i}", "answer": "東京"} for i in range(6)]
    niilc = [{"question": f"富士山の高さは？{i}", "answers": ["3776メートル", "3776m"]} for i in range(6)]
    wmt = [{"translation": repr({"en": f"Hello world {i}.", "ja": f"こんにちは世界{i}。"})} for i in range(6)]
    files = {
        "du_jemhopqa": {"train": jsonl("jt.jsonl", qa), "validation": jsonl("jv.jsonl", qa)},
        "du_niilc": {"dev": jsonl("nd.jsonl", niilc), "test": jsonl("nt.jsonl", niilc)},
        "du_wmt20_en_ja": {"test": jsonl("wmt.jsonl", wmt)},
        "du_wmt20_ja_en": {"test": jsonl("wmt.jsonl", wmt)},
    }
    inc = tmp_path / "tasks"
    inc.mkdir()
    for task, data_files in files.items():
        (inc / f"{task}_local.yaml").write_text(yaml.safe_dump({
            "include": str(PAPER_DIR / f"{task}.yaml"), "task": f"{task}_local", "dataset_path": "json",
            "dataset_name": None, "dataset_kwargs": {"data_files": data_files},
            "generation_kwargs": {"until": ["\n"], "do_sample": False, "max_gen_toks": 4}}))
    # The group as du_paper.yaml writes it (per-task shot counts), over the local stand-ins.
    paper = yaml.safe_load((PAPER_DIR / f"{PAPER_GROUP}.yaml").read_text())
    members = [{**m, "task": f"{m['task']}_local", "num_fewshot": 3} for m in paper["task"] if m["task"] in files]
    (inc / "group.yaml").write_text(yaml.safe_dump({"group": "paper_local", "task": members}))
    results = evaluate_checkpoint(dense_dir, _cached_task_manager((str(inc),), False), ["paper_local"], limit=3)
    metrics = {(r["task"], r["metric"]): r for r in results_rows("m", results)}
    assert set(metrics) == {
        ("du_jemhopqa_local", "char_f1"), ("du_jemhopqa_local", "exact_match"),
        ("du_niilc_local", "char_f1"), ("du_niilc_local", "exact_match"),
        ("du_wmt20_en_ja_local", "chrf"), ("du_wmt20_en_ja_local", "char_bleu"),
        ("du_wmt20_ja_en_local", "bleu"), ("du_wmt20_ja_en_local", "chrf"),
    }
    for (_, metric), row in metrics.items():
        assert row["n"] == 3
        assert 0.0 <= row["value"] <= (1.0 if metric in ("char_f1", "exact_match") else 100.0)
    configs = results["configs"]
    assert all(configs[f"{t}_local"]["num_fewshot"] == 3 for t in files)  # the group's override, not the YAML's 4
    assert configs["du_niilc_local"]["fewshot_split"] == "dev"
    assert configs["du_wmt20_en_ja_local"]["doc_to_text"].startswith("英語:")


def test_missing_metric_packages_are_named(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "fugashi" else real(name, *a))
    with pytest.raises(UserError, match="ja_leaderboard_xlsum needs the Python packages fugashi"):
        check_requirements(["openbookqa", "ja_leaderboard_xlsum"])


def test_wmt_metrics_work_on_japanese() -> None:
    """chrF and character BLEU score Japanese without a word segmenter; identical output scores 100."""
    from drop_upcycling.tasks.paper import du_utils

    refs = ["今日は晴れです。", "東京は日本の首都です。"]
    items = list(zip(refs, refs, strict=True))
    assert du_utils.chrf_agg(items) == pytest.approx(100.0)
    assert du_utils.char_bleu_agg(items) == pytest.approx(100.0)
    worse = list(zip(refs, ["今日は雨です。", "大阪は日本の都市です。"], strict=True))
    assert 0 < du_utils.chrf_agg(worse) < 100 and 0 < du_utils.char_bleu_agg(worse) < 100
    assert du_utils.char_f1("東京都", "東京") == pytest.approx(2 * (2 / 2) * (2 / 3) / (1 + 2 / 3))
    rng = random.Random(0)
    assert du_utils.char_f1("".join(rng.sample("abcdef", 6)), "xyz") == 0.0
