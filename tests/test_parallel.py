"""Expert parallelism on 2 gloo processes against the single-process model on the same global batch."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from drop_upcycling.configs import MODEL_CONFIGS
from drop_upcycling.errors import UserError
from drop_upcycling.model import CausalLM, causal_lm_loss
from drop_upcycling.moe import AllToAllDispatcher, set_expert_kernel
from drop_upcycling.parallel import (
    clip_gradients,
    init_parallel,
    reduce_gradients,
    spawn_local,
    validate_layout,
)

CFG = MODEL_CONFIGS["tiny-moe"].replace(vocab_size=128, num_hidden_layers=2)
SEED = 7


def _global_batch(world: int, per_rank: int = 2, seq: int = 16) -> torch.Tensor:
    return torch.randint(0, CFG.vocab_size, (world * per_rank, seq), generator=torch.Generator().manual_seed(3))


def _reference_grads(ids: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The single-process model (fp32) on the whole batch: the loss CausalLM computes and its gradients."""
    ref = CausalLM(CFG)
    ref.init_weights(SEED)
    out = ref(ids, labels=ids)
    out.loss.backward()
    return out.loss.detach(), {n: p.grad for n, p in ref.named_parameters()}


def _equivalence_worker(ep_size: int, kernel: str = "auto") -> None:
    from test_grouped_experts import HostReads

    env = init_parallel(ep_size=ep_size, num_experts=CFG.num_experts)
    ids = _global_batch(env.world_size)
    ref_loss, ref_grads = _reference_grads(ids)

    local = CFG.num_experts // ep_size
    dispatcher = AllToAllDispatcher(CFG.num_experts, env.expert_pg) if ep_size > 1 else None
    model = CausalLM(CFG, num_local=local, expert_offset=env.ep_rank * local, dispatcher=dispatcher)
    model.init_weights(SEED)
    set_expert_kernel(model, kernel)
    mine = ids.chunk(env.world_size)[env.data_rank]
    with HostReads() as guard:
        out = model(mine)
        losses = causal_lm_loss(out.logits, mine, out.router_logits, CFG, group=env.world_pg)
        losses.loss.backward()
    if kernel == "grouped":
        # The all-to-all's split sizes are the one host read of a layer (none in the backward).
        assert len(guard.reads) == (CFG.num_hidden_layers if ep_size > 1 else 0), guard.reads
    reduce_gradients(model, env)

    mean_loss = losses.loss.detach().clone()
    dist.all_reduce(mean_loss)
    torch.testing.assert_close(mean_loss / env.world_size, ref_loss, rtol=1e-6, atol=0)
    for name, p in model.named_parameters():
        want = ref_grads[name]
        if ".experts." in name:
            want = want[env.ep_rank * local:(env.ep_rank + 1) * local]
        assert p.grad is not None and p.grad.abs().sum() > 0, name
        # fp32, different summation order: tolerance a few ulps of the largest gradient entry.
        atol = 1e-5 * float(want.abs().max())
        torch.testing.assert_close(p.grad, want, rtol=1e-4, atol=atol, msg=lambda m, n=name: f"{n}: {m}")

    # The clipped global norm counts every gradient once, sharded or not.
    ref_norm = torch.sqrt(sum((g.double() ** 2).sum() for g in ref_grads.values()))
    norm = clip_gradients(model, env, max_norm=1e9)
    assert abs(norm - float(ref_norm)) < 1e-5 * float(ref_norm)


@pytest.mark.parametrize(("ep_size", "kernel"), [(2, "auto"), (1, "auto"), (2, "grouped")],
                         ids=["ep2", "dp2", "ep2-grouped"])
def test_two_ranks_match_one_process_on_the_global_batch(ep_size: int, kernel: str) -> None:
    """The reference is the single-process loop kernel; "grouped" runs torch's grouped GEMM on the
    experts each rank received over the all-to-all."""
    spawn_local(_equivalence_worker, 2, ep_size, kernel)


def _round_trip_worker() -> None:
    """Every token routed to experts 0 and 1 (rank 0's), so rank 1's experts get zero rows."""
    env = init_parallel(ep_size=2, num_experts=4)
    disp = AllToAllDispatcher(4, env.expert_pg)
    torch.manual_seed(env.rank)
    n_tokens = 5 + 3 * env.rank  # uneven token counts per rank
    x_TD = torch.randn(n_tokens, 8, dtype=torch.float64, requires_grad=True)
    first = torch.randint(0, 2, (n_tokens,))
    ids_TK = torch.stack([first, 1 - first], dim=1)  # distinct top-2 ids, both in {0, 1}
    weights_TK = torch.rand(n_tokens, 2, dtype=torch.float64)
    weights_TK = weights_TK / weights_TK.sum(-1, keepdim=True)

    x_GD, counts_L, ctx = disp.dispatch(x_TD, ids_TK)
    if env.ep_rank == 0:  # every copy of both ranks' 5 + 8 tokens arrives: nothing dropped
        assert counts_L.tolist() == [13, 13] and x_GD.shape[0] == 26
    else:
        assert counts_L.tolist() == [0, 0] and x_GD.shape[0] == 0
    # Experts: expert l multiplies by (l + 2); checks the (expert, source) regrouping too.
    scale_G = torch.repeat_interleave(torch.arange(len(counts_L), dtype=torch.float64) + 2, counts_L)
    y_TD = disp.combine(x_GD * scale_G[:, None], weights_TK, ctx)
    expected = x_TD * (weights_TK * (ids_TK.double() + 2)).sum(-1, keepdim=True)
    torch.testing.assert_close(y_TD, expected)
    # Backward runs the reverse exchange: d(sum y)/dx = sum_k w_k * scale_k.
    y_TD.sum().backward()
    torch.testing.assert_close(x_TD.grad, (weights_TK * (ids_TK.double() + 2)).sum(-1, keepdim=True).expand(-1, 8))



def test_all_to_all_round_trip_with_empty_experts() -> None:
    spawn_local(_round_trip_worker, 2)


@pytest.mark.parametrize(("world", "ep_size", "experts", "message"), [
    (2, 3, 4, "not divisible by the expert-parallel size"),
    (4, 4, 6, "number of experts (6) is not divisible"),
    (2, 2, 0, "needs an MoE model"),
])
def test_bad_layout_is_one_clear_error(world: int, ep_size: int, experts: int, message: str) -> None:
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        validate_layout(world, ep_size, experts)
