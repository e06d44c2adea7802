"""Our Llama/Mixtral model against transformers (the independent reference) and hand computations."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from conftest import random_model
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

from drop_upcycling.checkpoint import INDEX_FILE, load_model, save_model
from drop_upcycling.configs import MODEL_CONFIGS, ModelConfig
from drop_upcycling.model import CausalLM
from drop_upcycling.moe import LocalDispatcher, route, router_z_loss

TINY_MOE = MODEL_CONFIGS["tiny-moe"]


@pytest.mark.parametrize(
    "cfg",
    [
        MODEL_CONFIGS["tiny-dense"],
        TINY_MOE,
        MODEL_CONFIGS["tiny-dense"].replace(rope_theta=500_000.0, rms_norm_eps=1e-6, num_key_value_heads=4),
        TINY_MOE.replace(num_experts=3, num_experts_per_tok=1, tie_word_embeddings=True),
    ],
    ids=["dense", "moe", "dense-theta5e5-mha", "moe-top1-tied"],
)
def test_logits_and_losses_match_transformers(cfg: ModelConfig, tmp_path) -> None:
    model = random_model(cfg, varied_norms=True)
    ckpt = save_model(model, tmp_path / "ckpt")
    hf = transformers.AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
    assert type(hf).__name__ == ("MixtralForCausalLM" if cfg.is_moe else "LlamaForCausalLM")
    ids = torch.randint(0, cfg.vocab_size, (3, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = model(ids, labels=ids)
        theirs = hf(ids, labels=ids, output_router_logits=cfg.is_moe)
    assert (ours.logits - theirs.logits).abs().max() < 1e-4
    if cfg.is_moe:
        # HF's loss adds coef * aux to the LM loss exactly like ours.
        assert torch.allclose(ours.aux_loss, theirs.aux_loss, atol=1e-6)
        assert torch.allclose(ours.loss, theirs.loss, atol=1e-5)
    else:
        assert torch.allclose(ours.loss, theirs.loss, atol=1e-5)


def test_per_layer_aux_loss_is_mean_of_single_layer_hf_losses() -> None:
    cfg = TINY_MOE.replace(aux_loss_mode="per_layer")
    model = random_model(cfg, varied_norms=True)
    ids = torch.randint(0, cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        out = model(ids, labels=ids)
    expected = torch.stack(
        [load_balancing_loss_func((lg,), cfg.num_experts, cfg.num_experts_per_tok) for lg in out.router_logits]
    ).mean()
    assert torch.allclose(out.aux_loss, expected, atol=1e-6)
    # and it differs from the global (concatenated) term in general
    glob = load_balancing_loss_func(tuple(out.router_logits), cfg.num_experts, cfg.num_experts_per_tok)
    assert not torch.allclose(glob, expected, atol=1e-7)


def test_z_loss_by_hand() -> None:
    logits = [torch.tensor([[0.0, 0.0], [1.0, 2.0]], dtype=torch.float64)]
    lse = torch.log(torch.tensor([2.0, torch.e + torch.e**2], dtype=torch.float64))
    assert torch.allclose(router_z_loss(logits).double(), lse.square().mean())


def test_z_loss_enters_total_only_when_enabled() -> None:
    model = random_model(TINY_MOE.replace(router_z_loss_coef=0.5), varied_norms=True)
    ids = torch.randint(0, TINY_MOE.vocab_size, (1, 8), generator=torch.Generator().manual_seed(3))
    out = model(ids, labels=ids)
    assert torch.allclose(out.loss, out.lm_loss + 0.02 * out.aux_loss + 0.5 * out.z_loss)
    assert random_model(TINY_MOE, varied_norms=True)(ids, labels=ids).z_loss is None


def test_grouped_experts_equal_a_per_token_float64_loop() -> None:
    torch.manual_seed(0)
    block_model = random_model(TINY_MOE.replace(num_experts=5, num_experts_per_tok=2), varied_norms=True).double()
    block = block_model.model.layers[0].block_sparse_moe
    x = torch.randn(2, 7, TINY_MOE.hidden_size, dtype=torch.float64)
    y, routing = block(x)
    ref = torch.zeros_like(x.reshape(-1, x.shape[-1]))
    w1, w2, w3 = block.experts.w1, block.experts.w2, block.experts.w3
    for t, x_t in enumerate(x.reshape(-1, x.shape[-1])):
        for k in range(2):
            e = int(routing.ids_TK[t, k])
            h = torch.nn.functional.silu(w1[e] @ x_t) * (w3[e] @ x_t)
            ref[t] += routing.weights_TK[t, k] * (w2[e] @ h)
    assert torch.allclose(y.reshape(-1, x.shape[-1]), ref, atol=1e-12)


def test_router_renormalizes_top_k_of_softmax() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    r = route(logits, 2, torch.float32)
    p = torch.softmax(logits, -1)[0]
    assert r.ids_TK.tolist() == [[0, 1]]
    assert torch.allclose(r.weights_TK, torch.stack([p[0], p[1]]).unsqueeze(0) / (p[0] + p[1]))


def test_dispatch_groups_by_expert_and_handles_empty_experts() -> None:
    d = LocalDispatcher(num_experts=4)
    x = torch.arange(3, dtype=torch.float32).unsqueeze(-1)  # token t has value t
    ids = torch.tensor([[2, 0], [2, 0], [0, 2]])  # experts 1 and 3 get nothing
    x_g, counts, ctx = d.dispatch(x, ids)
    assert counts.tolist() == [3, 0, 3, 0]
    assert x_g.squeeze(-1).tolist() == [0, 1, 2, 0, 1, 2]
    out = d.combine(x_g, torch.full((3, 2), 0.5), ctx)
    assert torch.equal(out, x)  # 0.5 * t + 0.5 * t


def test_empty_experts_still_get_zero_gradients() -> None:
    model = random_model(TINY_MOE, varied_norms=True)
    ids = torch.zeros(1, 2, dtype=torch.long)  # 2 tokens x top-2: at most 4 of 4 experts, usually fewer
    model(ids, labels=ids).loss.backward()
    for layer in model.model.layers:
        assert layer.block_sparse_moe.experts.w1.grad is not None


def test_expert_ids_are_top_k_of_router_logits() -> None:
    model = random_model(TINY_MOE, varied_norms=True)
    ids = torch.randint(0, TINY_MOE.vocab_size, (2, 9), generator=torch.Generator().manual_seed(4))
    out = model(ids, return_expert_ids=True)
    assert len(out.expert_ids) == TINY_MOE.num_hidden_layers
    for logits, eids in zip(out.router_logits, out.expert_ids, strict=True):
        assert torch.equal(eids, torch.topk(logits, 2, dim=-1).indices)


def test_sharded_save_writes_index_and_round_trips(tmp_path) -> None:
    model = random_model(TINY_MOE, varied_norms=True)
    ckpt = save_model(model, tmp_path / "sharded", max_shard_bytes=200_000)
    index = json.loads((ckpt / INDEX_FILE).read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 2 and all((ckpt / s).is_file() for s in shards)
    assert "model.layers.1.block_sparse_moe.experts.3.w2.weight" in index["weight_map"]
    reloaded = load_model(ckpt)
    for (n1, t1), (n2, t2) in zip(model.state_dict().items(), reloaded.state_dict().items(), strict=True):
        assert n1 == n2 and torch.equal(t1, t2)
    hf = transformers.AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
    ids = torch.randint(0, TINY_MOE.vocab_size, (1, 12), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert (hf(ids).logits - model(ids).logits).abs().max() < 1e-4


def test_expert_slice_loads_only_its_experts(tmp_path) -> None:
    model = random_model(TINY_MOE, varied_norms=True)
    ckpt = save_model(model, tmp_path / "ckpt")
    half = load_model(ckpt, num_local=2, expert_offset=2)
    assert torch.equal(half.model.layers[0].block_sparse_moe.experts.w3,
                       model.model.layers[0].block_sparse_moe.experts.w3[2:4])


def test_init_is_independent_of_expert_layout() -> None:
    full = random_model(TINY_MOE, 7)
    part = CausalLM(TINY_MOE, num_local=2, expert_offset=2)
    part.init_weights(7)
    assert torch.equal(part.model.layers[1].block_sparse_moe.experts.w1, full.model.layers[1].block_sparse_moe.experts.w1[2:])
    assert torch.equal(part.model.embed_tokens.weight, full.model.embed_tokens.weight)


def test_paper_parameter_counts() -> None:
    """FACTS.md §3 (billions, as printed in the paper)."""
    expected = {
        "dense-152m": (0.152, 0.152), "moe-8x152m": (0.417, 0.190),
        "dense-1.5b": (1.558, 1.558), "moe-8x1.5b": (8.957, 2.616),
        "dense-3.7b": (3.783, 3.783), "moe-8x3.7b": (18.58, 5.90),
        "dense-13b": (13.7, 13.7),
    }
    for name, (total, active) in expected.items():
        counts = MODEL_CONFIGS[name].param_counts()
        digits = len(str(total).split(".")[1])
        assert round(counts["total"] / 1e9, digits) == total, name
        assert round(counts["active"] / 1e9, len(str(active).split(".")[1])) == active, name
