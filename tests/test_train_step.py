"""The training step's fast paths against the reference computations they replace.

What the step computes must not depend on how fast it runs: the loss without copying the logits, the
balance loss from the forward's routing, the gradient norm through one fp64 scratch and the in-place
scaling of a one-rank group are bitwise the formulas they replace; fused AdamW (``adamw_impl: fused``)
and ``compile: true`` (both the CPU study's choices) are named options that equal the reference to fp32
rounding, tested here beside it (the defaults), ``compile`` also under expert parallelism.
"""

from __future__ import annotations

import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from conftest import random_model

from drop_upcycling.configs import MODEL_CONFIGS, TrainConfig
from drop_upcycling.errors import UserError
from drop_upcycling.model import next_token_ce_sum
from drop_upcycling.moe import load_balancing_loss, route
from drop_upcycling.parallel import clip_gradients, init_parallel, spawn_local
from drop_upcycling.train import Trainer, build_optimizer, check_compiler, config_changes, reuse_freed_memory

CFG = MODEL_CONFIGS["tiny-moe"].replace(vocab_size=128, num_hidden_layers=2)
RUN = {"model": {"base": "tiny-moe", "vocab_size": 128, "num_hidden_layers": 2}, "seq_len": 16,
       "global_batch_tokens": 128, "micro_batch_size": 2, "steps": 10, "lr": 3e-3, "min_lr": 3e-4,
       "warmup_steps": 2, "dtype": "fp32"}


@pytest.mark.parametrize(("shape", "ignored"), [((3, 40, 512), 0.0), ((2, 17, 128), 0.3), ((1, 2, 50), 0.0),
                                                ((4, 64, 1000), 0.5)])
def test_next_token_ce_sum_is_bitwise_the_cross_entropy_of_the_sliced_logits(shape: tuple[int, int, int],
                                                                              ignored: float) -> None:
    b, s, v = shape
    gen = torch.Generator().manual_seed(s)
    logits = (3 * torch.randn(b, s, v, generator=gen)).requires_grad_(True)
    labels = torch.randint(0, v, (b, s), generator=gen)
    labels[torch.rand(b, s, generator=gen) < ignored] = -100
    ref = F.cross_entropy(logits[:, :-1].reshape(-1, v).float(), labels[:, 1:].reshape(-1), ignore_index=-100,
                          reduction="sum")
    (ref_grad,) = torch.autograd.grad(ref / 3, logits)
    ours = next_token_ce_sum(logits, labels)
    (grad,) = torch.autograd.grad(ours / 3, logits)
    assert torch.equal(ours, ref)
    assert torch.equal(grad, ref_grad)


def test_gradient_norm_is_bitwise_the_per_tensor_fp64_sum_and_clips() -> None:
    model = random_model(CFG, varied_norms=True)
    ids = torch.randint(0, CFG.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    model(ids, labels=ids).loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    ref = float(sum(g.double().pow(2).sum() for g in grads.values()).sqrt())
    env = SimpleNamespace(device=torch.device("cpu"), ep_size=1)
    assert clip_gradients(model, env, max_norm=0.0) == ref  # 0: measure, do not clip
    assert clip_gradients(model, env, max_norm=ref / 4) == ref
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[n] * (ref / 4 / (ref + 1e-6)))


def _adamw_params(impl: str, steps: int = 8) -> list[torch.Tensor]:
    """The parameters after ``steps`` AdamW steps of :func:`build_optimizer` on fixed gradients."""
    model = random_model(CFG)
    opt = build_optimizer(model, TrainConfig.from_mapping({**RUN, "adamw_impl": impl}))
    gen = torch.Generator().manual_seed(1)
    for step in range(steps):
        for p in model.parameters():
            p.grad = 1e-2 * torch.randn(p.shape, generator=gen)
        for group in opt.param_groups:
            group["lr"] = 3e-3 * (step + 1) / steps
        opt.step()
    return [p.detach().clone() for p in model.parameters()]


def test_adamw_loop_is_torchs_per_tensor_adamw_and_fused_equals_it_to_fp32_rounding() -> None:
    model = random_model(CFG)
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    ref_opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                                lr=3e-3, betas=(0.9, 0.95), eps=1e-8, foreach=False)
    gen = torch.Generator().manual_seed(1)
    for step in range(8):
        for p in model.parameters():
            p.grad = 1e-2 * torch.randn(p.shape, generator=gen)
        for group in ref_opt.param_groups:
            group["lr"] = 3e-3 * (step + 1) / 8
        ref_opt.step()
    ref = [p.detach() for p in model.parameters()]
    loop, fused = _adamw_params("loop"), _adamw_params("fused")
    assert all(torch.equal(a, b) for a, b in zip(loop, ref, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(fused, loop, strict=True))  # a different kernel ...
    for a, b in zip(fused, loop, strict=True):  # ... that computes the same update
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-8)


def test_adamw_impl_is_checked_and_defaults_to_the_loop() -> None:
    assert TrainConfig.from_mapping(RUN).adamw_impl == "loop"
    with pytest.raises(UserError, match="adamw_impl must be loop or fused, got 'fast'"):
        TrainConfig.from_mapping({**RUN, "adamw_impl": "fast"})


def test_a_field_the_checkpoint_predates_counts_as_its_default() -> None:
    saved = TrainConfig.from_mapping(RUN).as_dict()
    del saved["adamw_impl"]  # a checkpoint written before the field existed
    assert config_changes(saved, TrainConfig.from_mapping(RUN).as_dict()) == {}
    fused = TrainConfig.from_mapping({**RUN, "adamw_impl": "fused"}).as_dict()
    assert config_changes(saved, fused) == {"adamw_impl": {"from": "loop", "to": "fused"}}


class _Tokens:
    def __init__(self, rank: int) -> None:
        self.gen = torch.Generator().manual_seed(rank)

    def next_batch(self, batch_size: int) -> torch.Tensor:
        return torch.randint(0, CFG.vocab_size, (batch_size, RUN["seq_len"]), generator=self.gen)


def _trainer_worker() -> None:
    """EP=2 on 2 ranks: the trainer with either AdamW takes the same first step and stays within fp32 rounding."""
    env = init_parallel(ep_size=2, num_experts=CFG.num_experts)
    losses = {}
    for impl in ("loop", "fused"):
        run = TrainConfig.from_mapping({**RUN, "ep": 2, "adamw_impl": impl})
        trainer = Trainer(run, env, reader=_Tokens(env.rank))
        stats = []
        for _ in range(4):
            stats.append(trainer.train_step())
            trainer.step += 1
        losses[impl] = [x for s in stats for x in (s.loss, s.grad_norm)]
    assert losses["fused"][:2] == losses["loop"][:2]  # the optimizer has not acted yet
    assert losses["fused"][2:] == pytest.approx(losses["loop"][2:], rel=1e-5)


def test_trainer_with_fused_adamw_matches_the_loop_under_expert_parallelism() -> None:
    spawn_local(_trainer_worker, 2)


def test_reuse_freed_memory_is_safe_to_call_twice() -> None:
    reuse_freed_memory()
    reuse_freed_memory()
    assert torch.ones(1 << 20).sum() == 1 << 20


# ---------------------------------------------------------------------------- compile: true
def _compiled_and_eager(ep: int, rank_tokens: int, model: dict | None = None
                        ) -> dict[bool, tuple[list[float], dict[str, torch.Tensor], Trainer]]:
    """Three steps of the same run eagerly and compiled: (loss and grad norm per step, weights, trainer)."""
    env = init_parallel(ep_size=ep, num_experts=CFG.num_experts)
    out = {}
    for compiled in (False, True):
        run = TrainConfig.from_mapping({**RUN, "ep": ep, "compile": compiled, "model": model or RUN["model"]})
        trainer = Trainer(run, env, reader=_Tokens(rank_tokens))
        stats = []
        for _ in range(3):
            s = trainer.train_step()
            trainer.step += 1
            stats += [s.loss, s.grad_norm]
        out[compiled] = (stats, {n: p.detach().clone() for n, p in trainer.model.named_parameters()}, trainer)
    return out


def _check_compiled_equals_eager(out: dict) -> None:
    (eager, eager_w, eager_tr), (comp, comp_w, comp_tr) = out[False], out[True]
    assert comp == pytest.approx(eager, rel=1e-5)
    assert comp_w.keys() == eager_w.keys()  # the same parameter names: checkpoints are unchanged
    # AdamW divides each gradient element by its own running magnitude, so an element whose gradient
    # nearly cancels can move by a visible fraction of one update: bound the weights by 1% of one step.
    for name, w in eager_w.items():
        torch.testing.assert_close(comp_w[name], w, rtol=0, atol=0.01 * RUN["lr"])
    layers = comp_tr.model.model.layers
    assert all(layer._compiled_call_impl is not None for layer in layers)  # it did compile
    assert all(layer._compiled_call_impl is None for layer in eager_tr.model.model.layers)


@pytest.mark.parametrize("base", ["tiny-moe", "tiny-dense"])
def test_compiled_training_equals_eager_to_fp32_rounding(base: str) -> None:
    """``compile: true`` (inductor on CPU, the CPU study's choice, its dense seed included) trains the same
    model: losses, gradient norms and weights after three steps equal the eager run's to fp32 rounding,
    under the same names."""
    _check_compiled_equals_eager(_compiled_and_eager(ep=1, rank_tokens=0, model={**RUN["model"], "base": base}))


def _compiled_ep_worker() -> None:
    _check_compiled_equals_eager(_compiled_and_eager(ep=2, rank_tokens=int(os.environ["RANK"])))


def test_compiled_training_under_expert_parallelism_equals_eager() -> None:
    """EP=2: the all-to-all dispatcher runs eagerly between the compiled parts and the result is the same."""
    spawn_local(_compiled_ep_worker, 2)


def test_compile_is_checked_against_recompute_and_a_missing_compiler(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(UserError, match="compile and activation_checkpointing cannot be combined"):
        TrainConfig.from_mapping({**RUN, "compile": True, "activation_checkpointing": True})
    with pytest.raises(UserError, match="compile"):
        TrainConfig.from_mapping({**RUN, "compile": "yes"})
    assert TrainConfig.from_mapping(RUN).compile is False
    import torch._inductor.cpp_builder as cpp_builder

    def no_compiler():
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(cpp_builder, "get_cpp_compiler", no_compiler)
    with pytest.raises(UserError, match=r"compile: true needs a C\+\+ compiler .* set compile: false"):
        check_compiler(torch.device("cpu"))


@pytest.mark.parametrize("mode", ["global", "per_layer"])
def test_balance_loss_from_the_forwards_routing_is_bitwise_the_recomputed_one(mode: str) -> None:
    """The trainer hands :func:`load_balancing_loss` the forward's softmax and top-k ids instead of
    recomputing them from the logits: the same loss and the same logits' gradient, bitwise."""
    gen = torch.Generator().manual_seed(3)
    logits = [(2 * torch.randn(96, 8, generator=gen)).requires_grad_(True) for _ in range(3)]
    ref = load_balancing_loss(logits, 8, 2, mode)
    ref_grads = torch.autograd.grad(ref, logits)
    routed = [(r.probs_TE, r.ids_TK) for r in (route(lg, 2, torch.float32) for lg in logits)]
    ours = load_balancing_loss(logits, 8, 2, mode, routed=routed)
    grads = torch.autograd.grad(ours, logits)
    assert torch.equal(ours, ref)
    assert all(torch.equal(a, b) for a, b in zip(grads, ref_grads, strict=True))
    other = [(probs.flip(-1), ids) for probs, ids in routed]  # and it is what the loss reads
    assert not torch.equal(load_balancing_loss(logits, 8, 2, mode, routed=other), ref)


def test_the_library_does_not_import_the_compiler_unless_asked() -> None:
    """``compile`` costs nothing when off: importing the library (the upcycler, the trainer) leaves
    ``torch._dynamo`` unimported, a second per process (benchmarks/bench_upcycle.py counts process starts)."""
    code = ("import sys, drop_upcycling.upcycle, drop_upcycling.train, drop_upcycling.cli; "
            "sys.exit('torch._dynamo' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
