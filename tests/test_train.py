"""The trainer end to end with torchrun on 2 gloo processes: loss decreases, SIGKILL + resume is
bitwise, a checkpoint changes expert-parallel size and loads in transformers; bad configs fail early."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import random_model

from drop_upcycling.checkpoint import load_model, save_model
from drop_upcycling.configs import TrainConfig
from drop_upcycling.errors import UserError
from drop_upcycling.memory import plan
from drop_upcycling.methods import MOE_METHODS
from drop_upcycling.parallel import free_port
from drop_upcycling.recipes import resolve, write
from drop_upcycling.train import configure_parser, lr_at
from drop_upcycling.train import run as train_run

REPO = Path(__file__).resolve().parents[1]
BASE = {  # for checks that fail before any data is read
    "model": {"base": "tiny-moe", "vocab_size": 128, "num_hidden_layers": 2},
    "seq_len": 32, "global_batch_tokens": 256, "micro_batch_size": 2,
    "lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 2, "seed": 5,
}


def _torchrun(config: Path, *args: str, nproc: int = 2) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", "-m", "drop_upcycling.train", str(config), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _descendants(pid: int) -> list[int]:
    """Child processes of ``pid``, recursively, from /proc (torchrun starts each rank in its own session)."""
    parents: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        children = parents.get(todo.pop(), [])
        found += children
        todo += children
    return found


def _finish(proc: subprocess.Popen, timeout: float = 240) -> str:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-4000:]
    return out


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _write_config(path: Path, **changes) -> Path:
    path.write_text(yaml.safe_dump({**BASE, **changes}))
    return path


@pytest.fixture(scope="module")
def tiny_recipe(tmp_path_factory: pytest.TempPathFactory, corpus_dir: Path) -> Path:
    """recipes/configs/tiny_moe.yaml with a private data cache and a 300-document slice per domain."""
    root = tmp_path_factory.mktemp("tiny")
    d = yaml.safe_load((REPO / "recipes" / "configs" / "tiny_moe.yaml").read_text())
    d["data"].update(corpus=str(corpus_dir), pinned=False, cache_dir=str(root / "cache"), max_docs_per_domain=300)
    (root / "tiny_moe.yaml").write_text(yaml.safe_dump(d))
    return root / "tiny_moe.yaml"


def _corpus_config(path: Path, recipe: Path, **changes) -> Path:
    """The tiny recipe (synthetic corpus) with ``changes``."""
    path.write_text(yaml.safe_dump({**yaml.safe_load(recipe.read_text()), **changes}))
    return path


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory: pytest.TempPathFactory, tiny_recipe: Path) -> Path:
    """The tiny recipe on the corpus: 8 uninterrupted steps, EP=2 on 2 ranks, checkpoints every 2 (all kept)."""
    root = tmp_path_factory.mktemp("ref")
    config = _corpus_config(root / "run.yaml", tiny_recipe, steps=8, save_every=2, keep_last=10)
    _finish(_torchrun(config, "--ep", "2", "--out", str(root / "out")))
    return root / "out"


def test_sigkill_and_resume_logs_bitwise_the_same_losses(reference_run: Path, tiny_recipe: Path, tmp_path: Path) -> None:
    config = _corpus_config(tmp_path / "run.yaml", tiny_recipe, steps=8, save_every=2, keep_last=2)
    out = tmp_path / "out"
    proc = _torchrun(config, "--ep", "2", "--out", str(out))
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 240
    while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 4):
        assert proc.poll() is None and time.time() < deadline, "the run ended before it could be killed"
        time.sleep(0.02)
    for pid in [proc.pid, *_descendants(proc.pid)]:  # torchrun and both ranks (own sessions): no clean-up
        os.kill(pid, signal.SIGKILL)
    proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    killed_at = len(_metrics(out))
    assert killed_at < 8

    _finish(_torchrun(config, "--ep", "2", "--out", str(out), "--resume"))
    resumed, reference = _metrics(out), _metrics(reference_run)
    assert [r["step"] for r in resumed] == list(range(1, 9))
    for key in ("loss", "lm_loss", "aux_loss", "grad_norm", "lr", "tokens", "expert_load"):
        assert [r[key] for r in resumed] == [r[key] for r in reference], key
    # keep-last-2 and the latest pointer
    ckpts = sorted(p.name for p in (out / "checkpoints").iterdir() if p.name.startswith("step-"))
    assert ckpts == ["step-00000006", "step-00000008"]
    assert (out / "checkpoints" / "latest").read_text().strip() == "step-00000008"
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".")]  # no temp dirs left
    run_json = json.loads((out / "run.json").read_text())
    assert run_json["seed"] == 0 and run_json["ep"] == 2 and "torch" in run_json["versions"]


def test_checkpoint_resumes_with_another_ep_size(reference_run: Path, tiny_recipe: Path, tmp_path: Path) -> None:
    """Written with EP=2, resumed with EP=1 (dp=2): steps 7-8 agree with the EP=2 run to fp32 rounding."""
    out = tmp_path / "out"
    shutil.copytree(reference_run, out)
    (out / "checkpoints" / "latest").write_text("step-00000006\n")
    config = _corpus_config(tmp_path / "run.yaml", tiny_recipe, steps=8, save_every=2, keep_last=10)
    _finish(_torchrun(config, "--ep", "1", "--out", str(out), "--resume"))
    mine, reference = _metrics(out), _metrics(reference_run)
    assert [r["step"] for r in mine] == list(range(1, 9))
    assert mine[:6] == reference[:6]
    for a, b in zip(mine[6:], reference[6:], strict=True):
        for key in ("loss", "lm_loss", "aux_loss", "grad_norm"):
            assert a[key] == pytest.approx(b[key], rel=1e-5), key


def test_checkpoint_is_an_hf_mixtral(reference_run: Path) -> None:
    from transformers import AutoModelForCausalLM

    ckpt = reference_run / "checkpoints" / "step-00000008"
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {"model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"}
    ours = load_model(ckpt).eval()
    hf = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    ids = torch.randint(0, 8192, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, ours(ids).logits, rtol=1e-5, atol=1e-5)
    # Trained: the experts moved away from the random init (seed 0) they started from.
    init = random_model(ours.config, 0)
    w1 = ours.model.layers[0].block_sparse_moe.experts.w1
    assert not torch.equal(w1, init.model.layers[0].block_sparse_moe.experts.w1)


# ---------------------------------------------------------------------------- bad input, the schedule, the plan
def _args(*argv: str):
    import argparse

    parser = argparse.ArgumentParser()
    configure_parser(parser)
    return parser.parse_args(list(argv))


@pytest.mark.parametrize(("changes", "argv", "world", "message"), [
    ({}, ["--ep", "3"], "3", r"number of experts \(4\) is not divisible by the expert-parallel size 3"),
    ({}, ["--ep", "2"], "3", "world size 3 is not divisible by the expert-parallel size 2"),
    ({"init": "/nonexistent/ckpt", "model": None}, [], "1", "init checkpoint /nonexistent/ckpt does not exist"),
    ({"global_batch_tokens": 100}, [], "1", "not a multiple of seq_len"),
    ({"micro_batch_size": 3}, [], "2", "not divisible by 2 ranks x micro batch 3"),
    ({"bogus": 1}, [], "1", "unknown training field"),
])
def test_bad_config_fails_at_start(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, changes: dict, argv: list,
                                   world: str, message: str) -> None:
    monkeypatch.setenv("WORLD_SIZE", world)
    config = _write_config(tmp_path / "run.yaml", steps=2, **changes)
    with pytest.raises(UserError, match=message):
        train_run(_args(str(config), "--out", str(tmp_path / "out"), *argv))
    assert not (tmp_path / "out").exists()


def test_lr_schedule_warmup_then_cosine() -> None:
    run = TrainConfig.from_mapping({**BASE, "steps": 12, "lr": 1.0, "min_lr": 0.1, "warmup_steps": 2})
    assert [lr_at(s, run) for s in (0, 1)] == [0.5, 1.0]
    assert lr_at(2, run) == pytest.approx(1.0)
    assert lr_at(7, run) == pytest.approx(0.55)  # half-way through the cosine
    assert lr_at(12, run) == pytest.approx(0.1)


def test_paper_plan_8x152m() -> None:
    """FACTS.md §4: 500B tokens at 512 x 4096 per step is 238,419 steps; 8 experts on 8 GPUs."""
    run = TrainConfig.from_mapping({"model": "moe-8x152m", "seq_len": 4096, "global_batch_tokens": 512 * 4096,
                                    "train_tokens": 500_000_000_000, "ep": 8, "micro_batch_size": 4})
    p = plan(run)
    assert p["steps"] == 238_419 and p["world_size"] == 8 and p["dp"] == 1 and p["experts_per_rank"] == 1
    assert p["grad_accum"] == 16


def test_every_recipe_loads_and_plans(tmp_path: Path) -> None:
    """Each paper recipe parses, its layout fits its nodes, and its step count is FACTS.md §4's. The MoE
    recipes are a size's base YAML merged with each method's overlay (drop_upcycling.recipes)."""
    configs = sorted((REPO / "recipes" / "configs").glob("*.yaml"))
    configs += [write(resolve(REPO / "recipes" / "configs" / f"{size}.yaml", m.slug), tmp_path)
                for size in ("8x152m", "8x1.5b", "8x3.7b") for m in MOE_METHODS]
    names = {c.stem for c in configs}
    for size in ("8x152m", "8x1.5b", "8x3.7b"):
        assert {f"{size}_{m}" for m in ("fs", "nu", "rnu0.5", "du0.5", "du1.0", "btx")} <= names
    for config in configs:
        run = TrainConfig.from_yaml(config)
        p = plan(run)
        assert p["world_size"] == run.nodes * run.gpus_per_node
        if config.stem.startswith("8x"):
            assert run.lr == 2e-4 and run.min_lr == 2e-5 and run.warmup_steps == 2000 and run.weight_decay == 0.1
            assert p["steps"] == (238_419 if config.stem.startswith("8x152m") else 119_210), config.stem


def test_run_script_dry_run_prints_the_plan() -> None:
    env = {**os.environ, "PYTHON": sys.executable, "GPUS_PER_NODE": "0"}
    env.pop("NNODES", None)
    res = subprocess.run(["bash", str(REPO / "recipes" / "run_8x1.5B.sh"), "--dry-run", "du0.5"], env=env,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "--method drop --ratio 0.5" in res.stdout and "--nnodes 4" in res.stdout
    assert "dp 4 x ep 8; 1 experts per rank" in res.stdout and "steps             119,210" in res.stdout


def test_tiny_recipe_30_steps_on_the_corpus_loss_decreases(tiny_recipe: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    _finish(_torchrun(tiny_recipe, "--ep", "2", "--out", str(out)))
    rows = _metrics(out)
    assert [r["step"] for r in rows] == list(range(1, 31))
    losses = [r["loss"] for r in rows]
    assert abs(losses[0] - torch.log(torch.tensor(8192.0)).item()) < 0.3  # starts near uniform over the vocab
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 1.0
    for r in rows:
        assert r["loss"] == pytest.approx(r["lm_loss"] + 0.02 * r["aux_loss"], rel=1e-6)
        assert len(r["expert_load"]) == 2 and all(abs(sum(layer) - 1) < 1e-3 for layer in r["expert_load"])
        assert r["tokens"] == 1024 * r["step"] and r["tokens_per_s"] > 0 and r["grad_norm"] > 0
    final = out / "checkpoints" / "step-00000030"
    assert (final / "tokenizer.json").is_file()


def test_vocab_smaller_than_the_tokenizer_fails_clearly(tiny_recipe: Path, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(free_port())}.items():
        monkeypatch.setenv(key, value)
    from drop_upcycling.data import prepare_all

    d = yaml.safe_load(tiny_recipe.read_text())
    prepared = prepare_all(d["data"]["corpus"], d["data"]["cache_dir"], d["data"]["vocab_size"],
                           max_docs_per_domain=d["data"]["max_docs_per_domain"], pinned=False)
    tokens = prepared.vocab_size
    d["model"]["vocab_size"] = tokens // 2
    config = tmp_path / "small_vocab.yaml"
    config.write_text(yaml.safe_dump(d))
    with pytest.raises(UserError, match=f"has {tokens} tokens, more than the model's vocab of {tokens // 2}"):
        train_run(_args(str(config), "--out", str(tmp_path / "out")))


def test_init_from_hf_checkpoint_each_rank_loads_its_experts(tiny_recipe: Path, tmp_path: Path) -> None:
    """EP=2 run started from an MoE checkpoint: step 1's loss is the checkpoint's loss on the global batch."""
    from drop_upcycling.data import TokenSequenceReader, prepare_all

    run = TrainConfig.from_yaml(tiny_recipe)
    model = random_model(run.model_config(), 123)
    ckpt = save_model(model, tmp_path / "init")
    out = tmp_path / "out"
    _finish(_torchrun(tiny_recipe, "--ep", "2", "--out", str(out), "--init", str(ckpt), "--steps", "1"))
    logged = _metrics(out)[0]

    # Reference: the global batch of each micro-step is rank 0's then rank 1's sequences.
    d = run.data
    prepared = prepare_all(d["corpus"], d["cache_dir"], d["vocab_size"], max_docs_per_domain=d["max_docs_per_domain"],
                           pinned=False)
    readers = [TokenSequenceReader(prepared.files_by_domain("train", list(d["weights"])), run.seq_len,
                                   weights=d["weights"], seed=run.seed, rank=r, world_size=2) for r in range(2)]
    accum = run.global_batch_tokens // run.seq_len // (2 * run.micro_batch_size)
    with torch.no_grad():
        losses = []
        for _ in range(accum):
            ids = torch.cat([r.next_batch(run.micro_batch_size) for r in readers])
            losses.append(model(ids, labels=ids).loss.item())
    assert logged["loss"] == pytest.approx(sum(losses) / accum, rel=1e-5)


def test_dense_model_trains_in_one_process(tiny_recipe: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A plain `python -m drop_upcycling.train` (world of one) on a dense model: no aux loss, no expert load."""
    for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(free_port())}.items():
        monkeypatch.setenv(key, value)
    d = yaml.safe_load(tiny_recipe.read_text())
    d["model"] = {"base": "tiny-dense", "vocab_size": 8192}
    config = tmp_path / "dense.yaml"
    config.write_text(yaml.safe_dump(d))
    assert train_run(_args(str(config), "--out", str(tmp_path / "out"), "--steps", "3")) == 0
    rows = _metrics(tmp_path / "out")
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(r["aux_loss"] is None and r["expert_load"] == [] and r["loss"] == r["lm_loss"] for r in rows)
    hf = json.loads((tmp_path / "out" / "checkpoints" / "step-00000003" / "config.json").read_text())
    assert hf["model_type"] == "llama"


def test_resume_with_another_number_of_data_ranks_is_refused(reference_run: Path, tiny_recipe: Path, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(free_port())}.items():
        monkeypatch.setenv(key, value)
    out = tmp_path / "out"
    shutil.copytree(reference_run, out)
    with pytest.raises(UserError, match="written by 2 data ranks; resuming with 1"):
        train_run(_args(str(tiny_recipe), "--out", str(out), "--resume"))


def test_heldout_rows_match_transformers_under_expert_parallelism(tiny_recipe: Path, tmp_path: Path) -> None:
    """EP=2 on 2 ranks, held-out every 2 steps: rows at steps 0, 2, 4; step 0's per-domain loss equals
    transformers' loss on the first test windows of each domain; its routing counts cover every token
    top-k times; its expert similarity (experts gathered from both ranks) equals a float64 recomputation."""
    import numpy as np
    from transformers import AutoModelForCausalLM

    from drop_upcycling.data import iter_domain_sequences, prepare_all
    from drop_upcycling.moe import GroupedExperts

    run = TrainConfig.from_yaml(tiny_recipe)
    cfg = run.model_config()
    ckpt = save_model(random_model(cfg, 7), tmp_path / "init")
    config = _corpus_config(tmp_path / "run.yaml", tiny_recipe, steps=4, heldout_every_tokens=2 * 1024,
                            heldout_sequences=5)
    out = tmp_path / "out"
    _finish(_torchrun(config, "--ep", "2", "--out", str(out), "--init", str(ckpt)))
    rows = [json.loads(line) for line in (out / "heldout.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 2, 4]
    first = rows[0]
    n = first["sequences_per_domain"]  # 5 requested; at most what the shortest test split holds, even (2 ranks)
    assert 2 <= n <= 5 and n % 2 == 0

    d = run.data
    prepared = prepare_all(d["corpus"], d["cache_dir"], d["vocab_size"], max_docs_per_domain=d["max_docs_per_domain"],
                           pinned=False)
    hf = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    for domain in d["weights"]:
        ids = torch.stack(list(iter_domain_sequences(prepared, "test", domain, run.seq_len)))[:n]
        with torch.no_grad():
            expected = hf(ids, labels=ids).loss.item()  # HF: mean over all predicted tokens of the batch
        assert first["loss"][domain] == pytest.approx(expected, rel=1e-5), domain
        counts = np.array(first["routing"][domain])
        assert counts.shape == (cfg.num_hidden_layers, cfg.num_experts)
        assert (counts.sum(axis=1) == n * run.seq_len * cfg.num_experts_per_tok).all()
    assert first["mean"] == pytest.approx(np.mean(list(first["loss"].values())))

    experts = [m for m in load_model(ckpt).modules() if isinstance(m, GroupedExperts)]
    for layer, module in enumerate(experts):
        flat = np.concatenate([w.detach().double().numpy().reshape(cfg.num_experts, -1)
                               for w in (module.w1, module.w2, module.w3)], axis=1)
        unit = flat / np.linalg.norm(flat, axis=1, keepdims=True)
        sim = unit @ unit.T
        expected = sim[~np.eye(cfg.num_experts, dtype=bool)].mean()
        assert first["expert_cosine"][layer] == pytest.approx(expected, abs=1e-6)
    assert rows[-1]["mean"] < first["mean"]  # 4 steps at lr 3e-3 from a random model


def test_heldout_is_due_when_a_step_crosses_a_multiple() -> None:
    from drop_upcycling.heldout import due

    assert [due(t - 1000, t, 2500) for t in (1000, 2000, 3000, 4000, 5000)] == [False, False, True, False, True]
    assert not due(0, 10**9, 0)  # 0 = never
