"""Memory that fits the paper's hardware: ZeRO sharding, activation checkpointing and the dry-run plan.

- ``zero_stage`` 1 and 2 (:mod:`drop_upcycling.sharding`) on 2 gloo processes, EP=2 and dp=2 (EP=1),
  fp32 and bf16 weights: every step's loss and every parameter after the steps equal the unsharded
  run's to fp32 rounding, and each rank holds only its shard of the AdamW state;
- a sharded run stopped after a checkpoint and resumed continues bitwise as the uninterrupted one; the
  checkpoint is an HF folder with the exact fp32 weights; resuming it unsharded or with another EP
  size is refused in one line;
- ``activation_checkpointing`` gives the same loss and gradients, under expert parallelism too (the
  all-to-alls run again in the recomputation);
- ``train --dry-run --format json``: the 8x3.7B recipe plans <= 80 GiB per GPU on the paper's 64 GPUs,
  the byte accounting by hand on a small config, and sharding or recomputation off raises the peak.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import yaml
from conftest import REPO, RandomTokens
from test_train import _finish, _metrics, _torchrun

from drop_upcycling.checkpoint import checkpoint_problem, load_model
from drop_upcycling.configs import MODEL_CONFIGS, TrainConfig
from drop_upcycling.errors import UserError
from drop_upcycling.memory import GIB, plan
from drop_upcycling.model import CausalLM, causal_lm_loss
from drop_upcycling.moe import AllToAllDispatcher
from drop_upcycling.parallel import init_parallel, reduce_gradients, spawn_local
from drop_upcycling.train import Trainer, configure_parser, prepare_run_dir
from drop_upcycling.train import run as train_run

CFG = MODEL_CONFIGS["tiny-moe"].replace(vocab_size=128, num_hidden_layers=2)
RUN = {"model": {"base": "tiny-moe", "vocab_size": 128, "num_hidden_layers": 2}, "seq_len": 16,
       "global_batch_tokens": 128, "micro_batch_size": 2, "steps": 4, "lr": 3e-3, "min_lr": 3e-4,
       "warmup_steps": 1, "grad_clip": 0.5, "dtype": "auto"}
STEPS = 4


def tokens(rank: int) -> RandomTokens:
    """This file's model and sequence length."""
    return RandomTokens(rank, CFG.vocab_size, RUN["seq_len"])


def _steps(trainer: Trainer, n: int) -> list[tuple[float, float]]:
    """(loss, grad norm) of ``n`` steps, advancing the trainer as :meth:`Trainer.train` does."""
    out = []
    for _ in range(n):
        stats = trainer.train_step()
        out.append((stats.loss, stats.grad_norm))
        trainer.step += 1
        trainer.tokens += trainer.run.global_batch_tokens
    return out


def _fp32_weights(trainer: Trainer) -> dict[str, torch.Tensor]:
    """The fp32 weights AdamW updates, by name: the master, or gathered from the shards (a collective)."""
    if trainer.zero is None:
        return {n: p.detach().clone() for n, p in trainer.master.named_parameters()}
    return {n: t.clone() for n, t in trainer.zero.full_weights(trainer.model, torch.float32).items()}


# ---------------------------------------------------------------------------- sharded == unsharded
def _equivalence_worker(ep: int) -> None:
    env = init_parallel(ep_size=ep, num_experts=CFG.num_experts)
    for param_dtype in ("fp32", "bf16"):
        ref = Trainer(TrainConfig.from_mapping({**RUN, "param_dtype": param_dtype}), env, reader=tokens(env.rank))
        ref_steps = _steps(ref, STEPS)
        ref_weights = _fp32_weights(ref)
        assert any(norm > RUN["grad_clip"] for _, norm in ref_steps)  # the clipping path runs
        for stage in (1, 2):
            run = TrainConfig.from_mapping({**RUN, "param_dtype": param_dtype, "zero_stage": stage})
            trainer = Trainer(run, env, reader=tokens(env.rank))
            assert trainer.master is None and trainer.bf16 is None
            expected = torch.bfloat16 if param_dtype == "bf16" else torch.float32
            assert all(p.dtype == expected for p in trainer.model.parameters())
            steps = _steps(trainer, STEPS)
            what = f"ep {ep}, {param_dtype}, stage {stage}"
            for (loss, norm), (ref_loss, ref_norm) in zip(steps, ref_steps, strict=True):
                assert loss == pytest.approx(ref_loss, rel=1e-6, abs=0), what
                assert norm == pytest.approx(ref_norm, rel=1e-5, abs=0), what
            weights = _fp32_weights(trainer)
            assert weights.keys() == ref_weights.keys()
            for name, w in weights.items():
                _assert_same_to_rounding(w, ref_weights[name], stage, f"{what} {name}")
            for name, p in trainer.model.named_parameters():  # the model computes with the master (rounded)
                assert torch.equal(p.detach(), weights[name].to(expected)), (what, name)
            _assert_only_a_shard_is_held(trainer, env)


def _assert_same_to_rounding(w: torch.Tensor, ref: torch.Tensor, stage: int, what: str) -> None:
    """Stage 1 sums the gradients in the unsharded step's order (micro-batches, then ranks): the weights
    agree to rtol 1e-6 (bitwise on 2 ranks). Stage 2 sums ranks first, then micro-batches: fp32 gradients
    then differ in their last bits, which AdamW's ``g / (sqrt(v) + eps)`` magnifies where a gradient nearly
    cancels (a rare token's embedding row): a few elements differ by a fraction of one step's update."""
    close = torch.isclose(w, ref, rtol=1e-6, atol=1e-8)
    if stage == 1:
        assert close.all(), (what, float((w - ref).abs().max()))
        return
    assert close.float().mean() >= 0.99, (what, int((~close).sum()))
    torch.testing.assert_close(w, ref, rtol=1e-6, atol=1e-2 * RUN["lr"], msg=lambda m: f"{what}: {m}")


def _assert_only_a_shard_is_held(trainer: Trainer, env) -> None:
    """The AdamW moments this rank holds: its shard of the non-expert parameters (1 / world) and of its
    experts (1 / dp), not all it holds."""
    held = {n: p.numel() for n, p in trainer.model.named_parameters()}
    dense = sum(n for name, n in held.items() if ".experts." not in name)
    experts = sum(n for name, n in held.items() if ".experts." in name)
    moments = sum(st["exp_avg"].numel() for st in trainer.optimizer.state.values())
    assert moments <= -(-dense // env.world_size) + -(-experts // env.dp_size)
    assert moments < sum(held.values()) / 1.9 if env.dp_size > 1 else moments < dense / 1.9 + experts


@pytest.mark.parametrize("ep", [2, 1], ids=["ep2", "dp2"])
def test_sharded_run_equals_the_unsharded_one(ep: int) -> None:
    spawn_local(_equivalence_worker, 2, ep)


# ---------------------------------------------------------------------------- checkpoint and resume
RESUMES = [("bf16", 2, "fp32"), ("fp32", 1, "bf16")]  # param_dtype, zero_stage, save_dtype


def _resume_worker(root: str) -> None:
    env = init_parallel(ep_size=2, num_experts=CFG.num_experts)
    for param_dtype, stage, save_dtype in RESUMES:
        tag = f"{param_dtype}-{stage}-{save_dtype}"
        run = TrainConfig.from_mapping({**RUN, "param_dtype": param_dtype, "zero_stage": stage, "ep": 2,
                                        "save_dtype": save_dtype, "out": f"{root}/{tag}"})
        straight = Trainer(run, env, reader=tokens(env.rank))
        losses = _steps(straight, STEPS)
        first = Trainer(run, env, reader=tokens(env.rank))
        head = _steps(first, 2)
        path = first.save()
        torch.save(_fp32_weights(first), f"{root}/{tag}-weights-{env.rank}.pt")  # what the HF shards must hold
        del first  # stopped: nothing of it survives but the checkpoint
        second = Trainer(run, env, resume_from=path, reader=tokens(env.rank))
        assert head + _steps(second, 2) == losses, tag  # bitwise
        for (name, a), b in zip(_fp32_weights(second).items(), _fp32_weights(straight).values(), strict=True):
            assert torch.equal(a, b), (tag, name)
        for a, b in zip(second.model.parameters(), straight.model.parameters(), strict=True):
            assert torch.equal(a, b), tag
        dist.barrier()


def test_sharded_checkpoint_resumes_bitwise_and_is_an_hf_folder(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    spawn_local(_resume_worker, 2, str(tmp_path))
    for param_dtype, stage, save_dtype in RESUMES:
        tag = f"{param_dtype}-{stage}-{save_dtype}"
        out = tmp_path / tag
        ckpt = out / "checkpoints" / "step-00000002"
        assert checkpoint_problem(ckpt) is None
        state = json.loads((ckpt / "trainer" / "state.json").read_text())
        assert state["zero"]["stage"] == stage and sorted(state["zero"]["groups"]) == ["dense", "experts"]
        assert sorted(p.name for p in (ckpt / "trainer").glob("zero-*")) == ["zero-00000.safetensors",
                                                                               "zero-00001.safetensors"]
        assert not list((ckpt / "trainer").glob("optimizer-*"))

        # A plain HF folder holding the fp32 master itself (or its bf16 rounding), which transformers loads.
        ours = load_model(ckpt).eval()
        held = dict(ours.named_parameters())
        dtype = torch.bfloat16 if save_dtype == "bf16" else torch.float32
        local = CFG.num_experts // 2
        for rank in range(2):
            for name, w in torch.load(tmp_path / f"{tag}-weights-{rank}.pt").items():
                want = held[name][rank * local:(rank + 1) * local] if ".experts." in name else held[name]
                assert torch.equal(want, w.to(dtype).float()), (tag, name)
        hf = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
        ids = torch.randint(0, CFG.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            torch.testing.assert_close(hf(ids).logits, ours(ids).logits, rtol=1e-5, atol=1e-5)

        # Resuming it unsharded, or sharded for another layout, is refused in one line.
        for changes, message in (({"zero_stage": 0}, "sharded over its ranks .* resume with zero_stage 1 or 2"),
                                 ({"ep": 1}, "sharded for ep 2 .*: resume with ep 2")):
            run = TrainConfig.from_mapping({**RUN, "param_dtype": param_dtype, "zero_stage": stage, "ep": 2,
                                            "save_dtype": save_dtype, **changes})
            with pytest.raises(UserError, match=message) as e:
                prepare_run_dir(out, run, 2, resume=True, restart=False, allow_change=True)
            assert "\n" not in str(e.value)


def test_torchrun_sharded_run_resumed_after_losing_its_last_checkpoint_logs_the_same(tmp_path: Path,
                                                                                     corpus_dir: Path) -> None:
    """The CLI path: the tiny recipe, bf16 weights, ZeRO-2 and recomputation, EP=2 on 2 torchrun ranks;
    the step-4 checkpoint deleted as if the run had been killed in step 3; ``--resume`` logs steps 3-4
    bitwise as the uninterrupted run did."""
    d = yaml.safe_load((REPO / "recipes" / "configs" / "tiny_moe.yaml").read_text())
    d["data"].update(corpus=str(corpus_dir), pinned=False, cache_dir=str(tmp_path / "cache"), max_docs_per_domain=100)
    d.update(steps=4, save_every=2, keep_last=5, param_dtype="bf16", dtype="auto", zero_stage=2,
             activation_checkpointing=True)
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(d))
    out = tmp_path / "out"
    _finish(_torchrun(config, "--ep", "2", "--out", str(out)))
    reference = _metrics(out)
    shutil.rmtree(out / "checkpoints" / "step-00000004")
    (out / "checkpoints" / "latest").write_text("step-00000002\n")
    _finish(_torchrun(config, "--ep", "2", "--out", str(out), "--resume"))
    resumed = _metrics(out)
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    for key in ("loss", "lm_loss", "aux_loss", "grad_norm", "lr", "tokens", "expert_load"):
        assert [r[key] for r in resumed] == [r[key] for r in reference], key
    assert checkpoint_problem(out / "checkpoints" / "step-00000004") is None


# ---------------------------------------------------------------------------- activation checkpointing
def _checkpointing_worker() -> None:
    env = init_parallel(ep_size=2, num_experts=CFG.num_experts)
    local = CFG.num_experts // 2
    ids = torch.randint(0, CFG.vocab_size, (3, 16), generator=torch.Generator().manual_seed(env.rank))
    results = {}
    for recompute in (False, True):
        dispatcher = AllToAllDispatcher(CFG.num_experts, env.expert_pg)
        calls = []
        original = dispatcher.dispatch
        dispatcher.dispatch = lambda *a, _o=original, _c=calls: (_c.append(1), _o(*a))[1]
        model = CausalLM(CFG, num_local=local, expert_offset=env.ep_rank * local, dispatcher=dispatcher)
        model.init_weights(3)
        model.activation_checkpointing = recompute
        out = model(ids)
        losses = causal_lm_loss(out.logits, ids, out.router_logits, CFG, group=env.world_pg)
        forward_calls = len(calls)
        losses.loss.backward()
        reduce_gradients(model, env)
        # Recomputed: every MoE layer dispatches (all-to-all) again in the backward.
        assert len(calls) == (2 if recompute else 1) * forward_calls == (2 if recompute else 1) * 2
        results[recompute] = (losses.loss.detach(), losses.aux_loss.detach(),
                              {n: p.grad.clone() for n, p in model.named_parameters()})
    (loss, aux, grads), (loss_r, aux_r, grads_r) = results[False], results[True]
    torch.testing.assert_close(loss_r, loss, rtol=1e-6, atol=0)
    torch.testing.assert_close(aux_r, aux, rtol=1e-6, atol=0)
    for name, g in grads.items():
        torch.testing.assert_close(grads_r[name], g, rtol=1e-6, atol=1e-9, msg=lambda m, n=name: f"{n}: {m}")

    # Through the trainer (bf16 weights, sharded): the same losses with recomputation on.
    runs = [TrainConfig.from_mapping({**RUN, "ep": 2, "param_dtype": "bf16", "zero_stage": 1,
                                      "activation_checkpointing": on}) for on in (False, True)]
    plain, recomputed = (_steps(Trainer(run, env, reader=tokens(env.rank)), 2) for run in runs)
    for (a, _), (b, _) in zip(recomputed, plain, strict=True):
        assert a == pytest.approx(b, rel=1e-6, abs=0)


def test_activation_checkpointing_gives_the_same_loss_and_gradients_under_expert_parallelism() -> None:
    spawn_local(_checkpointing_worker, 2)


# ---------------------------------------------------------------------------- the plan
def _args(*argv: str):
    import argparse

    parser = argparse.ArgumentParser()
    configure_parser(parser)
    return parser.parse_args(list(argv))


def test_dry_run_json_8x3_7b_fits_an_h100_on_the_paper_64_gpus() -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    res = subprocess.run([sys.executable, "-m", "drop_upcycling.train", str(REPO / "recipes/configs/8x3.7b.yaml"),
                          "--dry-run", "--nodes", "8", "--gpus-per-node", "8", "--format", "json"],
                         capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0, res.stderr
    p = json.loads(res.stdout)  # one JSON object, nothing else
    assert p["world_size"] == 64 and p["dp"] == 8 and p["ep"] == 8
    assert p["peak_memory_gib"] <= 80 and p["fits_h100"]
    assert p["zero_stage"] >= 1 and p["param_dtype"] == "bf16"
    parts = sum(p[f"{k}_gib"] for k in ("weights", "gradients", "optimizer", "activations"))
    assert parts == pytest.approx(p["peak_memory_gib"], abs=0.05)


def test_dry_run_text_is_the_default(capsys: pytest.CaptureFixture) -> None:
    assert train_run(_args(str(REPO / "recipes/configs/8x3.7b.yaml"), "--dry-run")) == 0
    out = capsys.readouterr().out
    assert out.startswith("plan for moe-8x3.7b") and "GiB peak" in out and "ZeRO-" in out


SMALL = {"model": {"base": "tiny-moe", "vocab_size": 1000, "hidden_size": 64, "intermediate_size": 128,
                   "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "num_experts": 4,
                   "num_experts_per_tok": 2},
         "seq_len": 32, "global_batch_tokens": 32 * 8, "micro_batch_size": 2, "steps": 1,
         "nodes": 1, "gpus_per_node": 4, "ep": 2, "param_dtype": "bf16", "zero_stage": 1,
         "activation_checkpointing": True}


def test_the_byte_accounting_by_hand() -> None:
    """The small config, counted by hand: hidden 64, head dim 16, 2 kv heads, FFN 128, 4 experts, 2 layers,
    vocab 1000, untied; 4 GPUs as dp 2 x ep 2."""
    attn = 2 * 64 * 64 + 2 * 64 * 32  # q, o; k, v
    experts = 4 * 3 * 64 * 128  # per layer
    layer = attn + 2 * 64 + experts + 4 * 64  # + 2 norms, the router
    total = 2 * 1000 * 64 + 64 + 2 * layer  # embeddings, LM head, final norm
    dense = total - 2 * experts
    held = dense + 2 * experts // 2  # half the experts per rank
    shard = dense // 4 + (2 * experts // 2) // 2  # the non-expert ones over 4 ranks, the experts over dp 2
    assert (total, held, shard) == (350_016, 251_712, 87_504)
    tokens = 2 * 32
    per_layer = 34 * tokens * 64 + 6 * tokens * 2 * 128
    logits = 6 * tokens * 1000
    inputs = 2 * tokens * 64 * 2  # 2 layers' bf16 inputs

    def peak(**changes) -> int:
        p = plan(TrainConfig.from_mapping({**SMALL, **changes}))
        assert p["params_per_gpu"] == held and p["total_params"] == total
        return p["peak_memory_bytes"]

    # bf16 weights, ZeRO-1, recomputation: 2 weights + 2 bf16 grads + 4 fp32 grad sum per held parameter,
    # 16 per sharded one (fp32 weights, 2 moments, reduced gradient); one layer's activations + the inputs.
    assert peak() == 8 * held + 16 * shard + inputs + per_layer + logits == 4_051_712
    assert peak(activation_checkpointing=False) == 8 * held + 16 * shard + 2 * per_layer + logits
    assert peak(zero_stage=2) == 4 * held + 16 * shard + inputs + per_layer + logits
    assert peak(zero_stage=0) == 20 * held + inputs + per_layer + logits  # 2 + 2 + 4 + 4 master + 8 moments
    assert peak(zero_stage=0, param_dtype="fp32") == 16 * held + 2 * tokens * 64 * 4 + per_layer + logits
    assert peak(zero_stage=1, param_dtype="fp32") == 8 * held + 16 * shard + 2 * tokens * 64 * 4 + per_layer + logits


@pytest.mark.parametrize(("size", "gpus"), [("8x152m", 8), ("8x1.5b", 32), ("8x3.7b", 64)])
def test_paper_recipes_shard_and_fit_an_h100_and_sharding_off_raises_the_peak(size: str, gpus: int) -> None:
    run = TrainConfig.from_yaml(REPO / "recipes" / "configs" / f"{size}.yaml")
    p = plan(run)
    assert p["world_size"] == gpus and run.zero_stage >= 1
    assert p["fits_h100"] and p["peak_memory_gib"] <= 80
    assert p["peak_memory_bytes"] / GIB == pytest.approx(p["peak_memory_gib"], abs=0.05)
    unsharded = plan(dataclasses.replace(run, zero_stage=0))
    assert unsharded["peak_memory_bytes"] > p["peak_memory_bytes"]
    assert unsharded["optimizer_gib"] > 4 * p["optimizer_gib"]
    recomputed = plan(dataclasses.replace(run, activation_checkpointing=True))
    assert recomputed["activations_gib"] < p["activations_gib"] or run.activation_checkpointing
    if size == "8x3.7b":  # unsharded it did not fit: 20 bytes per held parameter
        assert not unsharded["fits_h100"]


@pytest.mark.parametrize(("changes", "message"), [
    ({"zero_stage": 3}, "zero_stage must be 0, 1 or 2, got 3"),
    ({"zero_stage": "1"}, None),  # YAML strings of numbers are numbers
    ({"activation_checkpointing": "yes"}, "activation_checkpointing must be true or false, got 'yes'"),
])
def test_bad_values_are_one_line(changes: dict, message: str | None) -> None:
    if message is None:
        assert TrainConfig.from_mapping({**RUN, **changes}).zero_stage == 1
        return
    with pytest.raises(UserError, match=message) as e:
        TrainConfig.from_mapping({**RUN, **changes}, source="run.yaml")
    assert "\n" not in str(e.value) and str(e.value).startswith("run.yaml: ")
