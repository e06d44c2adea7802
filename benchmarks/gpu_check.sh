#!/usr/bin/env bash
# The GPU check for a lent H100/H200: one script, under 8 minutes, JSON out. Not run by tests.
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]      # default: $OUT, else ./gpu_check_out
#   DRY_RUN=1 bash benchmarks/gpu_check.sh /tmp/x   # the same plumbing on CPU at toy sizes (~3 min on 2 cores)
#
# Needs a CUDA build of torch and the package's dependencies (python -m pip install -e . on the machine);
# src/ is put on PYTHONPATH, so a checkout whose dependencies are installed runs without installing it.
# Steps (each under its own time limit; one failing does not stop the rest; times are estimates for
# an H200: the script has not yet run on a GPU):
#   1. checks      (~1 min) benchmarks/gpu_check.py: env, bf16 + NCCL (all-to-all dispatcher over a
#                  one-rank NCCL group == local dispatcher), host syncs of the grouped path (0 expected,
#                  torch.cuda.set_sync_debug_mode), grouped == loop expert kernel with empty experts,
#                  loss parity of a tiny fixed batch against the CPU fp32 reference.
#   2. layer       (~1 min) benchmarks/bench_moe_layer.py, bf16: one MoE layer at the 8x152M shape
#                  (hidden 512, ffn 2048, 8 experts, top-2) on 4096 and 16384 tokens, fwd+bwd: the
#                  grouped kernel's and the loop's share of the GEMM rate (a dense SwiGLU over the
#                  same T*K rows), and transformers' grouped_mm / eager blocks, interleaved rounds.
#   3. mfu_grouped / mfu_loop (~2 x 70 s) benchmarks/gpu_mfu.py under torchrun (NCCL, bf16 autocast):
#                  tokens/s and MFU of 8x152M training steps (4 x 4096 tokens) with each expert kernel.
#   4. summary     OUT_DIR/gpu_check.json: every step's JSON and exit status in one file.
set -uo pipefail

OUT_DIR="${1:-${OUT:-gpu_check_out}}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python}"
MFU_SECONDS="${MFU_SECONDS:-45}"
# Worst case, every step at its limit: 120 + 100 + 2 x (45 + 55) = 420 s, plus 10 s kill grace each.
if [[ "${DRY_RUN:-0}" == 1 ]]; then
  DEVICE=cpu LAYER=(--device cpu --dtype float32 --tokens 256 --rounds 2)
  MFU=(--model tiny-moe --seq-len 128 --micro-batch 2) MFU_SECONDS=2
else
  DEVICE=cuda LAYER=(--device cuda --dtype bfloat16 --tokens 4096 16384 --rounds 20)
  MFU=(--model moe-8x152m --seq-len 4096 --micro-batch 4)
fi
mkdir -p "$OUT_DIR"
OUT_DIR="$(cd "$OUT_DIR" && pwd)"
cd "$ROOT" || exit 2
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}"
STATUS="$OUT_DIR/status.tsv"
: > "$STATUS"
START=$SECONDS

# step NAME LIMIT_S COMMAND...: run with a time limit, log to OUT_DIR/NAME.log, record the exit status.
step() {
  local name=$1 limit=$2
  shift 2
  echo "== $name (limit ${limit}s, at $((SECONDS - START))s)"
  local t0=$SECONDS
  timeout --kill-after=10 "$limit" "$@" > "$OUT_DIR/$name.log" 2>&1
  local rc=$?
  printf '%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - t0))" >> "$STATUS"
  tail -n 12 "$OUT_DIR/$name.log"
  echo "== $name: exit $rc in $((SECONDS - t0))s"
}

step checks 120 "$PY" benchmarks/gpu_check.py --device "$DEVICE" --out "$OUT_DIR"
step layer 100 "$PY" benchmarks/bench_moe_layer.py "${LAYER[@]}" --json "$OUT_DIR/layer.json"
for kernel in grouped loop; do
  step "mfu_$kernel" $((MFU_SECONDS + 55)) "$PY" -m torch.distributed.run --standalone --nproc_per_node=1 \
    benchmarks/gpu_mfu.py "${MFU[@]}" --seconds "$MFU_SECONDS" --expert-kernel "$kernel" \
    --json "$OUT_DIR/mfu_$kernel.json"
done

"$PY" - "$OUT_DIR" <<'EOF'
"""Merge every step's JSON and exit status into OUT_DIR/gpu_check.json and print the headline numbers."""
import json
import sys
from pathlib import Path

out = Path(sys.argv[1])
status = {}
for line in (out / "status.tsv").read_text().splitlines():
    name, rc, seconds = line.split("\t")
    status[name] = {"exit": int(rc), "seconds": int(seconds)}
summary = {"status": status}
for name, path in (("checks", "checks.json"), ("layer", "layer.json"), ("mfu_grouped", "mfu_grouped.json"),
                   ("mfu_loop", "mfu_loop.json")):
    p = out / path
    summary[name] = json.loads(p.read_text()) if p.exists() else None
summary["ok"] = all(s["exit"] == 0 for s in status.values()) and bool((summary["checks"] or {}).get("ok"))
(out / "gpu_check.json").write_text(json.dumps(summary, indent=1) + "\n")
for report in summary["layer"] or []:
    r = report["results"]
    print(f"layer {report['tokens']} tokens: share of the GEMM ceiling grouped {r['ours_grouped']['share_of_ceiling']:.2f}"
          f" loop {r['ours_loop']['share_of_ceiling']:.2f} hf_grouped_mm {r['hf_grouped_mm']['share_of_ceiling']:.2f};"
          f" ceiling {r['ceiling']['gemm_tflops']:.0f} TFLOP/s")
for kernel in ("grouped", "loop"):
    m = summary[f"mfu_{kernel}"]
    if m:
        print(f"{m['model']} step, {kernel}: {m['tokens_per_s']:.0f} tokens/s, MFU {m['mfu']:.3f}")
print(f"ok: {summary['ok']}  ->  {out / 'gpu_check.json'}")
EOF
echo "total $((SECONDS - START))s"
