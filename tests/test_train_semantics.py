"""The authors' training semantics as named options, each tested in both settings.

moe-recipes (HF Mixtral + DeepSpeed bf16, the authors' trainer) differs from our trainer's defaults in
four ways; each is a key of the training config whose default keeps our behaviour (the CPU study's) and
which the paper recipes set to the authors' value:

- ``aux_loss_scope``: ``global_batch`` pools the balance loss's routing fractions over the data ranks;
  ``micro_batch`` is HF's ``load_balancing_loss_func`` on each rank's own router logits.
- ``weight_decay_1d``: whether the 1-D parameters (RMSNorm weights) decay; moe-recipes decays all.
- ``param_dtype``: fp32 weights, or bf16 weights with an fp32 master copy that AdamW updates.
- ``warmup_start_lr``: the warmup's first lr; moe-recipes starts at its min lr.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from conftest import REPO, RandomTokens, random_model
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

from drop_upcycling import train as train_mod
from drop_upcycling.configs import MODEL_CONFIGS, TrainConfig
from drop_upcycling.errors import UserError
from drop_upcycling.methods import MOE_METHODS
from drop_upcycling.model import causal_lm_loss
from drop_upcycling.parallel import init_parallel, spawn_local
from drop_upcycling.recipes import resolve
from drop_upcycling.train import Trainer, build_optimizer, config_changes, lr_at

CFG = MODEL_CONFIGS["tiny-moe"].replace(vocab_size=128, num_hidden_layers=2)
RUN = {"model": {"base": "tiny-moe", "vocab_size": 128, "num_hidden_layers": 2}, "seq_len": 16,
       "global_batch_tokens": 128, "micro_batch_size": 2, "steps": 10, "lr": 3e-3, "min_lr": 3e-4,
       "warmup_steps": 2, "dtype": "fp32"}
# The authors' values of the four keys (the paper recipes'), and ours (TrainConfig's defaults).
AUTHORS = {"aux_loss_scope": "micro_batch", "weight_decay_1d": True, "param_dtype": "bf16", "warmup_start_lr": 2e-5}
OURS = {"aux_loss_scope": "global_batch", "weight_decay_1d": False, "param_dtype": "fp32", "warmup_start_lr": None}


def tokens(rank: int) -> RandomTokens:
    """This file's model and sequence length."""
    return RandomTokens(rank, CFG.vocab_size, RUN["seq_len"])


# ---------------------------------------------------------------------------- the keys and the recipes
def test_defaults_are_ours_and_a_checkpoint_predating_the_keys_computed_with_them() -> None:
    run = TrainConfig.from_mapping(RUN)
    assert {k: getattr(run, k) for k in OURS} == OURS
    saved = run.as_dict()
    for key in OURS:
        del saved[key]
    assert config_changes(saved, run.as_dict()) == {}


@pytest.mark.parametrize(("changes", "message"), [
    ({"aux_loss_scope": "per_rank"}, "aux_loss_scope must be global_batch or micro_batch, got 'per_rank'"),
    ({"weight_decay_1d": "yes"}, "weight_decay_1d must be true or false, got 'yes'"),
    ({"param_dtype": "fp16"}, "param_dtype must be fp32 or bf16, got 'fp16'"),
    ({"param_dtype": "bf16", "dtype": "fp32"}, "param_dtype bf16 computes in bf16: set dtype to bf16 or auto"),
    ({"warmup_start_lr": -1e-5}, "warmup_start_lr must be a number >= 0 or null, got -1e-05"),
    ({"warmup_start_lr": 1.0}, "need warmup_start_lr <= lr, got warmup_start_lr=1.0, lr=0.003"),
])
def test_a_bad_value_is_one_line(changes: dict, message: str) -> None:
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")) as e:
        TrainConfig.from_mapping({**RUN, **changes}, source="run.yaml")
    assert "\n" not in str(e.value) and str(e.value).startswith("run.yaml: ")


def test_the_paper_recipes_train_with_the_authors_semantics_and_the_others_with_ours() -> None:
    configs = REPO / "recipes" / "configs"
    for size in ("8x152m", "8x1.5b", "8x3.7b"):
        runs = [TrainConfig.from_yaml(configs / f"{size}.yaml")]
        runs += [TrainConfig.from_mapping(resolve(configs / f"{size}.yaml", m.slug).train) for m in MOE_METHODS]
        for run in runs:
            assert {k: getattr(run, k) for k in AUTHORS} == AUTHORS, size
            assert run.warmup_start_lr == run.min_lr  # moe-recipes' warmup starts at its eta_min
    for name in ("dense_152m", "dense_1.5b", "dense_3.7b", "tiny_moe"):
        run = TrainConfig.from_yaml(configs / f"{name}.yaml")
        assert {k: getattr(run, k) for k in OURS} == OURS, name


# ---------------------------------------------------------------------------- the warmup start
def test_warmup_starts_at_lr_over_warmup_or_at_warmup_start_lr() -> None:
    """By hand, lr 1, min lr 0.1, 4 warmup steps of 12. Ours: 1/4, 2/4, 3/4, 1, then the cosine from
    step 4. moe-recipes' (start 0.1): 0.1 + 0.9 * s/4 for s < 4, the cosine from step 4 (at lr)."""
    base = {**RUN, "steps": 12, "lr": 1.0, "min_lr": 0.1, "warmup_steps": 4}
    ours = TrainConfig.from_mapping(base)
    authors = TrainConfig.from_mapping({**base, "warmup_start_lr": 0.1})
    assert [lr_at(s, ours) for s in range(5)] == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0])
    assert [lr_at(s, authors) for s in range(5)] == pytest.approx([0.1, 0.325, 0.55, 0.775, 1.0])
    for s in range(4, 13):  # the cosine is the same: half-way (step 8) at 0.55, the end at min lr
        assert lr_at(s, authors) == lr_at(s, ours)
    assert lr_at(8, ours) == pytest.approx(0.55) and lr_at(12, ours) == pytest.approx(0.1)
    zero = TrainConfig.from_mapping({**base, "warmup_start_lr": 0.0})
    assert lr_at(0, zero) == 0.0 and lr_at(2, zero) == pytest.approx(0.5)  # a start of 0 is a step at lr 0


# ---------------------------------------------------------------------------- weight decay on 1-D parameters
@pytest.mark.parametrize("impl", ["loop", "fused"])
@pytest.mark.parametrize("decay_1d", [False, True])
def test_a_zero_gradient_step_decays_norm_weights_only_with_weight_decay_1d(decay_1d: bool, impl: str) -> None:
    """AdamW with a zero gradient moves nothing but the decoupled decay: w -> w * (1 - lr * wd)."""
    lr, wd = 1e-2, 0.1
    model = random_model(CFG, varied_norms=True)
    run = TrainConfig.from_mapping({**RUN, "lr": lr, "weight_decay": wd, "weight_decay_1d": decay_1d,
                                    "adamw_impl": impl})
    opt = build_optimizer(model, run)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    norms = [n for n in before if n.endswith("norm.weight")]
    assert norms and all(before[n].ndim == 1 for n in norms)
    for name, p in model.named_parameters():
        w = before[name]
        if p.ndim == 1 and not decay_1d:
            assert torch.equal(p.detach(), w), name
        else:
            assert torch.equal(p.detach(), w * (1 - lr * wd)), name
            torch.testing.assert_close(w - p.detach(), lr * wd * w, rtol=1e-4, atol=1e-9)


# ---------------------------------------------------------------------------- the balance loss's scope
def _skewed_router_logits(rank: int, layers: int = 2, tokens: int = 64) -> list[torch.Tensor]:
    """Each rank's micro-batch is one 'domain': its tokens prefer experts 2*rank and 2*rank + 1, so
    each rank alone is unbalanced and the two together are balanced."""
    gen = torch.Generator().manual_seed(rank)
    bias = torch.zeros(CFG.num_experts)
    bias[2 * rank:2 * rank + 2] = 3.0
    return [(torch.randn(tokens, CFG.num_experts, generator=gen) + bias).requires_grad_(True) for _ in range(layers)]


def _hf_aux(router_logits: list[torch.Tensor]) -> torch.Tensor:
    return load_balancing_loss_func(tuple(router_logits), CFG.num_experts, CFG.num_experts_per_tok)


def _scope_worker() -> None:
    env = init_parallel(ep_size=1, num_experts=CFG.num_experts)
    rank, world = env.rank, env.world_size
    gen = torch.Generator().manual_seed(10 + rank)
    lm_logits = torch.randn(2, 32, CFG.vocab_size, generator=gen)
    labels = torch.randint(0, CFG.vocab_size, (2, 32), generator=gen)
    router = _skewed_router_logits(rank)
    losses = {scope: causal_lm_loss(lm_logits, labels, router, CFG, group=env.world_pg, aux_loss_scope=scope)
              for scope in ("micro_batch", "global_batch")}

    # micro_batch: HF's function on this rank's logits, value and gradient.
    hf = _hf_aux(router)
    torch.testing.assert_close(losses["micro_batch"].aux_loss, hf, rtol=1e-6, atol=0)
    ours_grad = torch.autograd.grad(losses["micro_batch"].aux_loss, router)
    hf_grad = torch.autograd.grad(_hf_aux(router), router)
    for a, b in zip(ours_grad, hf_grad, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-9)
    assert losses["micro_batch"].aux_loss > 1.3 * CFG.num_experts_per_tok  # each rank alone is unbalanced

    # global_batch: the ranks' mean is HF's function on their concatenated logits, which are balanced.
    everyone = [[torch.empty_like(x) for _ in range(world)] for x in router]
    for layer, x in enumerate(router):
        dist.all_gather(everyone[layer], x.detach(), group=env.world_pg)
    mean = losses["global_batch"].aux_loss.detach().clone()
    dist.all_reduce(mean, group=env.world_pg)
    pooled = _hf_aux([torch.cat(parts) for parts in everyone])
    torch.testing.assert_close(mean / world, pooled, rtol=1e-6, atol=0)
    assert losses["global_batch"].aux_loss < losses["micro_batch"].aux_loss - 0.3
    torch.testing.assert_close(losses["global_batch"].lm_loss, losses["micro_batch"].lm_loss, rtol=0, atol=0)

    # The trainer passes its aux_loss_scope: with micro_batch, every micro-batch's aux loss is HF's.
    seen = []

    def spy(*args, **kwargs):
        out = causal_lm_loss(*args, **kwargs)
        seen.append((kwargs.get("aux_loss_scope"), [x.detach() for x in args[2]], out.aux_loss.detach()))
        return out

    train_mod.causal_lm_loss = spy
    for scope in ("micro_batch", "global_batch"):
        seen.clear()
        trainer = Trainer(TrainConfig.from_mapping({**RUN, "aux_loss_scope": scope}), env, reader=tokens(rank))
        stats = trainer.train_step()
        assert len(seen) == trainer.accum and all(s == scope for s, _, _ in seen)
        if scope == "micro_batch":
            for _, logits, aux in seen:
                torch.testing.assert_close(aux, _hf_aux(logits), rtol=1e-6, atol=0)
            local = torch.tensor(sum(float(aux) for _, _, aux in seen) / len(seen), dtype=torch.float64)
            dist.all_reduce(local, group=env.world_pg)
            assert stats.aux_loss == pytest.approx(float(local) / world, rel=1e-6)


def test_aux_loss_scope_micro_batch_is_hf_per_rank_and_global_batch_pools_the_ranks() -> None:
    spawn_local(_scope_worker, 2)


# ---------------------------------------------------------------------------- bf16 weights, fp32 master
BF16_RUN = {**RUN, "ep": 2, "param_dtype": "bf16", "dtype": "auto", "lr": 1e-6, "min_lr": 1e-6,
            "warmup_steps": 0, "steps": 4}


def _assert_model_is_master_rounded(trainer: Trainer) -> None:
    assert trainer.model is not trainer.master
    for (name, p), m in zip(trainer.model.named_parameters(), trainer.master.parameters(), strict=True):
        assert p.dtype == torch.bfloat16 and m.dtype == torch.float32, name
        assert torch.equal(p.detach(), m.detach().to(torch.bfloat16)), name


def _steps(trainer: Trainer, n: int) -> list[float]:
    out = []
    for _ in range(n):
        out.append(trainer.train_step().loss)
        trainer.step += 1
        trainer.tokens += trainer.run.global_batch_tokens
    return out


def _bf16_worker(root: str) -> None:
    env = init_parallel(ep_size=2, num_experts=CFG.num_experts)
    trainer = Trainer(TrainConfig.from_mapping({**BF16_RUN, "out": f"{root}/straight"}), env,
                      reader=tokens(env.rank))
    assert next(trainer.model.parameters()).dtype == torch.bfloat16
    start = [m.detach().clone() for m in trainer.master.parameters()]
    # A master that is itself bf16 takes the same updates and rounds after each: this one.
    bf16_master = [m.to(torch.bfloat16) for m in start]
    losses = []
    for _ in range(BF16_RUN["steps"]):
        before = [m.detach().clone() for m in trainer.master.parameters()]
        losses += _steps(trainer, 1)
        _assert_model_is_master_rounded(trainer)
        bf16_master = [(b.float() + (m.detach() - x)).to(torch.bfloat16)
                       for b, m, x in zip(bf16_master, trainer.master.parameters(), before, strict=True)]
    moved = lost = 0
    for (name, m), s, b in zip(trainer.master.named_parameters(), start, bf16_master, strict=True):
        if name.endswith(".experts.w1"):  # weights of std 0.02: bf16's step there is ~1e-4, lr is 1e-6
            moved += int((m.detach() != s).sum())
            lost += int((b == s.to(torch.bfloat16)).sum())
            assert not torch.equal(m.detach(), b.float()), name  # the master kept what bf16 rounds away
    total = sum(m.numel() for n, m in trainer.master.named_parameters() if n.endswith(".experts.w1"))
    assert moved > 0.99 * total and lost > 0.9 * total, (moved, lost, total)

    # Checkpoint and resume: exact, with fp32 shards (they hold the master) and with bf16 shards (the
    # optimizer file then keeps the master).
    for save_dtype in ("fp32", "bf16"):
        out = f"{root}/resumed-{save_dtype}"
        run = TrainConfig.from_mapping({**BF16_RUN, "out": out, "save_dtype": save_dtype})
        first = Trainer(run, env, reader=tokens(env.rank))
        head = _steps(first, 2)
        path = first.save()
        second = Trainer(run, env, resume_from=path, reader=tokens(env.rank))
        _assert_model_is_master_rounded(second)
        assert head + _steps(second, 2) == losses, save_dtype
        for a, b in zip(second.master.parameters(), trainer.master.parameters(), strict=True):
            assert torch.equal(a, b), save_dtype
        _assert_model_is_master_rounded(second)


def test_bf16_weights_are_the_fp32_master_rounded_and_resume_exactly(tmp_path: Path) -> None:
    spawn_local(_bf16_worker, 2, str(tmp_path))
