"""Training speed against transformers' Mixtral in the same run (CPU, fp32).

- A whole training step (forward with the balance loss, backward, AdamW) of the tiny MoE recipe's
  model: our :class:`~drop_upcycling.model.CausalLM` vs ``transformers.MixtralForCausalLM`` built from
  the same config.json, same batch. Reported: tokens/s of each and the ratio ours / transformers.
- One MoE layer forward + backward at the 8x152M layer shape (hidden 512, FFN 2048, 8 experts, top-2)
  on 1024 tokens: our :class:`~drop_upcycling.moe.SparseMoeBlock` vs ``MixtralSparseMoeBlock`` holding
  the same weights (outputs checked equal first).

pytest-benchmark times ours; the reference runs once before each of our rounds (interleaved, so both
see the same machine load), and both numbers plus the ratio land in ``extra_info`` (``--benchmark-json``)
and on stdout. Best-of-rounds (min) is compared.
"""

from __future__ import annotations

import time

import pytest
import torch

from drop_upcycling.configs import MODEL_CONFIGS
from drop_upcycling.model import CausalLM
from drop_upcycling.moe import SparseMoeBlock

ROUNDS = 5


class _Interleaved:
    """Times the reference once before each of pytest-benchmark's rounds of ours (its ``setup`` hook),
    so both see the same machine load; ``min`` is the best reference round."""

    def __init__(self, ref) -> None:
        self.ref, self.times = ref, []

    def __call__(self) -> None:
        t0 = time.perf_counter()
        self.ref()
        self.times.append(time.perf_counter() - t0)

    @property
    def min(self) -> float:
        return min(self.times[1:])  # the first call is the reference's warm-up


def _report(benchmark, record_ratio, key: str, name: str, tokens: int, ref: _Interleaved) -> None:
    ours, ref_seconds = benchmark.stats.stats.min, ref.min
    info = {"tokens": tokens, "ours_tokens_per_s": tokens / ours, "transformers_tokens_per_s": tokens / ref_seconds,
            "speedup_vs_transformers": ref_seconds / ours}
    benchmark.extra_info.update(info)
    # Per round: the reference ran just before ours (its warm-up call is not a round).
    per_round = [r / o for r, o in zip(ref.times[-ROUNDS:], benchmark.stats.stats.data, strict=True)]
    record_ratio(key, per_round, better="higher", label=f"{name}: tokens/s ours / transformers",
                 **{k: round(v, 1) for k, v in info.items()})
    print(f"\n{name}: ours {info['ours_tokens_per_s']:.0f} tok/s, transformers "
          f"{info['transformers_tokens_per_s']:.0f} tok/s, ratio {info['speedup_vs_transformers']:.2f}x")


@pytest.fixture(autouse=True)
def _threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_train_step_tiny_moe_vs_transformers_mixtral(benchmark, record_ratio) -> None:
    from transformers import MixtralConfig, MixtralForCausalLM

    cfg = MODEL_CONFIGS["tiny-moe"].replace(vocab_size=8192)
    ids = torch.randint(0, cfg.vocab_size, (8, 128), generator=torch.Generator().manual_seed(0))
    ours = CausalLM(cfg)
    ours.init_weights(0)
    hf_cfg = MixtralConfig(**{**cfg.to_hf_dict(), "output_router_logits": True})
    hf = MixtralForCausalLM(hf_cfg)
    hf.train()
    opt_ours = torch.optim.AdamW(ours.parameters(), lr=1e-4)
    opt_hf = torch.optim.AdamW(hf.parameters(), lr=1e-4)

    def step_ours() -> None:
        ours(ids, labels=ids).loss.backward()
        opt_ours.step()
        opt_ours.zero_grad(set_to_none=True)

    def step_hf() -> None:
        hf(input_ids=ids, labels=ids).loss.backward()
        opt_hf.step()
        opt_hf.zero_grad(set_to_none=True)

    ref = _Interleaved(step_hf)
    benchmark.pedantic(step_ours, setup=ref, rounds=ROUNDS, iterations=1, warmup_rounds=1)
    _report(benchmark, record_ratio, "train_step_tiny_moe_vs_transformers", "Training step (tiny MoE, 8 x 128 tokens, "
            "fp32)", ids.numel(), ref)


def test_moe_layer_8x152m_shape_vs_transformers_block(benchmark, record_ratio) -> None:
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    cfg = MODEL_CONFIGS["moe-8x152m"]
    ours = SparseMoeBlock(cfg.hidden_size, cfg.intermediate_size, cfg.num_experts, cfg.num_experts_per_tok)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in ours.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    hf = MixtralSparseMoeBlock(MixtralConfig(**cfg.to_hf_dict()))
    with torch.no_grad():
        hf.gate.weight.copy_(ours.gate.weight)
        hf.experts.gate_up_proj.copy_(torch.cat([ours.experts.w1, ours.experts.w3], dim=1))
        hf.experts.down_proj.copy_(ours.experts.w2)
    x = torch.randn(1, 1024, cfg.hidden_size, generator=gen)
    torch.testing.assert_close(ours(x)[0], hf(x), rtol=1e-4, atol=1e-5)  # same function, then time it

    def fwd_bwd(block, out_index: int | None) -> None:
        xi = x.clone().requires_grad_(True)
        y = block(xi)
        (y[out_index] if out_index is not None else y).sum().backward()

    ref = _Interleaved(lambda: fwd_bwd(hf, None))
    benchmark.pedantic(lambda: fwd_bwd(ours, 0), setup=ref, rounds=ROUNDS, iterations=1, warmup_rounds=1)
    _report(benchmark, record_ratio, "moe_layer_8x152m_vs_transformers", "MoE layer fwd+bwd (8x152M shape, "
            "1024 tokens, fp32)", x.shape[1], ref)
