"""``drop-upcycling demo``: a one-minute install check that exercises every upcycling method.

Makes a tiny random dense Llama checkpoint, upcycles it by FS, NU, RNU-0.5, DU-0.5, DU-1.0 and BTX
(from four perturbed copies of the dense model), reloads every MoE and reports how far its step-0
function is from the dense model's and how different its experts are. Naive upcycling must match
the dense model exactly; the others must not.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from .checkpoint import atomic_dir, load_model, save_model
from .configs import get_model_config
from .methods import BY_KEY, MOE_METHODS
from .model import CausalLM, keyed_generator
from .upcycle import UpcycleOptions, upcycle

# Every MoE method of the table, in its order.
VARIANTS: dict[str, UpcycleOptions] = {
    m.key: UpcycleOptions(method=str(m.upcycle), ratio=m.ratio or 0.0) for m in MOE_METHODS
}


def configure_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="runs/demo", help="output directory (default runs/demo)")
    p.add_argument("--model", default="tiny-dense", help="dense shape to generate (default tiny-dense)")
    p.add_argument("--num-experts", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")


def _expert_spread(model: CausalLM) -> float:
    """Mean relative distance of each expert's w1 from expert 0's: 0 means identical experts."""
    dists = []
    for layer in model.model.layers:
        w1 = layer.block_sparse_moe.experts.w1
        dists.append(((w1[1:] - w1[:1]).norm(dim=(1, 2)) / w1[:1].norm()).mean())
    return float(torch.stack(dists).mean())


def run(args: argparse.Namespace) -> int:
    dense_cfg = get_model_config(args.model)
    if dense_cfg.is_moe:
        raise SystemExit(f"--model must be a dense shape, got {args.model}")
    results = []
    with atomic_dir(Path(args.out), overwrite=args.overwrite) as tmp:
        dense = CausalLM(dense_cfg)
        dense.init_weights(args.seed)
        dense_dir = save_model(dense, tmp / "dense")
        sources = []
        for i in range(4):  # stand-ins for the seed and three domain-continued models of BTX
            with torch.no_grad():
                branch = CausalLM(dense_cfg)
                branch.load_state_dict(dense.state_dict())
                for p in branch.parameters():
                    p.add_(torch.randn(p.shape, generator=keyed_generator(args.seed, "btx-branch", i)) * 0.01 * (i > 0))
            sources.append(save_model(branch, tmp / f"btx-source-{i}"))
        ids = torch.randint(0, dense_cfg.vocab_size, (2, 32), generator=keyed_generator(args.seed, "demo-batch"))
        with torch.no_grad():
            ref = dense(ids, labels=ids)
        for label, base in VARIANTS.items():
            opts = UpcycleOptions(**{**base.__dict__, "num_experts": args.num_experts, "seed": args.seed})
            out = tmp / label
            if BY_KEY[label].branches:  # BTX: from the seed and its three stand-in branches
                upcycle(None, out, opts, sources=sources, progress=False)
            else:
                upcycle(dense_dir, out, opts, progress=False)
            moe = load_model(out)
            with torch.no_grad():
                o = moe(ids, labels=ids)
            results.append({
                "method": label,
                "max_abs_logit_diff_vs_dense": float((o.logits - ref.logits).abs().max()),
                "lm_loss": float(o.lm_loss),
                "expert_spread": _expert_spread(moe),
                "size_mb": sum(f.stat().st_size for f in out.glob("*.safetensors")) / 1e6,
            })
        (tmp / "demo.json").write_text(json.dumps({"dense_lm_loss": float(ref.lm_loss), "methods": results}, indent=2))
    print(f"dense {args.model}: lm loss {float(ref.lm_loss):.4f} on a random batch; checkpoints in {args.out}")
    print(f"{'method':<9} {'max |logit diff| vs dense':>26} {'lm loss':>9} {'expert spread':>14} {'MB':>7}")
    for r in results:
        print(f"{r['method']:<9} {r['max_abs_logit_diff_vs_dense']:>26.3e} {r['lm_loss']:>9.4f} "
              f"{r['expert_spread']:>14.3f} {r['size_mb']:>7.2f}")
    return 0
