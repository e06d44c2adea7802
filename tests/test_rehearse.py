"""``recipes/run_<size>.sh --rehearse``: the paper recipes' whole path on CPU, as CI runs it for every size.

The slow tests run the launcher itself (``bash recipes/run_8x152M.sh --rehearse``) on the synthetic corpus
and check what it leaves: a resumed run that logged every step once, checkpoints that transformers loads
with the recipe's experts and top-k, shards made with the seed's tokenizer, lm-eval rows. The fast ones
cover the pieces a rehearsal of three sizes cannot vary: the shrunk shapes, the user's own inputs, the
folder it replaces, the errors.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from drop_upcycling import rehearse
from drop_upcycling.configs import MODEL_CONFIGS, load_yaml, model_config_from_mapping
from drop_upcycling.errors import UserError
from drop_upcycling.fsio import sha256_file

REPO = Path(__file__).resolve().parents[1]
SIZES = {"8x152M": "8x152m", "8x1.5B": "8x1.5b", "8x3.7B": "8x3.7b"}  # launcher -> recipe (folder) name


def _launcher_env(tmp_path: Path) -> dict[str, str]:
    """The launcher's environment: outputs and every cache under tmp_path, offline, this interpreter."""
    return {**os.environ, "RUNS": str(tmp_path / "runs"), "DROP_UPCYCLING_CACHE": str(tmp_path / "cache"),
            "PYTHON": sys.executable, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false"}


TIMEOUT_S = 900  # a hang guard: a rehearsal takes about a minute on 2 idle cores


def _launch(size: str, tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    """Run a launcher; past the timeout it gets SIGTERM (the rehearsal then stops torchrun and its ranks)."""
    ignored = ("DROP_UPCYCLING_CORPUS", "REHEARSE_INPUT", "DATA", "DATA_WEIGHTS", "DENSE_CKPT", "BTX_SOURCES")
    env = {k: v for k, v in _launcher_env(tmp_path).items() if k not in ignored}
    cmd = ["bash", str(REPO / "recipes" / f"run_{size}.sh"), *args]
    with subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as proc:
        try:
            out, err = proc.communicate(timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.terminate()
            out, err = proc.communicate(timeout=60)
            pytest.fail(f"{' '.join(cmd)} ran past {TIMEOUT_S} s:\n{out[-3000:]}{err[-3000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


# ============================================================================ the launchers, end to end
@pytest.mark.parametrize("size", list(SIZES))
def test_rehearsal_runs_the_recipe_end_to_end(size: str, corpus_dir: Path, tmp_path: Path) -> None:
    proc = _launch(size, tmp_path, "--rehearse", "--corpus", str(corpus_dir), "--unpinned")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    root = tmp_path / "runs" / "rehearsal" / SIZES[size]
    assert f"rehearsal of {size} passed" in proc.stdout.splitlines()[-1] and str(root) in proc.stdout.splitlines()[-1]
    assert "$ OMP_NUM_THREADS=1 python -m torch.distributed.run" in proc.stdout  # each step prints its command
    assert not (tmp_path / "runs" / "configs").exists()  # nothing outside the rehearsal's folder
    base = load_yaml(REPO / "recipes" / "configs" / f"{SIZES[size]}.yaml")
    recipe_moe = model_config_from_mapping(base["model"])
    seed = root / "dense" / f"dense-{SIZES[size].partition('x')[2]}"
    tokenizer_sha = sha256_file(seed / "tokenizer.json")

    manifest = json.loads((root / "shards" / "manifest.json").read_text())
    assert manifest["tokenizer"]["sha256"] == tokenizer_sha

    total = rehearse.STEPS + rehearse.MORE_STEPS
    for slug in rehearse.DEFAULT_METHODS:
        run = root / f"{SIZES[size]}_{slug}"
        steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert steps == list(range(1, total + 1))  # resumed, not restarted: no gap, no repeat
        resumes = json.loads((run / "run.json").read_text())["resumes"]
        assert [r["step"] for r in resumes] == [rehearse.STEPS]
        config = load_yaml(root / "configs" / f"{SIZES[size]}_{slug}.yaml")
        kept = set(base) - set(rehearse.SHRUNK_KEYS) - {"data"}
        assert {k: config[k] for k in kept} == {k: base[k] for k in kept}  # the recipe's own settings
        assert config["data"]["shards"] == str(root / "shards") and config["ep"] == 2
        checkpoints = sorted((run / "checkpoints").glob("step-*"))
        assert checkpoints[-1].name == f"step-{total:08d}" and any(c.name == f"step-{rehearse.STEPS:08d}"
                                                                     for c in checkpoints)
        for ckpt in (root / "upcycled" / f"{SIZES[size]}_{slug}", *checkpoints):
            _check_loads(ckpt, recipe_moe.num_experts, recipe_moe.num_experts_per_tok, tokenizer_sha)

    import csv

    with open(root / "eval" / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert {r["checkpoint"] for r in rows} == {f"{SIZES[size]}_{slug}__step-{total:08d}"
                                               for slug in rehearse.DEFAULT_METHODS}
    assert all(r["n"] for r in rows)
    summary = json.loads((root / rehearse.MARKER).read_text())
    assert summary["passed"] is True and list(summary["runs"]) == list(rehearse.DEFAULT_METHODS)


def _check_loads(ckpt: Path, experts: int, top_k: int, tokenizer_sha: str) -> None:
    """transformers loads the checkpoint, offline, as the recipe's MoE shape, with the seed's tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(ckpt, local_files_only=True)
    assert config.model_type == "mixtral"
    assert (config.num_local_experts, config.num_experts_per_tok) == (experts, top_k)
    assert (config.hidden_size, config.num_hidden_layers) == (rehearse.HIDDEN, rehearse.LAYERS)
    model = AutoModelForCausalLM.from_pretrained(ckpt, local_files_only=True)
    assert model.config.vocab_size == config.vocab_size
    assert sha256_file(ckpt / "tokenizer.json") == tokenizer_sha


# ============================================================================ the pieces
@pytest.mark.parametrize("name", ["moe-8x152m", "moe-8x1.5b", "moe-8x3.7b"])
def test_shrunk_shapes_keep_the_layer_kinds(name: str) -> None:
    big = MODEL_CONFIGS[name]
    small = model_config_from_mapping(rehearse.shrink_model_spec(name, "test"))
    assert (small.num_experts, small.num_experts_per_tok, small.rope_theta) == (
        big.num_experts, big.num_experts_per_tok, big.rope_theta)
    assert small.hidden_size % small.num_attention_heads == 0
    gqa = big.num_attention_heads // big.num_key_value_heads
    assert small.num_attention_heads // small.num_key_value_heads == min(gqa, small.num_attention_heads)
    assert abs(small.intermediate_size / small.hidden_size - big.intermediate_size / big.hidden_size) < 0.1
    assert 512 <= small.vocab_size <= 1024
    assert small.param_counts()["total"] < 2_000_000


def test_shrunk_run_keeps_the_recipe_and_shrinks_the_batch() -> None:
    base_path = REPO / "recipes" / "configs" / "8x152m.yaml"
    base = load_yaml(base_path)
    run = rehearse.shrink_run(base, base_path)
    assert {k: v for k, v in run.items() if k not in rehearse.SHRUNK_KEYS} == {
        k: v for k, v in base.items() if k not in rehearse.SHRUNK_KEYS}
    assert run["ep"] == rehearse.NPROC and run["steps"] == rehearse.STEPS and run["train_tokens"] is None
    assert run["global_batch_tokens"] == rehearse.SEQ_LEN * base["micro_batch_size"] * rehearse.ACCUM


def test_own_inputs_become_the_rehearsal_documents(tmp_path: Path) -> None:
    inputs = {}
    for domain, word in (("ja", "日本語の文です"), ("en", "an english sentence")):
        path = tmp_path / f"{domain}.jsonl"
        path.write_text("".join(json.dumps({"text": f"{word} {i} " * 5}, ensure_ascii=False) + "\n"
                                for i in range(110)) + "not json\n", encoding="utf-8")
        inputs[domain] = str(path)
    opts = rehearse.Options(size="8x152M", base=REPO / "recipes" / "configs" / "8x152m.yaml", dense_name="d",
                            methods=("nu",), runs=tmp_path / "runs",
                            inputs=rehearse.parse_inputs([f"{d}={p}" for d, p in inputs.items()]), docs=100)
    counts = rehearse.write_documents(opts, tmp_path / "jsonl")
    assert set(counts["train"]) == {"ja", "en"}
    assert {d: counts["train"][d] + counts["test"][d] for d in inputs} == {"ja": 100, "en": 100}
    assert rehearse.mix_weights(load_yaml(opts.base), ["ja", "en"]) is None  # the recipe's weights name other domains
    with pytest.raises(UserError, match="DOMAIN=PATH"):
        rehearse.parse_inputs(["ja.jsonl"])
    with pytest.raises(UserError, match="does not exist"):
        rehearse.parse_inputs([f"ja={tmp_path / 'missing.jsonl'}"])


def test_replaces_only_a_rehearsal_folder(tmp_path: Path) -> None:
    opts = rehearse.Options(size="8x152M", base=REPO / "recipes" / "configs" / "8x152m.yaml", dense_name="d",
                            methods=("nu",), runs=tmp_path)
    rehearsal = rehearse.Rehearsal(opts)
    rehearsal.fresh_root()
    (opts.root / "old.txt").write_text("from the last rehearsal")
    rehearse.Rehearsal(opts).fresh_root()
    assert not (opts.root / "old.txt").exists() and (opts.root / rehearse.MARKER).is_file()
    (opts.root / rehearse.MARKER).unlink()
    (opts.root / "mine.txt").write_text("not a rehearsal's")
    with pytest.raises(UserError, match="not a rehearsal's folder"):
        rehearse.Rehearsal(opts).fresh_root()
    assert (opts.root / "mine.txt").is_file()


def test_a_failing_step_is_named_with_its_one_line_error(tmp_path: Path) -> None:
    steps = rehearse.Steps(tmp_path, {})
    steps.run("fine", [sys.executable, "-c", "print('hello')"])
    failing = [sys.executable, "-c", "import sys; print('noise'); print('drop-upcycling train: error: rank 0: boom', "
               "file=sys.stderr); sys.exit(2)"]
    with pytest.raises(rehearse.StepFailed) as e:
        steps.run("train x", failing)
    assert e.value.step == "train x"
    assert e.value.why.startswith("drop-upcycling train: error: rank 0: boom (exit code 2; log: ")
    assert [d["step"] for d in steps.done] == ["fine"] and (tmp_path / "logs" / "01-fine.log").is_file()


def test_progress_of_a_broken_resume_is_named() -> None:
    assert rehearse._ranges([1, 2, 3, 4, 3, 4, 5]) == "1-4, 3-5"
    assert rehearse._ranges([]) == "none"


def test_bad_method_is_one_line_and_exit_2(tmp_path: Path) -> None:
    proc = _launch("8x152M", tmp_path, "--rehearse", "nope")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and "unknown method 'nope'" in proc.stderr
    assert not (tmp_path / "runs").exists()


def test_help_names_the_rehearsal(tmp_path: Path) -> None:
    proc = _launch("8x1.5B", tmp_path, "--help")
    assert proc.returncode == 0 and "--rehearse" in proc.stdout and "methods: fs nu" in proc.stdout
