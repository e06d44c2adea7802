"""The Mixtral MoE layer: router, token dispatch, grouped experts and the auxiliary losses.

Split the torchtitan way so that expert parallelism is a different dispatcher, not a different MoE:

- :func:`route`: router logits -> top-k expert ids and renormalized weights (HF Mixtral semantics:
  softmax in fp32 over all E experts, top-k, renormalize the k weights to sum to 1).
- a *dispatcher* groups the token copies by expert and later scatters expert outputs back:
  :class:`LocalDispatcher` on one device; the expert-parallel all-to-all dispatcher implements the
  same two methods and exchanges the grouped tokens between "group by expert" and "run experts".
- :class:`GroupedExperts`: the SwiGLU math on tokens that are already grouped by expert, given
  tokens-per-expert counts. ``_expert_ffn`` is the one seam for the expert kernel; it takes the
  groups' end offsets as a tensor on the tokens' device. Two kernels sit behind it (``kernel=``):
  ``"grouped"``, torch's grouped GEMM (``F.grouped_mm``: one launch per projection, offsets read on
  the device, no host sync), and ``"loop"``, one matmul chain per expert (needs the counts on the
  host). ``"auto"`` takes the grouped GEMM where it is a real, verified kernel (Hopper, bf16) and the loop
  elsewhere, where it measures as fast or faster (CPU: torch's CPU grouped GEMM loops over groups itself).

Dropless: every token copy is computed, no capacity factor. Host syncs: none on the single-device
grouped path; under expert parallelism one per dispatch, the all-to-all's split sizes.

Shape legend: T tokens, D hidden, F expert FFN width, E experts (global), L local experts,
K top-k, A = T*K token copies (assignments), G grouped assignments received by local experts.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Literal, Protocol, get_args

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
    probs_TE: torch.Tensor  # fp32 softmax of the logits (the balance loss reuses it rather than recompute)


def route(logits_TE: torch.Tensor, top_k: int, dtype: torch.dtype) -> Routing:
    """softmax -> top-k -> renormalize, exactly as ``transformers`` Mixtral does it (fp32 softmax)."""
    probs_TE = F.softmax(logits_TE, dim=-1, dtype=torch.float32)
    weights_TK, ids_TK = torch.topk(probs_TE, top_k, dim=-1)
    weights_TK = weights_TK / weights_TK.sum(dim=-1, keepdim=True)
    return Routing(logits_TE=logits_TE, weights_TK=weights_TK.to(dtype), ids_TK=ids_TK, probs_TE=probs_TE)


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
        """(order_A, counts_E): the permutation that groups the flattened copies by expert, and the counts.

        Counted by a binary search in the sorted ids rather than ``bincount``, which on CUDA reads the
        largest id back to the host to size its output (a sync per layer per step).
        """
        ids_A = ids_TK.reshape(-1)
        sorted_A, order_A = torch.sort(ids_A, stable=True)
        experts_E = torch.arange(self.num_experts, device=ids_A.device, dtype=ids_A.dtype)
        ends_E = torch.searchsorted(sorted_A, experts_E, right=True)
        return order_A, torch.diff(ends_E, prepend=ends_E.new_zeros(1))

    def dispatch(self, x_TD: torch.Tensor, ids_TK: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, _LocalContext]:
        top_k = ids_TK.shape[-1]
        order_A, counts_E = self.group(ids_TK)
        x_AD = x_TD[order_A // top_k]
        return x_AD, counts_E, _LocalContext(order_A=order_A, num_tokens=x_TD.shape[0])

    def combine(self, y_AD: torch.Tensor, weights_TK: torch.Tensor, ctx: _LocalContext) -> torch.Tensor:
        return scatter_weighted(y_AD, weights_TK, ctx.order_A, ctx.num_tokens)


def scatter_weighted(y_AD: torch.Tensor, weights_TK: torch.Tensor, order_A: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """Inverse of the grouping: out[t] = sum_k w[t, k] * y[copy (t, k)].

    Sums in the promoted dtype of the expert outputs and the weights: under bf16 autocast the experts
    return bf16 and the weights are fp32 (the residual stream's dtype), and the k copies of a token
    are then summed in fp32, as ``transformers`` does into its fp32 hidden states.
    """
    top_k = weights_TK.shape[-1]
    w_A = weights_TK.reshape(-1)[order_A].unsqueeze(-1)
    out_TD = y_AD.new_zeros(num_tokens, y_AD.shape[-1], dtype=torch.promote_types(y_AD.dtype, w_A.dtype))
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
        # The one host sync of the layer: all_to_all_single takes its split sizes as Python ints.
        send_splits, recv_splits = torch.stack([send_PL.sum(1), recv_PL.sum(1)]).tolist()
        x_recv = all_to_all(x_TD[order_A // top_k], recv_splits, send_splits, self.group)
        regroup_G = _block_transpose(recv_PL, sum(recv_splits))
        ctx = _AllToAllContext(order_A, x_TD.shape[0], send_splits, recv_splits, regroup_G)
        return x_recv[regroup_G], recv_PL.sum(0), ctx

    def combine(self, y_GD: torch.Tensor, weights_TK: torch.Tensor, ctx: _AllToAllContext) -> torch.Tensor:
        y_recv = torch.empty_like(y_GD).index_copy(0, ctx.regroup_G, y_GD)  # back to (source, expert) order
        y_AD = all_to_all(y_recv, ctx.send_splits, ctx.recv_splits, self.group)
        return scatter_weighted(y_AD, weights_TK, ctx.order_A, ctx.num_tokens)


def _block_transpose(counts_PL: torch.Tensor, total: int) -> torch.Tensor:
    """Row order that turns blocks laid out (p, l) with sizes ``counts_PL`` into (l, p) order.

    Computed on the counts' device (``total`` = their sum, already on the host) so that regrouping
    adds no host sync: output row j lies in block (p, l) at rank r, and comes from row start_pl[p, l] + r.
    """
    p_, l_ = counts_PL.shape
    sizes_pl = counts_PL.reshape(-1)
    sizes_lp = counts_PL.t().reshape(-1)
    start_pl = torch.cumsum(sizes_pl, 0) - sizes_pl  # block starts in the received (p, l) layout
    start_lp = torch.cumsum(sizes_lp, 0) - sizes_lp  # block starts in the wanted (l, p) layout
    blocks_lp = torch.arange(p_ * l_, device=counts_PL.device)
    block_G = torch.repeat_interleave(blocks_lp, sizes_lp, output_size=total)  # l * P + p of each output row
    rank_G = torch.arange(total, device=counts_PL.device) - start_lp[block_G]
    return start_pl[(block_G % p_) * l_ + block_G // p_] + rank_G


ExpertKernel = Literal["loop", "grouped", "auto"]
EXPERT_KERNELS: tuple[str, ...] = get_args(ExpertKernel)


def check_kernel(kernel: str) -> None:
    """A clear error for a kernel name that is not one of :data:`EXPERT_KERNELS`."""
    if kernel not in EXPERT_KERNELS:
        raise ValueError(f"expert kernel must be one of {', '.join(EXPERT_KERNELS)}, got {kernel!r}")


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the expert matmuls run in: autocast's where it is on (it would cast ``mm``), else ``x``'s."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


@functools.cache
def _cuda_capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def grouped_mm_unsupported(x_GD: torch.Tensor, ffn_dim: int) -> str | None:
    """Why ``F.grouped_mm`` cannot run these experts (None when it can): its dtype and alignment rules.

    torch 2.13 (CPU and CUDA) takes float32/bfloat16/float16 operands whose row strides are multiples
    of 16 bytes, and int32 offsets.
    """
    dtype = compute_dtype(x_GD)
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return f"torch's grouped GEMM takes float32, bfloat16 or float16, not {dtype}"
    if (x_GD.shape[-1] * dtype.itemsize) % 16 or (ffn_dim * dtype.itemsize) % 16:
        return (f"torch's grouped GEMM needs rows of a multiple of 16 bytes; hidden {x_GD.shape[-1]} and "
                f"ffn {ffn_dim} in {dtype} are not")
    return None


def auto_kernel(device_type: str, dtype: torch.dtype, capability: tuple[int, int] | None) -> str:
    """What ``kernel="auto"`` runs: the grouped GEMM on Hopper (sm90) in bf16, the loop everywhere else.

    On sm90 torch's grouped GEMM is one CUTLASS kernel over device offsets, and the loop would read
    the counts back to the host every layer. Blackwell (sm100+) takes a different (cuBLAS) path that
    is reported to give experts with no tokens non-zero weight gradients (pytorch/pytorch#172439,
    open; NaN reports in #193633 with torch 2.13): it stays on the loop until benchmarks/gpu_check.sh
    passes there (its ``kernels_equal`` check tests exactly that); ``kernel="grouped"`` forces it.
    Elsewhere torch's grouped GEMM loops over the groups itself (CPU, pre-sm90 CUDA), and on CPU our
    loop measures as fast (benchmarks/bench_moe_layer.py), so the simpler kernel wins.
    """
    hopper = capability is not None and capability[0] == 9
    return "grouped" if device_type == "cuda" and dtype == torch.bfloat16 and hopper else "loop"


def resolve_kernel(kernel: str, x_GD: torch.Tensor, ffn_dim: int) -> str:
    """``"loop"`` or ``"grouped"`` for these tokens; an explicit ``"grouped"`` that cannot run is an error."""
    check_kernel(kernel)
    why = grouped_mm_unsupported(x_GD, ffn_dim)
    if kernel == "auto":
        capability = None
        if x_GD.is_cuda:
            capability = _cuda_capability(x_GD.device.index if x_GD.device.index is not None
                                          else torch.cuda.current_device())
        return "loop" if why else auto_kernel(x_GD.device.type, compute_dtype(x_GD), capability)
    if kernel == "grouped" and why:
        raise ValueError(f"expert kernel 'grouped': {why}; use kernel='loop' or 'auto'")
    return kernel


def expert_ffn_loop(x_GD: torch.Tensor, w1_LFD: torch.Tensor, w2_LDF: torch.Tensor, w3_LFD: torch.Tensor,
                    offsets_L: torch.Tensor) -> torch.Tensor:
    """One matmul chain per expert (L iterations, not T). Reads the offsets on the host: one sync."""
    counts = torch.diff(offsets_L, prepend=offsets_L.new_zeros(1)).tolist()
    return _loop_over_counts(x_GD, w1_LFD, w2_LDF, w3_LFD, counts)


def _loop_over_counts(x_GD: torch.Tensor, w1_LFD: torch.Tensor, w2_LDF: torch.Tensor, w3_LFD: torch.Tensor,
                      counts: list[int]) -> torch.Tensor:
    outputs = []
    # unbind (one backward op for all experts) rather than w1[e] per expert, whose backward
    # materializes a zero-filled full-size gradient for each expert.
    experts = zip(w1_LFD.unbind(0), w2_LDF.unbind(0), w3_LFD.unbind(0), strict=True)
    for x_nD, (w1_FD, w2_DF, w3_FD) in zip(torch.split(x_GD, counts), experts, strict=True):
        # An expert with no tokens still runs on an empty [0, D] slice: it stays in the autograd
        # graph and gets a zero gradient, so gradient reduction never meets a missing grad.
        h_nF = F.silu(x_nD @ w1_FD.T) * (x_nD @ w3_FD.T)
        outputs.append(h_nF @ w2_DF.T)
    return torch.cat(outputs) if outputs else x_GD.new_zeros(0, x_GD.shape[-1])


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward gives the grouped GEMM's backward the dense strides it requires: it
    rejects stride-0 gradients (``y.sum().backward()`` sends an expanded one), even with zero rows,
    where torch counts any strides as contiguous."""

    @staticmethod
    def forward(ctx, y: torch.Tensor) -> torch.Tensor:
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        if grad.numel() == 0 or not grad.is_contiguous():
            return grad.clone(memory_format=torch.contiguous_format)
        return grad


def expert_ffn_grouped(x_GD: torch.Tensor, w1_LFD: torch.Tensor, w2_LDF: torch.Tensor, w3_LFD: torch.Tensor,
                       offsets_L: torch.Tensor) -> torch.Tensor:
    """Three grouped GEMMs over int32 end offsets that stay on the device (no host sync).

    Casts to the autocast dtype by hand: autocast's cast lists cover ``mm``, not ``grouped_mm``.
    ``w.transpose(-2, -1)`` is a view ([L, D, F] column-major), the layout the CUDA kernel wants.
    An expert with no rows gets a zero weight gradient, like the loop's empty slice. No rows at all
    (a rank that received nothing under expert parallelism; the row count is known on the host) runs
    the loop on empty slices: grouped GEMM backends disagree on a zero-length contraction
    (pytorch/pytorch#192497), and the empty loop is exact and costs nothing.
    """
    if x_GD.shape[0] == 0:
        return _loop_over_counts(x_GD, w1_LFD, w2_LDF, w3_LFD, [0] * w1_LFD.shape[0])
    dtype = compute_dtype(x_GD)
    x_GD = x_GD.to(dtype)
    w1_LDF, w3_LDF, w2_LFD = (w.to(dtype).transpose(-2, -1) for w in (w1_LFD, w3_LFD, w2_LDF))
    offs = offsets_L.to(torch.int32)
    h_GF = F.silu(F.grouped_mm(x_GD, w1_LDF, offs=offs)) * F.grouped_mm(x_GD, w3_LDF, offs=offs)
    return _ContiguousGrad.apply(F.grouped_mm(h_GF, w2_LFD, offs=offs))


_KERNELS = {"loop": expert_ffn_loop, "grouped": expert_ffn_grouped}


class GroupedExperts(nn.Module):
    """``num_local`` SwiGLU experts stored as stacked tensors (HF layout per expert).

    ``w1``/``w3``: [L, F, D] (rows are FFN neurons, like ``gate_proj``/``up_proj``); ``w2``: [L, D, F]
    (like ``down_proj``). Checkpoints store them per expert under HF Mixtral names; the one mapping
    lives in :mod:`drop_upcycling.checkpoint`. ``expert_offset`` is the global id of local expert 0
    (non-zero only under expert parallelism). ``kernel``: ``"loop"``, ``"grouped"`` or ``"auto"``
    (see :func:`resolve_kernel`); an attribute, so it can be switched on a built model
    (:func:`set_expert_kernel`).
    """

    def __init__(self, num_local: int, dim: int, ffn_dim: int, expert_offset: int = 0,
                 kernel: ExpertKernel = "auto") -> None:
        super().__init__()
        check_kernel(kernel)
        self.num_local = num_local
        self.expert_offset = expert_offset
        self.kernel: ExpertKernel = kernel
        self.w1 = nn.Parameter(torch.empty(num_local, ffn_dim, dim))
        self.w2 = nn.Parameter(torch.empty(num_local, dim, ffn_dim))
        self.w3 = nn.Parameter(torch.empty(num_local, ffn_dim, dim))

    def forward(self, x_GD: torch.Tensor, counts_L: torch.Tensor) -> torch.Tensor:
        # Offsets on the counts' device: the grouped kernel never brings them to the host.
        return self._expert_ffn(x_GD, torch.cumsum(counts_L, 0))

    def _expert_ffn(self, x_GD: torch.Tensor, offsets_L: torch.Tensor) -> torch.Tensor:
        """The seam for the expert kernel: rows ``[offsets_L[l-1], offsets_L[l])`` of ``x_GD`` go to expert l."""
        kernel = resolve_kernel(self.kernel, x_GD, self.w1.shape[1])
        return _KERNELS[kernel](x_GD, self.w1, self.w2, self.w3, offsets_L)


def set_expert_kernel(module: nn.Module, kernel: ExpertKernel) -> None:
    """Switch every :class:`GroupedExperts` under ``module`` to ``kernel`` (benchmarks, checks)."""
    check_kernel(kernel)
    for m in module.modules():
        if isinstance(m, GroupedExperts):
            m.kernel = kernel


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
        kernel: ExpertKernel = "auto",
    ) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.top_k = top_k
        self.gate = nn.Linear(dim, num_experts, bias=False)
        self.experts = GroupedExperts(num_local or num_experts, dim, ffn_dim, expert_offset, kernel)
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
    group: dist.ProcessGroup | None = None, routed: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> torch.Tensor:
    """Switch-style balance loss ``E * sum_e f_e * P_e`` as HF Mixtral computes it.

    ``global`` (the paper's setting, HF's ``load_balancing_loss_func``): the router logits of all
    layers are concatenated and one term is computed; f is counted per top-k slot, so a perfectly
    balanced router scores ``top_k``. ``per_layer``: the same term per layer, averaged.

    ``group`` (data-parallel training): the routing fractions f (not differentiable) are averaged
    over the ranks of ``group``, each holding the same number of tokens. Each rank then returns
    ``E * sum f_global * P_local``, whose mean over ranks is exactly the loss of the whole global
    batch and whose averaged gradient is that loss's gradient. Without ``group`` the fractions are this
    batch's alone: HF's ``load_balancing_loss_func`` on these logits (the trainer's ``aux_loss_scope:
    micro_batch``, the authors' setting).

    ``routed``: the forward's (fp32 softmax, top-k ids) per layer (:class:`Routing`), the same ops on the
    same logits, so the loss is bitwise the recomputed one without a second softmax and top-k per layer
    (on CPU a softmax over 8 experts costs as much as a matmul of the layer) and with one softmax
    backward instead of two.
    """
    if not logits_per_layer:
        raise ValueError("no router logits")
    if routed is None:
        routed = [(r.probs_TE, r.ids_TK) for r in (route(lg, top_k, lg.dtype) for lg in logits_per_layer)]
    fractions, probs = [], []
    for probs_TE, ids_TK in routed:
        # one_hot's range checks read the ids back to the host (on CPU; a sync where a build checks them).
        mask_TKE = (ids_TK.unsqueeze(-1) == torch.arange(num_experts, device=ids_TK.device)).float()
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
