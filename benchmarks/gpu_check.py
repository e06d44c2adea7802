"""The correctness half of benchmarks/gpu_check.sh: what must hold on a GPU before its speed means anything.

    python benchmarks/gpu_check.py --out DIR          # on a GPU (writes DIR/checks.json)
    python benchmarks/gpu_check.py --out DIR --device cpu   # the same checks on CPU (a dry run)

Checks (each a JSON entry with ``ok`` and its numbers; one failing does not stop the others):

- ``env``: torch / CUDA / NCCL versions, the GPU and its compute capability, what ``kernel="auto"`` picks.
- ``nccl_bf16``: a world of one over NCCL (:func:`~drop_upcycling.parallel.init_parallel`): the tiny
  MoE under bf16 autocast with the all-to-all dispatcher (``all_to_all_single`` over NCCL) equals
  the same model with the local dispatcher, forward and backward.
- ``host_syncs``: forward + backward of one MoE layer at the 8x152M shape, counted with
  ``torch.cuda.set_sync_debug_mode("warn")``: 0 syncs with the grouped kernel and the local
  dispatcher; the loop and the all-to-all dispatcher (split sizes) for comparison.
- ``kernels_equal``: grouped vs loop expert kernel on the GPU (bf16, and fp32 where torch's CUDA
  grouped GEMM takes it), with empty experts: outputs and gradients, relative to their scale.
- ``loss_parity``: a tiny fixed batch through models drawn from a fixed seed: the CPU fp32 loss and
  gradient norm (the reference) against the GPU's in fp32 (loop) and in bf16 autocast (loop and grouped).
"""

from __future__ import annotations

import argparse
import json
import os
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

from drop_upcycling.configs import MODEL_CONFIGS, ModelConfig
from drop_upcycling.model import CausalLM
from drop_upcycling.moe import (
    AllToAllDispatcher,
    GroupedExperts,
    SparseMoeBlock,
    auto_kernel,
    set_expert_kernel,
)

SEED = 11
# Parity models: the tiny recipe's MoE, and two layers of the 8x152M shape (small vocab: a CPU reference in seconds).
PARITY_MODELS: dict[str, ModelConfig] = {
    "tiny-moe": MODEL_CONFIGS["tiny-moe"],
    "8x152m-2layer": MODEL_CONFIGS["moe-8x152m"].replace(num_hidden_layers=2, vocab_size=4096),
}
# Relative tolerances of the checks: fp32 on the GPU differs from the CPU by summation order only
# (TF32 off, torch's default for matmul); bf16 keeps 8 bits of mantissa.
FP32_RTOL, BF16_LOSS_RTOL, BF16_RTOL = 1e-4, 2e-2, 5e-2


def _batch(cfg: ModelConfig, batch: int = 2, seq: int = 64) -> torch.Tensor:
    return torch.randint(0, cfg.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(SEED))


def reference_losses(model: str = "tiny-moe", device: str = "cpu", kernel: str = "loop",
                     bf16: bool = False) -> dict[str, float]:
    """Loss terms and gradient norm of the fixed batch on the seed-``SEED`` model (CPU fp32 = the reference)."""
    cfg = PARITY_MODELS[model]
    net = CausalLM(cfg)
    net.init_weights(SEED)
    net = net.to(device)
    set_expert_kernel(net, kernel)
    ids = _batch(cfg).to(device)
    with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=bf16):
        out = net(ids, labels=ids)
    out.loss.backward()
    grad_norm = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in net.parameters()))
    terms = {"loss": out.loss, "lm_loss": out.lm_loss, "aux_loss": out.aux_loss, "grad_norm": grad_norm}
    return {name: float(value.detach()) for name, value in terms.items()}


def check_env(device: str) -> dict:
    info = {"ok": True, "torch": torch.__version__, "cuda": torch.version.cuda, "device": device}
    if device == "cuda":
        cap = torch.cuda.get_device_capability()
        info.update(gpu=torch.cuda.get_device_name(), capability=list(cap),
                    nccl=".".join(map(str, v)) if isinstance(v := torch.cuda.nccl.version(), tuple) else str(v),
                    bf16_supported=torch.cuda.is_bf16_supported(),
                    auto_kernel_bf16=auto_kernel("cuda", torch.bfloat16, cap))
        info["ok"] = info["bf16_supported"]
    return info


_ENV: list = []


def _parallel_env(device: str):
    """One world of one for every check (NCCL on a GPU, gloo on CPU), made on first use."""
    if not _ENV:
        from drop_upcycling.parallel import init_parallel

        _ENV.append(init_parallel(ep_size=1, num_experts=8, device=device))
    return _ENV[0]


def check_nccl_bf16(device: str) -> dict:
    """The all-to-all dispatcher over a one-rank NCCL group against the local dispatcher, bf16 autocast."""
    cfg = PARITY_MODELS["tiny-moe"]
    env = _parallel_env(device)
    ids = _batch(cfg).to(env.device)
    results = {}
    for name, dispatcher in (("local", None), ("all_to_all", AllToAllDispatcher(cfg.num_experts, env.expert_pg))):
        net = CausalLM(cfg, dispatcher=dispatcher)
        net.init_weights(SEED)
        net = net.to(env.device)
        with torch.autocast(env.device.type, dtype=torch.bfloat16):
            out = net(ids, labels=ids)
        out.loss.backward()
        results[name] = (float(out.loss.detach()), torch.cat([p.grad.flatten() for p in net.parameters()]))
    # Same rows in the same order reach the same experts: identical up to nondeterministic atomics.
    grad_diff = float((results["local"][1] - results["all_to_all"][1]).abs().max())
    grad_scale = float(results["local"][1].abs().max())
    loss_diff = abs(results["local"][0] - results["all_to_all"][0])
    return {"ok": loss_diff <= 1e-3 * abs(results["local"][0]) and grad_diff <= 1e-2 * grad_scale,
            "backend": str(torch.distributed.get_backend()), "loss_local": results["local"][0],
            "loss_all_to_all": results["all_to_all"][0], "max_grad_diff": grad_diff, "grad_scale": grad_scale}


def _count_syncs(fn: Callable[[], None], device: str) -> int | None:
    """Host syncs of ``fn`` seen by ``torch.cuda.set_sync_debug_mode("warn")`` (None on CPU)."""
    if device != "cuda":
        fn()
        return None
    fn()  # warm-up: lazy initialization may sync once
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def check_host_syncs(device: str, tokens: int = 4096) -> dict:
    cfg = MODEL_CONFIGS["moe-8x152m"]
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    block = SparseMoeBlock(cfg.hidden_size, cfg.intermediate_size, cfg.num_experts, cfg.num_experts_per_tok)
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0.0, 0.02)
    block = block.to(device, dtype)
    x = torch.randn(1, tokens, cfg.hidden_size, device=device, dtype=dtype)

    def step() -> None:
        block.zero_grad(set_to_none=True)
        y, _ = block(x.clone().requires_grad_(True))
        y.sum().backward()

    counts = {}
    for kernel in ("grouped", "loop"):
        block.experts.kernel = kernel
        counts[f"local_{kernel}"] = _count_syncs(step, device)
    result: dict = {"syncs_per_layer_step": counts}
    if device == "cuda":
        block.dispatcher = AllToAllDispatcher(cfg.num_experts, _parallel_env(device).expert_pg)
        block.experts.kernel = "grouped"
        counts["all_to_all_grouped"] = _count_syncs(step, device)  # the split sizes: expected 1
    result["ok"] = counts["local_grouped"] in (0, None)
    return result


def _relative_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30))


def check_kernels_equal(device: str) -> dict:
    """Grouped vs loop on this device, empty experts included (the 8x152M expert shape, 8 local experts)."""
    cfg = MODEL_CONFIGS["moe-8x152m"]
    counts = torch.tensor([700, 0, 1300, 5, 0, 2048, 977, 0], device=device)  # 3 empty experts
    out: dict = {"ok": True}
    for dtype, rtol in ((torch.bfloat16, BF16_RTOL), (torch.float32, FP32_RTOL)):
        experts = GroupedExperts(cfg.num_experts, cfg.hidden_size, cfg.intermediate_size)
        gen = torch.Generator().manual_seed(SEED)
        with torch.no_grad():
            for p in experts.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
        experts = experts.to(device, dtype)
        x = torch.randn(int(counts.sum()), cfg.hidden_size, generator=gen).to(device, dtype)
        grad = torch.randn(x.shape, generator=gen).to(device, dtype)
        runs = {}
        try:
            for kernel in ("loop", "grouped"):
                experts.kernel = kernel
                experts.zero_grad(set_to_none=True)
                xi = x.clone().requires_grad_(True)
                y = experts(xi, counts)
                y.backward(grad)
                runs[kernel] = {"y": y.detach(), "x.grad": xi.grad,
                                **{f"{n}.grad": p.grad for n, p in experts.named_parameters()}}
        except Exception as exc:  # a dtype the CUDA grouped GEMM does not take is a finding
            out[str(dtype)] = {"ok": dtype != torch.bfloat16, "error": f"{type(exc).__name__}: {exc}"[:400]}
            out["ok"] &= out[str(dtype)]["ok"]
            continue
        # A rank that received no rows under expert parallelism: G = 0, every expert empty.
        experts.kernel = "grouped"
        experts.zero_grad(set_to_none=True)
        none = experts(x[:0].clone().requires_grad_(True), torch.zeros_like(counts))
        none.sum().backward()
        no_rows_ok = none.shape == (0, cfg.hidden_size) and all(p.grad is not None and not p.grad.any()
                                                                 for p in experts.parameters())
        diffs = {name: _relative_diff(runs["grouped"][name], want) for name, want in runs["loop"].items()}
        empty = [e for e, c in enumerate(counts.tolist()) if c == 0]
        empty_grads_zero = all(not runs["grouped"][f"{w}.grad"][e].any() for w in ("w1", "w2", "w3") for e in empty)
        ok = max(diffs.values()) <= rtol and empty_grads_zero and no_rows_ok
        out[str(dtype)] = {"ok": ok, "rtol": rtol, "relative_diff": diffs, "empty_expert_grads_zero": empty_grads_zero,
                           "no_rows_ok": no_rows_ok}
        out["ok"] &= ok
    return out


def check_loss_parity(device: str) -> dict:
    out: dict = {"ok": True}
    for model in PARITY_MODELS:
        ref = reference_losses(model, "cpu", "loop", bf16=False)
        entry: dict = {"cpu_fp32": ref}
        for name, kernel, bf16, rtol in (("fp32_loop", "loop", False, FP32_RTOL),
                                          ("bf16_loop", "loop", True, BF16_LOSS_RTOL),
                                          ("bf16_grouped", "grouped", True, BF16_LOSS_RTOL)):
            got = reference_losses(model, device, kernel, bf16=bf16)
            rel = {k: abs(got[k] - ref[k]) / abs(ref[k]) for k in ("loss", "lm_loss", "grad_norm")}
            # The gradient norm moves more than the loss in bf16: its tolerance is the loose one.
            ok = rel["loss"] <= rtol and rel["lm_loss"] <= rtol and rel["grad_norm"] <= max(rtol, BF16_RTOL * bf16)
            entry[name] = {**got, "relative_diff": rel, "rtol": rtol, "ok": ok}
            out["ok"] &= ok
        out[model] = entry
    return out


CHECKS: dict[str, Callable[[str], dict]] = {
    "env": check_env, "nccl_bf16": check_nccl_bf16, "host_syncs": check_host_syncs,
    "kernels_equal": check_kernels_equal, "loss_parity": check_loss_parity,
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "gpu_check_out")))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cuda", "cpu"])
    p.add_argument("--only", nargs="*", choices=list(CHECKS), default=list(CHECKS))
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    results: dict = {}
    for name in args.only:
        try:
            results[name] = CHECKS[name](args.device)
        except Exception as exc:  # report every check, whichever fails
            results[name] = {"ok": False, "error": f"{type(exc).__name__}: {exc}",
                             "traceback": traceback.format_exc()[-2000:]}
        print(f"{name}: ok={results[name].get('ok')}", flush=True)
    if _ENV:
        _ENV.pop().destroy()
    results["ok"] = all(r.get("ok") is not False for r in results.values())
    (args.out / "checks.json").write_text(json.dumps(results, indent=1) + "\n")
    print(json.dumps({k: (v.get("ok") if isinstance(v, dict) else v) for k, v in results.items()}))


if __name__ == "__main__":
    main()
