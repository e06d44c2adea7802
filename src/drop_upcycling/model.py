"""Llama (dense) and Mixtral (MoE) decoders in plain PyTorch, with HF parameter names.

Reads top to bottom: RMSNorm, rotary embedding, grouped-query attention (SDPA, causal), the
SwiGLU MLP, a decoder layer whose FFN is either the dense MLP (``mlp``) or the sparse MoE block
(``block_sparse_moe``, see :mod:`drop_upcycling.moe`), the decoder and the LM head, and the loss
that training optimizes (:func:`causal_lm_loss`: the model computes it with labels, the trainer
calls it directly with its data-parallel group).

Every parameter has the name of its ``LlamaForCausalLM`` / ``MixtralForCausalLM`` counterpart,
except that the experts of a layer are stacked into ``experts.w1|w2|w3`` tensors for grouped
compute; :mod:`drop_upcycling.checkpoint` maps them to HF's per-expert tensors on disk. Under
expert parallelism a model holds ``num_local`` of the ``E`` experts, from global id ``expert_offset``.

Random initialization is keyed: every tensor's values come from a generator seeded by (seed,
tensor name), so a model is the same whatever order or device layout it is built in.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .configs import AUX_LOSS_SCOPES, ModelConfig
from .moe import AllToAllDispatcher, Dispatcher, SparseMoeBlock, load_balancing_loss, router_z_loss
from .parallel import all_reduce_mean


def keyed_generator(seed: int, *key: object) -> torch.Generator:
    """A CPU generator whose stream depends only on (seed, key): order- and layout-independent draws."""
    digest = hashlib.blake2b(repr((int(seed), *key)).encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") & ((1 << 63) - 1))


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalize in fp32 and cast back before the scale, as HF Llama does.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rotary_cos_sin(seq_len: int, head_dim: int, theta: float, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables [S, head_dim] in fp32 for HF's rotate-half RoPE convention."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim))
    freqs = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float32), inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def signed_sin(sin: torch.Tensor) -> torch.Tensor:
    """The sin table with its first half negated: what :func:`apply_rotary` takes."""
    half = sin.shape[-1] // 2
    return torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)


def apply_rotary(x_BHSd: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    """HF's ``x * cos + rotate_half(x) * sin``, where ``rotate_half(x) = cat(-x2, x1)``.

    Computed as ``x * cos + roll(x, d/2) * sin_signed`` (:func:`signed_sin`): the minus sign moves from
    the activation to the table, ``(-a) * b == a * (-b)`` exactly, so values and gradients are bitwise
    HF's, with one copy instead of a negation and a concatenation (and fewer ops in the backward).
    """
    half = x_BHSd.shape[-1] // 2
    return (x_BHSd * cos + torch.roll(x_BHSd, half, dims=-1) * sin_signed).to(x_BHSd.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, cfg.hidden_size, bias=False)

    def forward(self, x_BSD: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
        b, s, _ = x_BSD.shape
        q = self.q_proj(x_BSD).view(b, s, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x_BSD).view(b, s, self.n_kv, self.head_dim).transpose(1, 2)
        v = self.v_proj(x_BSD).view(b, s, self.n_kv, self.head_dim).transpose(1, 2)
        cos, sin_signed = cos.to(q.dtype), sin_signed.to(q.dtype)
        q, k = apply_rotary(q, cos, sin_signed), apply_rotary(k, cos, sin_signed)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.n_kv != self.n_heads)
        return self.o_proj(out.transpose(1, 2).reshape(b, s, -1))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, num_local: int | None, expert_offset: int,
                 dispatcher: Dispatcher | None) -> None:
        super().__init__()
        self.self_attn = Attention(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        if cfg.is_moe:
            self.block_sparse_moe = SparseMoeBlock(
                cfg.hidden_size, cfg.intermediate_size, cfg.num_experts, cfg.num_experts_per_tok,
                num_local=num_local, expert_offset=expert_offset, dispatcher=dispatcher,
            )
        else:
            self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin_signed)
        h = self.post_attention_layernorm(x)
        if hasattr(self, "block_sparse_moe"):
            y, routing = self.block_sparse_moe(h)
            return x + y, routing
        return x + self.mlp(h), None


class Decoder(nn.Module):
    def __init__(self, cfg: ModelConfig, num_local: int | None, expert_offset: int,
                 dispatcher: Dispatcher | None) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(
            DecoderLayer(cfg, num_local, expert_offset, dispatcher) for _ in range(cfg.num_hidden_layers)
        )
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


@dataclass
class Losses:
    """What training optimizes, and its terms (the MoE terms are None for a dense model)."""

    loss: torch.Tensor  # lm_loss + router_aux_loss_coef * aux_loss (+ router_z_loss_coef * z_loss)
    lm_loss: torch.Tensor
    aux_loss: torch.Tensor | None = None
    z_loss: torch.Tensor | None = None


def next_token_ce_sum(logits_BSV: torch.Tensor, labels_BS: torch.Tensor) -> torch.Tensor:
    """Sum over positions of the cross-entropy of token ``s + 1`` given the logits at ``s`` (-100 ignored).

    Bitwise ``F.cross_entropy(logits[:, :-1].reshape(-1, V).float(), labels[:, 1:].reshape(-1),
    ignore_index=-100, reduction="sum")``, value and gradient, without its cost at a small model's
    shapes, where the logits are the largest activation of the step: slicing off the last position
    copies all the logits to flatten them, and the slice's backward zero-fills and copies a gradient
    of the same size. Here the log-softmax reads the logits as they are (all positions, a view), only
    the target log-probabilities are gathered, and the sum is ``nll_loss`` over exactly the rows it
    summed before (same count, same order; one column each), so even the rounding of the sum is unchanged.
    """
    b, s, v = logits_BSV.shape
    logp_NV = F.log_softmax(logits_BSV.reshape(-1, v).float(), dim=-1)
    targets_BS1 = labels_BS[:, 1:]  # S - 1 predicted positions per sequence
    # Any class for ignored targets and the unpredicted last position: those rows are dropped below.
    gather_N1 = F.pad(targets_BS1.clamp_min(0), (0, 1)).reshape(-1, 1)
    picked_BS = logp_NV.gather(1, gather_N1).view(b, s)
    keep_M = torch.where(targets_BS1 == -100, -100, 0).reshape(-1)  # column 0 of picked, or ignored
    return F.nll_loss(picked_BS[:, :-1].reshape(-1, 1), keep_M, ignore_index=-100, reduction="sum")


@functools.cache
def _compiled_ce_sum():
    """:func:`next_token_ce_sum` through ``torch.compile`` (one fused log-softmax and gather), made once."""
    return torch.compile(next_token_ce_sum, dynamic=False)


def compile_for_training(model: CausalLM) -> None:
    """``torch.compile`` each decoder layer in place (``nn.Module.compile``: parameter names, checkpoints
    and hooks unchanged); the trainer's ``compile`` key, with :func:`causal_lm_loss`'s ``compiled``.

    Why: at a small model's shapes the step is bound by the elementwise work around the matmuls, one
    memory pass per eager op (RMSNorm, RoPE, the router's softmax and top-k, the experts' SwiGLU);
    inductor fuses it. The loop kernel's per-expert row counts are read on the host; with
    ``capture_scalar_outputs`` they stay in the graph as symbolic sizes (no graph break, one compile
    for every routing). The expert-parallel all-to-alls run eagerly (the dispatcher is excluded from
    compilation): the collectives and their Python split sizes stay outside any graph.
    """
    torch._dynamo.config.capture_scalar_outputs = True
    layers = list(model.model.layers)
    dispatchers = {id(m.dispatcher): m.dispatcher for m in (getattr(lay, "block_sparse_moe", None) for lay in layers)
                   if m is not None}  # layers may share one
    for d in dispatchers.values():
        if isinstance(d, AllToAllDispatcher):
            # Here, not as decorators: torch.compiler.disable imports torch._dynamo (a second per process).
            d.dispatch, d.combine = torch.compiler.disable(d.dispatch), torch.compiler.disable(d.combine)
    for layer in layers:
        layer.compile()


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, router_logits: list[torch.Tensor],
                   cfg: ModelConfig, group: dist.ProcessGroup | None = None,
                   aux_loss_scope: str = "global_batch", compiled: bool = False,
                   routed: list[tuple[torch.Tensor, torch.Tensor]] | None = None) -> Losses:
    """The training loss of one batch: next-token cross-entropy plus the weighted router losses.

    ``labels`` follow HF: the shape of the input ids, shifted here, -100 ignored. Without ``group``
    this is HF's loss on the batch. With ``group`` (data parallelism) it is this rank's share: its
    mean over the ranks of ``group`` equals the loss of their concatenated batches. For that the
    cross-entropy sum is divided by the mean number of predicted tokens per rank (a rank with more
    ignored labels weighs less); the z-loss is a plain token mean.

    ``aux_loss_scope`` (:data:`~drop_upcycling.configs.AUX_LOSS_SCOPES`) says which tokens the balance
    loss's routing fractions count. ``"global_batch"``: those of the whole group
    (:func:`~drop_upcycling.moe.load_balancing_loss` pools them), so the ranks' mean is the balance loss
    of their concatenated batches, whatever the layout. ``"micro_batch"``: this batch's alone, HF
    Mixtral's ``load_balancing_loss_func`` on this rank's router logits, as moe-recipes (the authors'
    trainer) computes it in every forward; a rank whose batch is one domain is then penalized for
    routing it to few experts, even when the ranks together are balanced. How the layers combine is
    the model's ``aux_loss_mode``, a separate choice. ``compiled``: the cross-entropy through
    ``torch.compile`` (:func:`compile_for_training`; equal to fp32 rounding). ``routed``: the forward's
    (router softmax, expert ids) per layer, reused by the balance loss (bitwise the same loss).
    """
    if aux_loss_scope not in AUX_LOSS_SCOPES:
        raise ValueError(f"aux_loss_scope must be one of {AUX_LOSS_SCOPES}, got {aux_loss_scope!r}")
    targets = labels[:, 1:].reshape(-1)
    ce_sum = (_compiled_ce_sum() if compiled else next_token_ce_sum)(logits, labels)
    n_valid = (targets != -100).sum().to(torch.float64)
    if group is not None and dist.get_world_size(group) > 1:
        n_valid = all_reduce_mean(n_valid, group)
    # On one rank this is reduction="mean" (the same sum over the same count; bitwise so on CPU).
    lm_loss = ce_sum / n_valid.to(ce_sum.dtype)
    losses = Losses(loss=lm_loss, lm_loss=lm_loss)
    if router_logits:
        balance_group = group if aux_loss_scope == "global_batch" else None
        losses.aux_loss = load_balancing_loss(router_logits, cfg.num_experts, cfg.num_experts_per_tok,
                                              cfg.aux_loss_mode, group=balance_group, routed=routed)
        losses.loss = losses.loss + cfg.router_aux_loss_coef * losses.aux_loss
        if cfg.router_z_loss_coef > 0:
            losses.z_loss = router_z_loss(router_logits)
            losses.loss = losses.loss + cfg.router_z_loss_coef * losses.z_loss
    return losses


@dataclass
class CausalLMOutput:
    """What :meth:`CausalLM.forward` returns; the loss terms are read under HF's names (``out.loss``)."""

    logits: torch.Tensor
    router_logits: list[torch.Tensor] = field(default_factory=list)  # per MoE layer, [T, E]
    expert_ids: list[torch.Tensor] = field(default_factory=list)  # per MoE layer, [T, K] (on request)
    # per MoE layer, (fp32 router softmax [T, E], expert ids [T, K]): what causal_lm_loss's balance loss reuses
    routed: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    losses: Losses | None = None  # when labels were given

    @property
    def loss(self) -> torch.Tensor | None:
        return None if self.losses is None else self.losses.loss

    @property
    def lm_loss(self) -> torch.Tensor | None:
        return None if self.losses is None else self.losses.lm_loss

    @property
    def aux_loss(self) -> torch.Tensor | None:
        return None if self.losses is None else self.losses.aux_loss

    @property
    def z_loss(self) -> torch.Tensor | None:
        return None if self.losses is None else self.losses.z_loss


class CausalLM(nn.Module):
    """``LlamaForCausalLM`` when ``cfg.num_experts == 0``, else ``MixtralForCausalLM``.

    ``num_local``/``expert_offset`` hold a slice of the experts (expert parallelism; default: all);
    ``dispatcher`` replaces the single-device token grouping.

    ``activation_checkpointing`` (the trainer's key of that name): each decoder layer runs under
    ``torch.utils.checkpoint`` (non-reentrant) when gradients are recorded, so the forward keeps only
    the layers' inputs and the backward recomputes one layer at a time. Recomputing an MoE layer runs
    its all-to-alls again; every rank recomputes the same layers in the same order (the backward's
    order, which the graph fixes and the ranks share), so the collectives pair up. The recomputation
    must reproduce the forward's routing: torch checks the recomputed tensors' shapes and refuses
    otherwise (a nondeterministic GPU kernel that changed a top-k choice), rather than mismatch silently.
    """

    def __init__(self, cfg: ModelConfig, num_local: int | None = None, expert_offset: int = 0,
                 dispatcher: Dispatcher | None = None) -> None:
        super().__init__()
        self.config = cfg
        self.model = Decoder(cfg, num_local, expert_offset, dispatcher)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.activation_checkpointing = False

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None,
                return_expert_ids: bool = False) -> CausalLMOutput:
        """``labels`` follow HF: same shape as ``input_ids``, shifted inside, -100 ignored."""
        cfg = self.config
        x = self.model.embed_tokens(input_ids)
        cos, sin = rotary_cos_sin(input_ids.shape[1], cfg.head_dim, cfg.rope_theta, input_ids.device)
        sin_signed = signed_sin(sin)
        router_logits, routed = [], []
        recompute = self.activation_checkpointing and torch.is_grad_enabled()
        for layer in self.model.layers:
            if recompute:
                x, routing = checkpoint(layer, x, cos, sin_signed, use_reentrant=False)
            else:
                x, routing = layer(x, cos, sin_signed)
            if routing is not None:
                router_logits.append(routing.logits_TE)
                routed.append((routing.probs_TE, routing.ids_TK))
        expert_ids = [ids_TK for _, ids_TK in routed] if return_expert_ids else []
        logits = self.lm_head(self.model.norm(x))
        losses = None if labels is None else causal_lm_loss(logits, labels, router_logits, cfg, routed=routed or None)
        return CausalLMOutput(logits=logits, router_logits=router_logits, expert_ids=expert_ids, routed=routed,
                              losses=losses)

    @torch.no_grad()
    def init_weights(self, seed: int) -> None:
        """HF's default init (normal(0, initializer_range), norms at 1), keyed per tensor name."""
        for name, param in self.named_parameters():
            param.copy_(init_tensor(name, tuple(param.shape), self.config, seed, param.dtype,
                                    expert_offset=self.expert_offset(name)))

    def expert_offset(self, name: str) -> int:
        """Global id of the first expert that tensor ``name`` holds (0 for tensors that are not experts'):
        what keys an expert's random draws and its name on disk, whatever the expert-parallel layout."""
        if ".experts." not in name:
            return 0
        return self.get_submodule(name.rsplit(".", 1)[0]).expert_offset


def init_tensor(name: str, shape: tuple[int, ...], cfg: ModelConfig, seed: int,
                dtype: torch.dtype = torch.float32, expert_offset: int = 0) -> torch.Tensor:
    """The from-scratch value of one parameter. Stacked expert tensors draw per global expert id so
    that a model split over expert-parallel ranks equals the unsplit one."""
    if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
        return torch.ones(shape, dtype=dtype)
    std = cfg.initializer_range
    if ".experts.w" in name:
        parts = [
            torch.empty(shape[1:]).normal_(0.0, std, generator=keyed_generator(seed, name, expert_offset + e))
            for e in range(shape[0])
        ]
        return torch.stack(parts).to(dtype)
    return torch.empty(shape).normal_(0.0, std, generator=keyed_generator(seed, name)).to(dtype)
