"""The ``train --dry-run`` plan: what a run on ``nodes x gpus_per_node`` GPUs would hold and cost.

Layout (``dp_size x ep_size``), parameters held per GPU, a coarse memory estimate, steps, tokens and
training FLOPs (:func:`drop_upcycling.flops.training_flops_per_token`), computed from the config
alone, before anything is loaded.

Memory per GPU: fp32 master weights + AdamW, 16 bytes per held parameter (weight, gradient, two
moments), plus the bf16 activations of one micro-batch without activation recomputation (Korthikanti
et al. 2022): about ``34 * S * D`` bytes per layer and sequence for attention and norms, the routed
experts' intermediates, and the logits. An estimate to choose a layout with, not a measurement.
"""

from __future__ import annotations

from typing import Any

from .configs import ModelConfig, TrainConfig
from .flops import training_flops_per_token
from .parallel import accumulation_steps, validate_layout


def held_params(cfg: ModelConfig, ep_size: int) -> int:
    """Parameters one GPU holds: everything but the experts, and its ``1 / ep_size`` of the experts."""
    expert_params = cfg.num_hidden_layers * cfg.num_experts * 3 * cfg.hidden_size * cfg.intermediate_size
    return cfg.param_counts()["total"] - expert_params + expert_params // ep_size


def activation_bytes(cfg: ModelConfig, micro_batch_size: int, seq_len: int) -> int:
    """bf16 activations kept for the backward of one micro-batch (see the module docstring)."""
    tokens = micro_batch_size * seq_len
    routed = cfg.num_experts_per_tok if cfg.is_moe else 1
    per_layer = tokens * cfg.hidden_size * 34 + tokens * routed * cfg.intermediate_size * 2 * 3
    logits = tokens * cfg.vocab_size * (2 + 4)  # bf16 logits and their fp32 copy for the loss
    return cfg.num_hidden_layers * per_layer + logits


def plan(run: TrainConfig) -> dict[str, Any]:
    """The plan of ``run`` as one flat dict (printed by :func:`format_plan`)."""
    cfg = run.planned_model_config()
    world = run.nodes * run.gpus_per_node
    dp_size = validate_layout(world, run.ep, cfg.num_experts)
    accum = accumulation_steps(run, world)
    counts = cfg.param_counts()
    held = held_params(cfg, run.ep)
    flops_token = training_flops_per_token(cfg, run.seq_len)
    steps = run.total_steps
    # nanotron 0.4 lays ranks out as (ep, dp): expert group i holds ranks i, i + dp, i + 2 dp, ...
    expert_group_nodes = len({i * dp_size // run.gpus_per_node for i in range(run.ep)})
    return {
        "model": cfg.name, "method": run.method, "init": run.init,
        "world_size": world, "nodes": run.nodes, "gpus_per_node": run.gpus_per_node, "dp": dp_size, "ep": run.ep,
        "experts_per_rank": cfg.num_experts // run.ep if cfg.is_moe else 0, "expert_group_nodes": expert_group_nodes,
        "total_params": counts["total"], "active_params": counts["active"], "params_per_gpu": held,
        "memory_per_gpu_gb": round((16 * held + activation_bytes(cfg, run.micro_batch_size, run.seq_len)) / 1e9, 1),
        "micro_batch_size": run.micro_batch_size, "grad_accum": accum,
        "seq_len": run.seq_len, "tokens_per_step": run.global_batch_tokens, "steps": steps,
        "train_tokens": steps * run.global_batch_tokens,
        "flops_per_token": flops_token, "total_flops": flops_token * steps * run.global_batch_tokens,
    }


def _fit(gb: float) -> str:
    """The GPU that the estimate fits, leaving headroom for the allocator (76 of 80 GB, 134 of 141 GB)."""
    if gb < 76:
        return "fits an 80 GB H100"
    if gb < 134:
        return "needs a 141 GB H200 (or more GPUs / a smaller micro-batch)"
    return "does not fit one GPU: raise ep or the GPU count"


def format_plan(p: dict[str, Any]) -> str:
    """The plan as the text ``train --dry-run`` prints."""
    lines = [f"plan for {p['model']} ({p['method'] or 'train'}), init {p['init'] or 'random (from scratch)'}",
             f"  world size        {p['world_size']} = {p['nodes']} node(s) x {p['gpus_per_node']} GPUs",
             f"  layout            dp {p['dp']} x ep {p['ep']}; {p['experts_per_rank']} experts per rank",
             f"  parameters        {p['total_params'] / 1e9:.3f}B total, {p['active_params'] / 1e9:.3f}B active, "
             f"{p['params_per_gpu'] / 1e9:.3f}B held per GPU",
             f"  all-to-all        each expert group spans {p['expert_group_nodes']} node(s)",
             f"  memory per GPU    ~{p['memory_per_gpu_gb']} GB (fp32 weights+grads+AdamW, bf16 activations of "
             f"micro-batch {p['micro_batch_size']} x {p['seq_len']}): " + _fit(p["memory_per_gpu_gb"]),
             f"  tokens per step   {p['tokens_per_step']:,} (grad accumulation {p['grad_accum']})",
             f"  steps             {p['steps']:,} ({p['train_tokens'] / 1e9:.1f}B tokens)",
             f"  training FLOPs    {p['flops_per_token'] / 1e9:.2f} GFLOP/token, {p['total_flops']:.3e} total"]
    return "\n".join(lines)
