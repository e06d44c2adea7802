#!/usr/bin/env bash
# Shared body of run_8x152M.sh, run_8x1.5B.sh and run_8x3.7B.sh (sourced; they set SIZE and DENSE_NAME).
#
# For each method (FS NU RNU-0.5 DU-0.5 DU-1.0 BTX): upcycle the dense seed with `drop-upcycling upcycle`
# (node 0 only; other nodes wait for the checkpoint on the shared file system), then train the MoE with
# torchrun using recipes/configs/${SIZE}_<method>.yaml. Re-running continues from the latest checkpoint.
#
# Usage: recipes/run_${SIZE}.sh [--dry-run] [METHOD ...]     (methods: fs nu rnu0.5 du0.5 du1.0 btx)
# Environment:
#   DENSE_CKPT   dense seed checkpoint (HF Llama dir)       default runs/dense/$DENSE_NAME
#   BTX_SOURCES  four dense checkpoints for BTX: seed, ja, en, code (space separated); BTX is skipped without
#   RUNS         output root                                default runs
#   NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT   multi-node rendezvous (torchrun); defaults: one node
#   GPUS_PER_NODE                                 default: the number of GPUs nvidia-smi lists
# Without GPUs (or with --dry-run) it prints the plan instead of running anything.
set -euo pipefail

DRY_RUN=0
SELECTED=()
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY_RUN=1 ;;
    -h|--help) sed -n '2,16p' "${BASH_SOURCE[0]}"; exit 0 ;;
    fs|nu|rnu0.5|du0.5|du1.0|btx) SELECTED+=("$arg") ;;
    *) echo "unknown argument: $arg (methods: fs nu rnu0.5 du0.5 du1.0 btx; flag: --dry-run)" >&2; exit 2 ;;
  esac
done
[ ${#SELECTED[@]} -eq 0 ] && SELECTED=(fs nu rnu0.5 du0.5 du1.0 btx)

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PY=${PYTHON:-python}
RUNS=${RUNS:-runs}
DENSE=${DENSE_CKPT:-$RUNS/dense/$DENSE_NAME}
NNODES_SET=${NNODES:-}
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
if [ -z "${GPUS_PER_NODE:-}" ]; then
  GPUS_PER_NODE=$( (nvidia-smi -L 2>/dev/null || true) | grep -c '^GPU' || true)
fi
if [ "$DRY_RUN" -eq 0 ] && [ "${GPUS_PER_NODE:-0}" -eq 0 ]; then
  echo "no GPU found on this machine: printing the plan instead (same as --dry-run)"
  DRY_RUN=1
fi

upcycle_args() {  # method -> arguments of `drop-upcycling upcycle` after SRC OUT
  case "$1" in
    nu) echo "--method naive" ;;
    rnu0.5) echo "--method noise --ratio 0.5" ;;
    du0.5) echo "--method drop --ratio 0.5" ;;
    du1.0) echo "--method drop --ratio 1.0" ;;
  esac
}

for method in "${SELECTED[@]}"; do
  config="$HERE/configs/${SIZE,,}_${method}.yaml"
  out="$RUNS/${SIZE,,}_${method}"
  init="$RUNS/upcycled/${SIZE,,}_${method}"
  echo "=== ${SIZE} ${method} ==="
  if [ "$method" = fs ]; then
    upcycle=()
    init_flag=()
  elif [ "$method" = btx ]; then
    if [ -z "${BTX_SOURCES:-}" ]; then
      echo "BTX needs BTX_SOURCES (the seed and its ja, en and code continuations): skipped"
      continue
    fi
    # shellcheck disable=SC2206
    upcycle=("$PY" -m drop_upcycling.cli upcycle "$init" --method btx --sources $BTX_SOURCES)
    init_flag=(--init "$init")
  else
    # shellcheck disable=SC2046
    upcycle=("$PY" -m drop_upcycling.cli upcycle "$DENSE" "$init" $(upcycle_args "$method"))
    init_flag=(--init "$init")
  fi
  nodes=$NNODES
  gpus=$GPUS_PER_NODE
  if [ "$DRY_RUN" -eq 1 ]; then
    # The plan: the recipe's layout (nodes in the YAML, 8 GPUs per node) unless NNODES/GPUS_PER_NODE are set.
    nodes=${NNODES_SET:-$(sed -n 's/^nodes: *\([0-9]*\).*/\1/p' "$config")}
    [ "${gpus:-0}" -gt 0 ] || gpus=8
  fi
  train=("$PY" -m torch.distributed.run --nnodes "$nodes" --node_rank "$NODE_RANK" --nproc_per_node "$gpus"
         --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT"
         -m drop_upcycling.train "$config" --out "$out" "${init_flag[@]}" --resume)
  if [ "$DRY_RUN" -eq 1 ]; then
    [ ${#upcycle[@]} -gt 0 ] && echo "upcycle: ${upcycle[*]}"
    echo "train (on each of the $nodes node(s), NODE_RANK=0..$((nodes - 1))): ${train[*]}"
    "$PY" -m drop_upcycling.train "$config" --dry-run --nodes "$nodes" --gpus-per-node "$gpus"
    continue
  fi
  if [ ${#upcycle[@]} -gt 0 ] && [ ! -f "$init/config.json" ]; then
    if [ "$NODE_RANK" -eq 0 ]; then
      "${upcycle[@]}"
    else
      echo "waiting for node 0 to write $init"
      until [ -f "$init/config.json" ]; do sleep 10; done
    fi
  fi
  "${train[@]}"
done
