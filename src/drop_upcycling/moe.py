"""The Mixtral MoE layer: router, token dispatch, grouped experts and the auxiliary losses.

Split the torchtitan way so that expert parallelism is a different dispatcher, not a different MoE:

- :func:`route`: router logits -> top-k expert ids and renormalized weights (HF Mixtral semantics:
  softmax in fp32 over all E experts, top-k, renormalize the k weights to sum to 1).
- a *dispatcher* groups the token copies by expert and later scatters expert outputs back:
  :class:`LocalDispatcher` on one device; the expert-parallel all-to-all dispatcher implements the
  same two methods and exchanges the grouped tokens between "group by expert" and "run experts".
- :class:`GroupedExperts`: the SwiGLU math on tokens that are already grouped by expert, given
  tokens-per-expert counts. ``_expert_ffn`` is the one seam for a faster grouped kernel.

Dropless: every token copy is computed, no capacity factor.

Shape legend: T tokens, D hidden, F expert FFN width, E experts (global), L local experts,
K top-k, A = T*K token copies (assignments), G grouped assignments received by local experts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


@dataclass
class Routing:
    """What the router decided for each token."""

    logits_TE: torch.Tensor  # raw router logits (aux losses need them)
    weights_TK: torch.Tensor  # renormalized top-k weights, in the activation dtype
    ids_TK: torch.Tensor  # expert ids, int64


def route(logits_TE: torch.Tensor, top_k: int, dtype: torch.dtype) -> Routing:
    """softmax -> top-k -> renormalize, exactly as ``transformers`` Mixtral does it (fp32 softmax)."""
    probs_TE = F.softmax(logits_TE, dim=-1, dtype=torch.float32)
    weights_TK, ids_TK = torch.topk(probs_TE, top_k, dim=-1)
    weights_TK = weights_TK / weights_TK.sum(dim=-1, keepdim=True)
    return Routing(logits_TE=logits_TE, weights_TK=weights_TK.to(dtype), ids_TK=ids_TK)


class Dispatcher(Protocol):
    """Groups token copies by expert for :class:`GroupedExperts` and brings the outputs back."""

    def dispatch(self, x_TD: torch.Tensor, ids_TK: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, object]:
        """Return (x_GD grouped by local expert, counts_L per local expert, context for combine)."""
        ...

    def combine(self, y_GD: torch.Tensor, weights_TK: torch.Tensor, ctx: object) -> torch.Tensor:
        """Weight each expert output by its routing weight and sum the k copies of every token."""
        ...


@dataclass
class _LocalContext:
    order_A: torch.Tensor  # position in the flattened (token, k) list of each grouped row
    num_tokens: int


class LocalDispatcher:
    """All experts on this device: a stable sort of the T*K token copies by expert id."""

    def __init__(self, num_experts: int) -> None:
        self.num_experts = num_experts

    def group(self, ids_TK: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(order_A, counts_E): the permutation that groups the flattened copies by expert, and the counts."""
        ids_A = ids_TK.reshape(-1)
        order_A = torch.argsort(ids_A, stable=True)
        counts_E = torch.bincount(ids_A, minlength=self.num_experts)
        return order_A, counts_E

    def dispatch(self, x_TD: torch.Tensor, ids_TK: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, _LocalContext]:
        top_k = ids_TK.shape[-1]
        order_A, counts_E = self.group(ids_TK)
        x_AD = x_TD[order_A // top_k]
        return x_AD, counts_E, _LocalContext(order_A=order_A, num_tokens=x_TD.shape[0])

    def combine(self, y_AD: torch.Tensor, weights_TK: torch.Tensor, ctx: _LocalContext) -> torch.Tensor:
        return scatter_weighted(y_AD, weights_TK, ctx.order_A, ctx.num_tokens)


def scatter_weighted(y_AD: torch.Tensor, weights_TK: torch.Tensor, order_A: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """Inverse of the grouping: out[t] = sum_k w[t, k] * y[copy (t, k)]."""
    top_k = weights_TK.shape[-1]
    w_A = weights_TK.reshape(-1)[order_A].unsqueeze(-1)
    out_TD = y_AD.new_zeros(num_tokens, y_AD.shape[-1])
    return out_TD.index_add(0, order_A // top_k, y_AD * w_A)


class _AllToAll(torch.autograd.Function):
    """Uneven all-to-all of rows; the backward sends the gradients back along the reverse routes."""

    @staticmethod
    def forward(ctx, x_ND: torch.Tensor, recv_splits: list[int], send_splits: list[int],
                group: dist.ProcessGroup) -> torch.Tensor:
        ctx.recv_splits, ctx.send_splits, ctx.group = recv_splits, send_splits, group
        out = x_ND.new_empty(sum(recv_splits), *x_ND.shape[1:])
        dist.all_to_all_single(out, x_ND.contiguous(), recv_splits, send_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad_MD: torch.Tensor):
        grad = grad_MD.new_empty(sum(ctx.send_splits), *grad_MD.shape[1:])
        dist.all_to_all_single(grad, grad_MD.contiguous(), ctx.send_splits, ctx.recv_splits, group=ctx.group)
        return grad, None, None, None


def all_to_all(x_ND: torch.Tensor, recv_splits: list[int], send_splits: list[int],
               group: dist.ProcessGroup) -> torch.Tensor:
    """Differentiable ``all_to_all_single``: row block i of ``x`` (``send_splits[i]`` rows) goes to rank i."""
    return _AllToAll.apply(x_ND, recv_splits, send_splits, group)


@dataclass
class _AllToAllContext:
    order_A: torch.Tensor  # flattened (token, k) index of each sorted copy on the sending side
    num_tokens: int
    send_splits: list[int]  # copies sent to each rank of the expert group
    recv_splits: list[int]  # copies received from each rank
    regroup_G: torch.Tensor  # received (source, expert) order -> (expert, source) order


class AllToAllDispatcher:
    """Expert parallelism: rank i of ``group`` holds global experts ``[i*L, (i+1)*L)``, ``L = E / ep_size``.

    dispatch: sort the local copies by global expert (so they are contiguous by destination rank),
    exchange per-expert counts with ``all_to_all_single``, exchange the rows (uneven splits), and
    reorder the received rows from (source rank, expert) to (expert, source rank) for the experts.
    combine: the exact reverse, then the weighted scatter of :class:`LocalDispatcher`. Dropless;
    a rank or an expert may receive zero rows.
    """

    def __init__(self, num_experts: int, group: dist.ProcessGroup) -> None:
        self.num_experts = num_experts
        self.group = group
        self.ep_size = dist.get_world_size(group)
        if num_experts % self.ep_size:
            raise ValueError(f"{num_experts} experts cannot be split over {self.ep_size} ranks")
        self.num_local = num_experts // self.ep_size

    def dispatch(self, x_TD: torch.Tensor, ids_TK: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, _AllToAllContext]:
        top_k = ids_TK.shape[-1]
        order_A, counts_E = LocalDispatcher(self.num_experts).group(ids_TK)
        recv_counts = torch.empty_like(counts_E)
        dist.all_to_all_single(recv_counts, counts_E, group=self.group)
        send_PL = counts_E.view(self.ep_size, self.num_local)
        recv_PL = recv_counts.view(self.ep_size, self.num_local)  # [source rank, local expert]
        send_splits, recv_splits = send_PL.sum(1).tolist(), recv_PL.sum(1).tolist()
        x_recv = all_to_all(x_TD[order_A // top_k], recv_splits, send_splits, self.group)
        regroup_G = _block_transpose(recv_PL)
        ctx = _AllToAllContext(order_A, x_TD.shape[0], send_splits, recv_splits, regroup_G)
        return x_recv[regroup_G], recv_PL.sum(0), ctx

    def combine(self, y_GD: torch.Tensor, weights_TK: torch.Tensor, ctx: _AllToAllContext) -> torch.Tensor:
        y_recv = torch.empty_like(y_GD).index_copy(0, ctx.regroup_G, y_GD)  # back to (source, expert) order
        y_AD = all_to_all(y_recv, ctx.send_splits, ctx.recv_splits, self.group)
        return scatter_weighted(y_AD, weights_TK, ctx.order_A, ctx.num_tokens)


def _block_transpose(counts_PL: torch.Tensor) -> torch.Tensor:
    """Row order that turns blocks laid out (p, l) with sizes ``counts_PL`` into (l, p) order."""
    sizes = counts_PL.reshape(-1).tolist()
    blocks = torch.split(torch.arange(sum(sizes), device=counts_PL.device), sizes)
    p, l_ = counts_PL.shape
    return torch.cat([blocks[i * l_ + j] for j in range(l_) for i in range(p)])


class GroupedExperts(nn.Module):
    """``num_local`` SwiGLU experts stored as stacked tensors (HF layout per expert).

    ``w1``/``w3``: [L, F, D] (rows are FFN neurons, like ``gate_proj``/``up_proj``); ``w2``: [L, D, F]
    (like ``down_proj``). Checkpoints store them per expert under HF Mixtral names; the one mapping
    lives in :mod:`drop_upcycling.checkpoint`. ``expert_offset`` is the global id of local expert 0
    (non-zero only under expert parallelism).
    """

    def __init__(self, num_local: int, dim: int, ffn_dim: int, expert_offset: int = 0) -> None:
        super().__init__()
        self.num_local = num_local
        self.expert_offset = expert_offset
        self.w1 = nn.Parameter(torch.empty(num_local, ffn_dim, dim))
        self.w2 = nn.Parameter(torch.empty(num_local, dim, ffn_dim))
        self.w3 = nn.Parameter(torch.empty(num_local, ffn_dim, dim))

    def forward(self, x_GD: torch.Tensor, counts_L: torch.Tensor) -> torch.Tensor:
        return self._expert_ffn(x_GD, counts_L.tolist())

    def _expert_ffn(self, x_GD: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """The seam for a grouped-GEMM kernel: here one matmul chain per expert (E iterations, not T)."""
        outputs = []
        # unbind (one backward op for all experts) rather than w1[e] per expert, whose backward
        # materializes a zero-filled full-size gradient for each expert.
        experts = zip(self.w1.unbind(0), self.w2.unbind(0), self.w3.unbind(0), strict=True)
        for x_nD, (w1_FD, w2_DF, w3_FD) in zip(torch.split(x_GD, counts), experts, strict=True):
            # An expert with no tokens still runs on an empty [0, D] slice: it stays in the autograd
            # graph and gets a zero gradient, so gradient reduction never meets a missing grad.
            h_nF = F.silu(x_nD @ w1_FD.T) * (x_nD @ w3_FD.T)
            outputs.append(h_nF @ w2_DF.T)
        return torch.cat(outputs) if outputs else x_GD.new_zeros(0, x_GD.shape[-1])


class SparseMoeBlock(nn.Module):
    """Router + dispatcher + experts. Attribute names follow HF: ``gate`` is the router."""

    def __init__(
        self,
        dim: int,
        ffn_dim: int,
        num_experts: int,
        top_k: int,
        num_local: int | None = None,
        expert_offset: int = 0,
        dispatcher: Dispatcher | None = None,
    ) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.top_k = top_k
        self.gate = nn.Linear(dim, num_experts, bias=False)
        self.experts = GroupedExperts(num_local or num_experts, dim, ffn_dim, expert_offset)
        self.dispatcher: Dispatcher = dispatcher or LocalDispatcher(num_experts)

    def forward(self, x_BSD: torch.Tensor) -> tuple[torch.Tensor, Routing]:
        shape = x_BSD.shape
        x_TD = x_BSD.reshape(-1, shape[-1])
        routing = route(self.gate(x_TD), self.top_k, x_TD.dtype)
        x_GD, counts_L, ctx = self.dispatcher.dispatch(x_TD, routing.ids_TK)
        y_GD = self.experts(x_GD, counts_L)
        y_TD = self.dispatcher.combine(y_GD, routing.weights_TK, ctx)
        return y_TD.reshape(shape), routing


# ---------------------------------------------------------------------------- auxiliary losses
def load_balancing_loss(
    logits_per_layer: list[torch.Tensor], num_experts: int, top_k: int, mode: str = "global",
    group: dist.ProcessGroup | None = None,
) -> torch.Tensor:
    """Switch-style balance loss ``E * sum_e f_e * P_e`` as HF Mixtral computes it.

    ``global`` (the paper's setting, HF's ``load_balancing_loss_func``): the router logits of all
    layers are concatenated and one term is computed; f is counted per top-k slot, so a perfectly
    balanced router scores ``top_k``. ``per_layer``: the same term per layer, averaged.

    ``group`` (data-parallel training): the routing fractions f (not differentiable) are averaged
    over the ranks of ``group``, each holding the same number of tokens. Each rank then returns
    ``E * sum f_global * P_local``, whose mean over ranks is exactly the loss of the whole global
    batch and whose averaged gradient is that loss's gradient.
    """
    if not logits_per_layer:
        raise ValueError("no router logits")
    fractions, probs = [], []
    for logits_TE in logits_per_layer:
        probs_TE = F.softmax(logits_TE, dim=-1, dtype=torch.float32)
        _, ids_TK = torch.topk(probs_TE, top_k, dim=-1)
        mask_TKE = F.one_hot(ids_TK, num_experts).float()
        fractions.append(mask_TKE.mean(dim=0))  # [K, E]
        probs.append(probs_TE.mean(dim=0))  # [E]
    f_LKE = torch.stack(fractions)
    if group is not None and dist.get_world_size(group) > 1:
        f_LKE = f_LKE.detach().clone()
        dist.all_reduce(f_LKE, group=group)
        f_LKE = f_LKE / dist.get_world_size(group)
    if mode == "global":
        # Mean over all layers' tokens == mean of per-layer means (every layer sees the same tokens).
        f_KE = f_LKE.mean(dim=0)
        p_E = torch.stack(probs).mean(dim=0)
        return num_experts * (f_KE * p_E).sum()
    if mode == "per_layer":
        return torch.stack([num_experts * (f * p).sum() for f, p in zip(f_LKE, probs, strict=True)]).mean()
    raise ValueError(f"unknown aux loss mode {mode!r}")


def router_z_loss(logits_per_layer: list[torch.Tensor]) -> torch.Tensor:
    """ST-MoE z-loss: mean over tokens of logsumexp(logits)^2, averaged over layers."""
    return torch.stack([torch.logsumexp(lg.float(), dim=-1).square().mean() for lg in logits_per_layer]).mean()
