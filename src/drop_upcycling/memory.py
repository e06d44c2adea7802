"""The ``train --dry-run`` plan: what a run on ``nodes x gpus_per_node`` GPUs would hold and cost.

Layout (``dp_size x ep_size``), parameters held per GPU, the peak memory per GPU, steps, tokens and
training FLOPs (:func:`drop_upcycling.flops.training_flops_per_token`), computed from the config
alone, before anything is loaded. An estimate to choose a layout with, not a measurement.

Memory per GPU, in bytes: ``P`` parameters held (everything but the experts, and ``1 / ep`` of the
experts) and, under ``zero_stage`` >= 1, ``S`` of them in this rank's shards (the non-expert ones over
all ``world`` ranks, the experts over the ``dp`` ranks holding them; :mod:`drop_upcycling.sharding`):

=====================  ===========================  =========================================
                       ``param_dtype: fp32``        ``param_dtype: bf16``
=====================  ===========================  =========================================
weights                4 P                          2 P
gradients, stage 0, 1  4 P                          2 P (a micro-batch's) + 4 P (their fp32 sum)
gradients, stage 2     4 P                          2 P (a micro-batch's; the sum is in the shard)
optimizer, stage 0     8 P (AdamW's two moments)    8 P + 4 P (the fp32 master)
optimizer, stage 1, 2  16 S: fp32 weights, two moments, the reduced gradient, all sharded
=====================  ===========================  =========================================

so 16 P, 8 P + 16 S, 8 P + 16 S with fp32 weights and 20 P, 8 P + 16 S, 4 P + 16 S with bf16 weights
(stages 0, 1, 2). Stage 2 saves memory only with bf16 weights: fp32 weights sum the micro-batches in
the backward's own gradients. Counted at once, although the gradients peak at the end of a backward
and the activations at its start: an upper bound.

Activations of one micro-batch of ``T`` tokens (Korthikanti et al. 2022, 16-bit): per layer
``34 * T * D`` bytes for attention, norms and residuals, plus ``6 * T * k * F`` for the routed experts'
intermediates (k = top-k, 1 for a dense FFN), and ``6 * T * V`` for the logits (bf16, and fp32 for the
loss). With ``activation_checkpointing`` the forward keeps only each layer's input (``T * D`` elements in
the residual stream's dtype: 2 bytes with bf16 weights, 4 with fp32 weights under autocast), and the
backward recomputes one layer at a time: those inputs, one layer's activations and the logits.
"""

from __future__ import annotations

from typing import Any

from .configs import ModelConfig, TrainConfig
from .flops import training_flops_per_token
from .parallel import accumulation_steps, validate_layout

GIB = 1 << 30
# Capacity in GiB (the nominal 80 GB of an H100 is 81,559 MiB; a 141 GB H200's, 143,771 MiB) and the
# share a run may plan for: the rest is the CUDA context, NCCL's buffers and the allocator's fragmentation.
GPUS = (("h100", "an 80 GB H100", 79.6), ("h200", "a 141 GB H200", 140.4))
USABLE = 0.95


def expert_params(cfg: ModelConfig) -> int:
    """Parameters of all the experts of all layers (0 for a dense model)."""
    return cfg.num_hidden_layers * cfg.num_experts * 3 * cfg.hidden_size * cfg.intermediate_size


def held_params(cfg: ModelConfig, ep_size: int) -> int:
    """Parameters one GPU holds: everything but the experts, and its ``1 / ep_size`` of the experts."""
    experts = expert_params(cfg)
    return cfg.param_counts()["total"] - experts + experts // ep_size


def sharded_params(cfg: ModelConfig, world: int, ep_size: int) -> int:
    """Parameters in one GPU's shards under ZeRO: the non-expert ones over all ranks, its experts over
    the ``world / ep_size`` ranks holding them."""
    experts = expert_params(cfg)
    dense = cfg.param_counts()["total"] - experts
    return -(-dense // world) + -(-(experts // ep_size) // (world // ep_size))


def state_bytes(held: int, shard: int, param_dtype: str, zero_stage: int) -> dict[str, int]:
    """Weights, gradients and optimizer state of one GPU (the module docstring's table)."""
    bf16 = param_dtype == "bf16"
    weights = (2 if bf16 else 4) * held
    if zero_stage == 0:
        return {"weights": weights, "gradients": (6 if bf16 else 4) * held, "optimizer": (12 if bf16 else 8) * held}
    grads = (2 if bf16 else 4) * held if zero_stage == 2 else (6 if bf16 else 4) * held
    return {"weights": weights, "gradients": grads, "optimizer": 16 * shard}


def activation_bytes(cfg: ModelConfig, micro_batch_size: int, seq_len: int, checkpointing: bool = False,
                     residual_bytes: int = 4) -> int:
    """Activations kept for the backward of one micro-batch (see the module docstring)."""
    tokens = micro_batch_size * seq_len
    routed = cfg.num_experts_per_tok if cfg.is_moe else 1
    per_layer = tokens * cfg.hidden_size * 34 + tokens * routed * cfg.intermediate_size * 2 * 3
    logits = tokens * cfg.vocab_size * (2 + 4)  # bf16 logits and their fp32 copy for the loss
    if not checkpointing:
        return cfg.num_hidden_layers * per_layer + logits
    return cfg.num_hidden_layers * tokens * cfg.hidden_size * residual_bytes + per_layer + logits


def memory(run: TrainConfig, cfg: ModelConfig, world: int) -> dict[str, Any]:
    """Peak bytes per GPU and their parts, for :func:`plan`."""
    held = held_params(cfg, run.ep)
    shard = sharded_params(cfg, world, run.ep) if run.zero_stage else held
    parts = state_bytes(held, shard, run.param_dtype, run.zero_stage)
    parts["activations"] = activation_bytes(cfg, run.micro_batch_size, run.seq_len, run.activation_checkpointing,
                                            residual_bytes=2 if run.param_dtype == "bf16" else 4)
    peak = sum(parts.values())
    out = {"sharded_params_per_gpu": shard if run.zero_stage else 0, "peak_memory_bytes": peak,
           "peak_memory_gib": round(peak / GIB, 1)}
    out.update({f"{k}_gib": round(v / GIB, 2) for k, v in parts.items()})
    out.update({f"fits_{key}": peak / GIB <= USABLE * cap for key, _, cap in GPUS})
    return out


def plan(run: TrainConfig) -> dict[str, Any]:
    """The plan of ``run`` as one flat dict (printed by :func:`format_plan`, or as JSON)."""
    cfg = run.planned_model_config()
    world = run.nodes * run.gpus_per_node
    dp_size = validate_layout(world, run.ep, cfg.num_experts)
    accum = accumulation_steps(run, world)
    counts = cfg.param_counts()
    flops_token = training_flops_per_token(cfg, run.seq_len)
    steps = run.total_steps
    # nanotron 0.4 lays ranks out as (ep, dp): expert group i holds ranks i, i + dp, i + 2 dp, ...
    expert_group_nodes = len({i * dp_size // run.gpus_per_node for i in range(run.ep)})
    return {
        "model": cfg.name, "method": run.method, "init": run.init,
        "world_size": world, "nodes": run.nodes, "gpus_per_node": run.gpus_per_node, "dp": dp_size, "ep": run.ep,
        "experts_per_rank": cfg.num_experts // run.ep if cfg.is_moe else 0, "expert_group_nodes": expert_group_nodes,
        "total_params": counts["total"], "active_params": counts["active"], "params_per_gpu": held_params(cfg, run.ep),
        "param_dtype": run.param_dtype, "zero_stage": run.zero_stage,
        "activation_checkpointing": run.activation_checkpointing, **memory(run, cfg, world),
        "micro_batch_size": run.micro_batch_size, "grad_accum": accum,
        "seq_len": run.seq_len, "tokens_per_step": run.global_batch_tokens, "steps": steps,
        "train_tokens": steps * run.global_batch_tokens,
        "flops_per_token": flops_token, "total_flops": flops_token * steps * run.global_batch_tokens,
    }


def _fit(p: dict[str, Any]) -> str:
    """The smallest GPU the peak fits, leaving headroom for the allocator (:data:`USABLE`)."""
    for key, name, _ in GPUS:
        if p[f"fits_{key}"]:
            return f"fits {name}"
    return "does not fit one GPU: shard (zero_stage), recompute (activation_checkpointing), raise ep or the GPUs"


def _memory_setup(p: dict[str, Any]) -> str:
    """How the state is held, in words."""
    weights = "bf16 weights + fp32 master" if p["param_dtype"] == "bf16" else "fp32 weights"
    sharded = {0: "AdamW unsharded", 1: "ZeRO-1 (AdamW + fp32 weights sharded)",
               2: "ZeRO-2 (AdamW + fp32 weights + gradients sharded)"}[p["zero_stage"]]
    recompute = "layers recomputed" if p["activation_checkpointing"] else "no recomputation"
    return f"{weights}, {sharded}, {recompute}"


def format_plan(p: dict[str, Any]) -> str:
    """The plan as the text ``train --dry-run`` prints."""
    lines = [f"plan for {p['model']} ({p['method'] or 'train'}), init {p['init'] or 'random (from scratch)'}",
             f"  world size        {p['world_size']} = {p['nodes']} node(s) x {p['gpus_per_node']} GPUs",
             f"  layout            dp {p['dp']} x ep {p['ep']}; {p['experts_per_rank']} experts per rank",
             f"  parameters        {p['total_params'] / 1e9:.3f}B total, {p['active_params'] / 1e9:.3f}B active, "
             f"{p['params_per_gpu'] / 1e9:.3f}B held per GPU",
             f"  all-to-all        each expert group spans {p['expert_group_nodes']} node(s)",
             f"  memory per GPU    ~{p['peak_memory_gib']} GiB peak: weights {p['weights_gib']:.1f} + gradients "
             f"{p['gradients_gib']:.1f} + optimizer {p['optimizer_gib']:.1f} + activations {p['activations_gib']:.1f} "
             f"(micro-batch {p['micro_batch_size']} x {p['seq_len']})",
             f"                    {_memory_setup(p)}: {_fit(p)}",
             f"  tokens per step   {p['tokens_per_step']:,} (grad accumulation {p['grad_accum']})",
             f"  steps             {p['steps']:,} ({p['train_tokens'] / 1e9:.1f}B tokens)",
             f"  training FLOPs    {p['flops_per_token'] / 1e9:.2f} GFLOP/token, {p['total_flops']:.3e} total"]
    return "\n".join(lines)
