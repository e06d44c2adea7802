"""Training throughput and MFU of an 8x152M-shaped MoE for a fixed wall time (a GPU check, not a test).

    torchrun --nproc_per_node=1 benchmarks/gpu_mfu.py --seconds 120            # one GPU, ep 1
    torchrun --nproc_per_node=8 benchmarks/gpu_mfu.py --ep 8 --seconds 120     # 8 GPUs, expert parallel
    python benchmarks/gpu_mfu.py --model tiny-moe --seq-len 128 --seconds 5    # CPU smoke run
    torchrun --nproc_per_node=1 benchmarks/gpu_mfu.py --expert-kernel loop --json loop.json

Runs the trainer's own step (bf16 autocast on GPU, the all-to-all dispatcher when ep > 1, gradient
reduction and clipping, AdamW) on random tokens, so no data preparation is needed. Prints one JSON line:
tokens/s over all ranks (after warm-up steps), training FLOPs per token
(:func:`drop_upcycling.flops.training_flops_per_token`), achieved TFLOP/s per GPU and MFU against
``--peak-tflops`` (989 = H100/H200 dense bf16). ``--expert-kernel`` picks the MoE expert kernel
(``auto``: the grouped GEMM on Hopper in bf16, see :func:`drop_upcycling.moe.auto_kernel`); ``--json``
also writes the line to a file.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.distributed as dist

from drop_upcycling.configs import TrainConfig
from drop_upcycling.flops import training_flops_per_token
from drop_upcycling.model import causal_lm_loss
from drop_upcycling.moe import EXPERT_KERNELS, auto_kernel, set_expert_kernel
from drop_upcycling.parallel import clip_gradients, init_parallel, reduce_gradients
from drop_upcycling.train import build_model, build_optimizer


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="moe-8x152m")
    p.add_argument("--ep", type=int, default=1)
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--seconds", type=float, default=120.0)
    p.add_argument("--warmup-steps", type=int, default=3)
    p.add_argument("--peak-tflops", type=float, default=989.0)
    p.add_argument("--expert-kernel", default="auto", choices=EXPERT_KERNELS)
    p.add_argument("--json", type=Path, default=None, help="also write the result line here")
    args = p.parse_args()

    run = TrainConfig.from_mapping({"model": args.model, "seq_len": args.seq_len, "steps": 1, "ep": args.ep,
                                    "global_batch_tokens": args.seq_len})
    cfg = run.model_config()
    env = init_parallel(ep_size=args.ep, num_experts=cfg.num_experts)
    model = build_model(cfg, run, env)
    set_expert_kernel(model, args.expert_kernel)
    optimizer = build_optimizer(model, run)
    gen = torch.Generator().manual_seed(env.rank)
    bf16 = env.device.type == "cuda"
    group = env.world_pg if env.world_size > 1 else None

    def step() -> None:
        ids = torch.randint(0, cfg.vocab_size, (args.micro_batch, args.seq_len), generator=gen).to(env.device)
        with torch.autocast(env.device.type, dtype=torch.bfloat16, enabled=bf16):
            out = model(ids)
            losses = causal_lm_loss(out.logits, ids, out.router_logits, cfg, group=group)
        losses.loss.backward()
        reduce_gradients(model, env)
        clip_gradients(model, env, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def sync() -> None:
        if bf16:
            torch.cuda.synchronize()
        env.barrier()

    for _ in range(args.warmup_steps):
        step()
    sync()
    t0, steps = time.perf_counter(), 0
    while True:
        step()
        steps += 1
        sync()
        elapsed = time.perf_counter() - t0
        done = torch.tensor([elapsed >= args.seconds], dtype=torch.int32, device=env.device)
        if env.world_size > 1:
            dist.all_reduce(done, op=dist.ReduceOp.MAX)  # every rank stops at the same step
        if done.item():
            break
    tokens = steps * args.micro_batch * args.seq_len * env.world_size
    flops_token = training_flops_per_token(cfg, args.seq_len)
    tflops_per_gpu = tokens / elapsed * flops_token / env.world_size / 1e12
    if env.is_main:
        capability = torch.cuda.get_device_capability() if bf16 else None
        kernel = (auto_kernel(env.device.type, torch.bfloat16 if bf16 else torch.float32, capability)
                  if args.expert_kernel == "auto" else args.expert_kernel)
        result = {
            "model": cfg.name, "world_size": env.world_size, "ep": env.ep_size, "device": str(env.device),
            "gpu": torch.cuda.get_device_name() if bf16 else None, "seq_len": args.seq_len,
            "micro_batch": args.micro_batch, "steps": steps, "seconds": round(elapsed, 2),
            "tokens_per_s": round(tokens / elapsed, 1), "flops_per_token": flops_token,
            "tflops_per_gpu": round(tflops_per_gpu, 2), "mfu": round(tflops_per_gpu / args.peak_tflops, 4),
            "peak_memory_gb": round(torch.cuda.max_memory_allocated() / 1e9, 2) if bf16 else None,
            "expert_kernel": kernel,
        }
        print(json.dumps(result))
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(result) + "\n")
    env.destroy()


if __name__ == "__main__":
    main()
