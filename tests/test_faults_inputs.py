"""Bad input is one line and exit code 2, before anything is written or loaded, and nothing is lost silently.

Each test feeds one kind of malformed input through the command line and checks the contract of
``drop_upcycling.errors.UserError``: exit code 2, one stderr line naming the file (or option), the
key and the value, and no output left behind. Inputs are built here (tiny checkpoints, small count
tables, a few JSONL lines), so the tests need no corpus, no network and no GPU.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from test_curves import write_run

from drop_upcycling.cli import main
from drop_upcycling.configs import TrainConfig
from drop_upcycling.count_routing import chunk_length
from drop_upcycling.errors import UserError
from drop_upcycling.routing_csv import COUNT_COLUMNS, read_counts


def _one_line_error(capsys: pytest.CaptureFixture, *fragments: str) -> str:
    """The CLI's error: exactly one line on stderr, holding every fragment."""
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in err, err
    return err


# ---------------------------------------------------------------------------- class 3: config.json and YAML
CONFIG_JSON_CASES: dict[str, tuple[object, str]] = {
    # case -> (new value of the key, or the whole file when the key is None; what the line must say)
    "string where an int belongs": ({"hidden_size": "64"}, "hidden_size must be an integer >= 1, got '64'"),
    "null where an int belongs": ({"hidden_size": None}, "hidden_size must be an integer >= 1, got None"),
    "zero heads": ({"num_attention_heads": 0}, "num_attention_heads must be an integer >= 1, got 0"),
    "zero layers": ({"num_hidden_layers": 0}, "num_hidden_layers must be an integer >= 1, got 0"),
    "negative vocabulary": ({"vocab_size": -5}, "vocab_size must be an integer >= 1, got -5"),
    "fractional width": ({"intermediate_size": 1.5}, "intermediate_size must be an integer >= 1, got 1.5"),
    "bool where an int belongs": ({"num_key_value_heads": True}, "num_key_value_heads must be an integer >= 1"),
    "string experts": ({"num_local_experts": "4"}, "num_local_experts must be an integer >= 1, got '4'"),
    "string epsilon": ({"rms_norm_eps": "abc"}, "rms_norm_eps must be a number > 0, got 'abc'"),
    "zero context": ({"max_position_embeddings": 0}, "max_position_embeddings must be an integer >= 1, got 0"),
    "string bool": ({"tie_word_embeddings": "yes"}, "tie_word_embeddings must be true or false, got 'yes'"),
    "list instead of an object": ({"rope_parameters": [1]}, "rope_parameters must be a mapping"),
    "list in our own section": ({"drop_upcycling": [1]}, "drop_upcycling must be a mapping"),
    "unknown key in our own section": ({"drop_upcycling": {"aux_mode": "global"}}, "drop_upcycling.aux_mode"),
    "null top-k": ({"num_experts_per_tok": None}, "num_experts_per_tok must be an integer >= 1, got None"),
    "linear rope scaling": ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "rope_scaling 'linear'"),
    "another activation": ({"hidden_act": "gelu"}, "hidden_act 'gelu' is not supported"),
    "a list, not an object": ([{"model_type": "llama"}], "must hold a JSON object, got list"),
}


@pytest.mark.parametrize("case", list(CONFIG_JSON_CASES))
def test_bad_checkpoint_config_json(case: str, tiny_dense_dir: Path, tmp_path: Path,
                                    capsys: pytest.CaptureFixture) -> None:
    """A checkpoint whose config.json holds a wrong type or range: one line naming the file, key and value."""
    change, message = CONFIG_JSON_CASES[case]
    src = shutil.copytree(tiny_dense_dir, tmp_path / "src")
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps(change if isinstance(change, list) else {**config, **change}))
    assert main(["upcycle", str(src), str(tmp_path / "out"), "--dry-run"]) == 2
    _one_line_error(capsys, str(src / "config.json"), message)
    assert not (tmp_path / "out").exists()


BASE_RUN = {  # a valid run whose plan (--dry-run) is printed without reading any data
    "model": {"base": "tiny-moe", "vocab_size": 128}, "seq_len": 32, "global_batch_tokens": 256,
    "micro_batch_size": 2, "lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 2, "seed": 5, "steps": 2, "gpus_per_node": 1,
}
YAML_CASES: dict[str, tuple[dict, str]] = {
    "null where an int belongs": ({"seq_len": None}, "seq_len must be an integer >= 1, got None"),
    "null learning rate": ({"lr": None}, "lr must be a number > 0, got None"),
    "null keep_last": ({"keep_last": None}, "keep_last must be an integer >= 1, got None"),
    "string where an int belongs": ({"seq_len": "long"}, "seq_len must be an integer >= 1, got 'long'"),
    "bool where an int belongs": ({"steps": True}, "steps must be an integer >= 1 or null, got True"),
    "int where a path belongs": ({"init": 5}, "init must be a non-empty string or null, got 5"),
    "beta out of range": ({"beta1": 1.5}, "beta1 must be a number in [0, 1), got 1.5"),
    "negative eps": ({"eps": -1}, "eps must be a number > 0, got -1"),
    "list instead of a model": ({"model": ["tiny-moe"]}, "model must be a model name, a path or a mapping"),
    "string model width": ({"model": {"base": "tiny-moe", "hidden_size": "wide"}},
                           "model.hidden_size must be an integer >= 1, got 'wide'"),
    "zero model layers": ({"model": {"base": "tiny-moe", "num_hidden_layers": 0}},
                          "model.num_hidden_layers must be an integer >= 1, got 0"),
    "bool expert count": ({"model": {"base": "tiny-moe", "num_experts": True}},
                          "model.num_experts must be an integer >= 0, got True"),
    "int model base": ({"model": {"base": 5}}, "model.base must be a non-empty string, got 5"),
    "list instead of data": ({"data": [1, 2]}, "data must be a mapping (key: value), got [1, 2]"),
    "unknown data key": ({"data": {"corpra": "x"}}, "unknown data field(s) data.corpra"),
    "string data vocabulary": ({"data": {"vocab_size": "big"}}, "data.vocab_size must be an integer >= 1, got 'big'"),
    "list of weights": ({"data": {"weights": [1, 2]}}, "data.weights must be a mapping"),
    "negative weight": ({"data": {"weights": {"c4": -1}}}, "data.weights.c4 must be a number >= 0, got -1"),
    "unknown key": ({"bogus": 1}, "unknown training field(s) bogus"),
}


@pytest.mark.parametrize("case", list(YAML_CASES))
def test_bad_training_yaml(case: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A training YAML with a wrong type, range or key: one line naming the file, key and value, even for
    --dry-run (which reads nothing else)."""
    change, message = YAML_CASES[case]
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({**BASE_RUN, **change}))
    assert main(["train", str(path), "--dry-run", "--out", str(tmp_path / "out")]) == 2
    _one_line_error(capsys, str(path), message)
    assert not (tmp_path / "out").exists()


def test_valid_yaml_values_still_load(tmp_path: Path) -> None:
    """YAML 1.1 reads ``2e-4`` as a string: numbers written so stay accepted; a command-line override is
    named as such; every TrainConfig field has a spec."""
    from drop_upcycling.configs import TRAIN_SPECS

    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({**BASE_RUN, "lr": "2e-4", "min_lr": "2e-5", "train_tokens": "1e6", "steps": None,
                                    "model": {"base": "tiny-moe", "rms_norm_eps": "1e-6"}}))
    run = TrainConfig.from_yaml(path)
    assert (run.lr, run.train_tokens, run.model["rms_norm_eps"]) == (2e-4, 1_000_000, 1e-6)
    assert run.model_config().rms_norm_eps == 1e-6
    with pytest.raises(UserError, match="command line: ep must be an integer >= 1, got 0"):
        TrainConfig.from_yaml(path, ep=0)
    assert set(TRAIN_SPECS) == {f.name for f in dataclasses.fields(TrainConfig)}


# ---------------------------------------------------------------------------- class 7: analysis inputs
def _counts(experts: int = 4, layers: int = 2, model: str = "NU-m") -> pd.DataFrame:
    """Counts of one model, two domains: expert e of layer l has 10 + 3e + l assignments (3 distinct tokens)."""
    return pd.DataFrame([
        {"model": model, "domain": d, "layer": layer, "expert": e, "assignments": 10 + 3 * e + layer,
         "distinct_tokens": 3}
        for d in ("c4", "ja_mc4") for layer in range(layers) for e in range(experts)
    ], columns=COUNT_COLUMNS)


def _set(df: pd.DataFrame, row: int, col: str, value: object) -> pd.DataFrame:
    df = df.astype({col: object})
    df.loc[row, col] = value
    return df


def _drop(**where: object) -> Callable[[pd.DataFrame], pd.DataFrame]:
    def mutate(df: pd.DataFrame) -> pd.DataFrame:
        mask = pd.Series(True, index=df.index)
        for col, value in where.items():
            mask &= df[col] == value
        return df[~mask]
    return mutate


COUNTS_CASES: dict[str, tuple[Callable[[pd.DataFrame], pd.DataFrame], str]] = {
    # The top expert of ja_mc4 (expert 3) has no row in layer 0: it used to be reported as the top expert.
    "one missing row": (_drop(domain="ja_mc4", layer=0, expert=3), "has 3 experts in domain ja_mc4 layer 0 but 4"),
    "an expert missing in one domain": (_drop(domain="ja_mc4", expert=3), "has 3 experts in domain ja_mc4"),
    "a domain missing in one layer": (_drop(domain="ja_mc4", layer=1), "no rows for domain ja_mc4 in layer(s) 1"),
    "a layer missing everywhere": (_drop(layer=0), "no rows for layer(s) 0"),
    "a missing column": (lambda df: df.drop(columns=["assignments"]), "lacks column(s) assignments"),
    "a negative count": (lambda df: _set(df, 3, "assignments", -1), "must hold non-negative integers, got -1 in line 5"),
    "a fractional count": (lambda df: _set(df, 3, "assignments", 2.5), "got 2.5 in line 5"),
    "a word for a count": (lambda df: _set(df, 3, "distinct_tokens", "many"), "got many in line 5"),
    "an empty model name": (lambda df: _set(df, 0, "model", ""), "column model is empty in line 2"),
    "more distinct tokens than assignments": (lambda df: _set(df, 0, "distinct_tokens", 99),
                                              "more distinct tokens (99) than assignments (10)"),
}


@pytest.mark.parametrize("case", list(COUNTS_CASES))
def test_incomplete_or_malformed_counts(case: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Counts with missing rows or bad values are refused in one line; no metrics are written."""
    mutate, message = COUNTS_CASES[case]
    path = tmp_path / "counts.csv"
    mutate(_counts()).to_csv(path, index=False)
    out = tmp_path / "out"
    assert main(["analyze", "routing", "--counts", str(path), "--out", str(out)]) == 2
    _one_line_error(capsys, str(path), message)
    assert not out.exists()


def test_counts_of_a_model_split_over_files_are_checked_together(tmp_path: Path) -> None:
    """One domain per file is fine when together they are complete; a domain short of a layer is not."""
    full = _counts()
    for domain, g in full.groupby("domain"):
        g.to_csv(tmp_path / f"{domain}.csv", index=False)
    out = tmp_path / "out"
    assert main(["analyze", "routing", "--counts", str(tmp_path / "c4.csv"), str(tmp_path / "ja_mc4.csv"),
                 "--out", str(out)]) == 0
    metrics = pd.read_csv(out / "routing_metrics.csv")
    assert metrics["top_expert_ja_mc4"].tolist() == [3, 3]
    _drop(layer=1)(full[full["domain"] == "ja_mc4"]).to_csv(tmp_path / "ja_mc4.csv", index=False)
    with pytest.raises(UserError, match=r"c4\.csv, .*ja_mc4\.csv: model NU-m has no rows for domain ja_mc4"):
        read_counts([tmp_path / "c4.csv", tmp_path / "ja_mc4.csv"])


@pytest.mark.parametrize(("option", "message"), [
    (["--layers", "9"], "no counts for layer(s) 9"),
    (["--layers", "-1"], "no counts for layer(s) -1"),
    (["--models", "FS-m"], "no counts for model(s) FS-m"),
    (["--formats", "jpg"], "figure format must be one of"),
    (["--formats", ","], "figure format must be one of"),
    (["--unused-threshold", "1.5"], "--unused-threshold must be in (0, 1)"),
])
def test_bad_analyze_options_write_nothing(option: list[str], message: str, tmp_path: Path,
                                           capsys: pytest.CaptureFixture) -> None:
    """Every option is checked before the first file is written: no routing_metrics.csv next to an error."""
    path = tmp_path / "counts.csv"
    _counts().to_csv(path, index=False)
    out = tmp_path / "out"
    assert main(["analyze", "routing", "--counts", str(path), "--out", str(out), *option]) == 2
    _one_line_error(capsys, message)
    assert not (out / "routing_metrics.csv").exists()


@pytest.mark.parametrize("chunk_len", [0, -5])
def test_non_positive_chunk_length_is_refused(chunk_len: int, tiny_moe_dir: Path, tmp_path: Path,
                                              capsys: pytest.CaptureFixture) -> None:
    """``--chunk-len 0`` used to route one token at a time without context; now it is refused first."""
    from drop_upcycling.configs import ModelConfig

    with pytest.raises(UserError, match=f"--chunk-len must be >= 1, got {chunk_len}"):
        chunk_length(ModelConfig.from_pretrained(tiny_moe_dir), chunk_len)
    assert main(["routing", str(tiny_moe_dir), "--out", str(tmp_path / "out"), "--chunk-len", str(chunk_len),
                 "--splits", str(tmp_path / "nowhere")]) == 2
    _one_line_error(capsys, f"--chunk-len must be >= 1, got {chunk_len}")
    assert not (tmp_path / "out").exists()


def _run_dir(root: Path) -> Path:
    """The smallest report input: one NU run (metrics.jsonl + run.json)."""
    write_run(root / "runs", "NU-s0", "NU", 0, [5.0, 4.5, 4.0])
    return root


FIRST_BATCH_CASES: dict[str, tuple[str, str]] = {
    "losses is a list": (json.dumps({"losses": [3.0]}), 'expected {"losses"'),
    "no losses key": (json.dumps({"loss": {"0": {"dense-final": 3.0}}}), 'expected {"losses"'),
    "a list, not an object": (json.dumps([1, 2]), 'expected {"losses"'),
    "a loss as a string": (json.dumps({"losses": {"0": {"dense-final": "3.0"}}}),
                           "losses.0.dense-final must be a finite number, got '3.0'"),
    "a seed entry that is a number": (json.dumps({"losses": {"0": 3.0}}), "losses.0 must map checkpoint names"),
    "no dense-final": (json.dumps({"losses": {"0": {"NU": 3.0}}}), "(with dense-final)"),
    "a seed that is not a number": (json.dumps({"losses": {"s0": {"dense-final": 3.0}}}), "'s0' is not a seed"),
    "NaN": ('{"losses": {"0": {"dense-final": NaN}}}', "must be a finite number, got nan"),
    "not JSON": ('{"losses": ', "is not valid JSON"),
}


@pytest.mark.parametrize("case", list(FIRST_BATCH_CASES))
def test_malformed_first_batch_is_refused(case: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A malformed checks/first_batch.json used to be skipped, testing finding (a) against another reference."""
    text, message = FIRST_BATCH_CASES[case]
    root = _run_dir(tmp_path / "run")
    (root / "checks").mkdir()
    (root / "checks" / "first_batch.json").write_text(text)
    assert main(["report", str(root), "--out", str(tmp_path / "report")]) == 2
    _one_line_error(capsys, str(root / "checks" / "first_batch.json"), message)
    assert not (tmp_path / "report").exists()


def test_report_refuses_incomplete_counts(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root = _run_dir(tmp_path / "run")
    (root / "routing" / "NU-m").mkdir(parents=True)
    _drop(domain="ja_mc4", layer=0, expert=3)(_counts()).to_csv(root / "routing" / "NU-m" / "routing_counts.csv",
                                                                  index=False)
    assert main(["report", str(root), "--out", str(tmp_path / "report")]) == 2
    _one_line_error(capsys, "routing_counts.csv: model NU-m has 3 experts in domain ja_mc4 layer 0")
    assert not (tmp_path / "report").exists()


# ---------------------------------------------------------------------------- class 8: corrupt JSONL, devices
GOOD = [json.dumps({"text": f"document {i}: " + "words of text " * 8}) for i in range(120)]
CORRUPT_LINES: dict[str, bytes] = {
    "not JSON": b'{"text": "cut off',
    "invalid UTF-8": b'{"text": "caf\xe9 \xff"}',
    "another key": json.dumps({"body": "x"}).encode(),
    "not an object": json.dumps(["text"]).encode(),
    "a number for the text": json.dumps({"text": 5}).encode(),
    "null text": json.dumps({"text": None}).encode(),
}


def _corpus_input(tmp_path: Path, bad: bytes) -> tuple[Path, Path]:
    """ja: 60 good records, the bad one (line 61), 60 more; en: 120 good records."""
    ja, en = tmp_path / "ja.jsonl", tmp_path / "en.jsonl"
    ja.write_bytes(b"\n".join([*(g.encode() for g in GOOD[:60]), bad, *(g.encode() for g in GOOD[60:])]) + b"\n")
    en.write_text("\n".join(GOOD) + "\n")
    return ja, en


def _corpus_argv(ja: Path, en: Path, out: Path, *extra: str) -> list[str]:
    return ["data", "corpus", "--input", f"ja={ja}", "--input", f"en={en}", "--out", str(out),
            "--val-fraction", "0.2", "--test-fraction", "0.2", *extra]


@pytest.mark.parametrize("case", list(CORRUPT_LINES))
def test_corrupt_jsonl_records_are_counted_or_refused(case: str, tmp_path: Path, capsys: pytest.CaptureFixture,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    """By default the corrupt record is dropped, counted and reported per input, and every record after it is
    kept (datatrove lost the rest of a file at invalid UTF-8); ``--strict`` refuses it in one line."""
    ja, en = _corpus_input(tmp_path, CORRUPT_LINES[case])
    out = tmp_path / "splits"
    with caplog.at_level(logging.WARNING, logger="drop_upcycling"):
        assert main(_corpus_argv(ja, en, out)) == 0
    warnings = [r.getMessage() for r in caplog.records if "dropped" in r.getMessage()]
    assert warnings == [f"input {ja}: dropped 1 of 121 records without a string 'text' field (first: {ja}:61); "
                        "--strict refuses them"]
    documents = json.loads((out / "splits.json").read_text())["documents"]
    assert sum(documents[s]["ja"] for s in documents) == 120  # nothing after the bad line is lost
    capsys.readouterr()
    assert main(_corpus_argv(ja, en, tmp_path / "strict", "--strict")) == 2
    _one_line_error(capsys, f"{ja}:61 is not a record with a string 'text' field")
    assert not (tmp_path / "strict").exists()


@pytest.mark.parametrize(("device", "visible", "message"), [
    ("cuda", 0, "device 'cuda' requested but"),
    ("cuda:3", 1, "device 'cuda:3' requested but only 1 GPU(s) are visible"),
    ("tpu", 0, "unknown device 'tpu'"),
])
@pytest.mark.parametrize("command", ["evaluate", "routing"])
def test_unavailable_device_is_one_line_before_loading(command: str, device: str, visible: int, message: str,
                                                       tiny_moe_dir: Path, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture) -> None:
    """``--device cuda`` on a CPU-only build used to be a traceback from inside the model load (and an
    unknown name silently ran on the CPU); the device is now checked before any checkpoint is read."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: visible > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: visible)

    def must_not_load(*args: object, **kwargs: object) -> None:
        raise AssertionError("a checkpoint was read before the device was checked")

    monkeypatch.setattr("drop_upcycling.checkpoint.CheckpointReader.__init__", must_not_load)
    out = tmp_path / "out"
    assert main([command, str(tiny_moe_dir), "--device", device, "--out", str(out)]) == 2
    _one_line_error(capsys, message)
    assert not out.exists()
