#!/usr/bin/env bash
# Shared body of run_8x152M.sh, run_8x1.5B.sh and run_8x3.7B.sh (sourced; they set SIZE and DENSE_NAME).
#
# For each method: merge recipes/configs/${SIZE}.yaml (the size's MoE phase) with the method's overlay (its
# key and upcycling options: a row of the method table, src/drop_upcycling/methods.py, or an overlay YAML
# file) into RUNS/configs/${SIZE}_<method>.yaml (python -m drop_upcycling.recipes); upcycle the dense seed
# with `drop-upcycling upcycle` (node 0 only; other nodes wait for the checkpoint on the shared file
# system), then train the MoE with torchrun on that config. Re-running continues from the latest checkpoint.
#
# Usage: recipes/run_${SIZE}.sh [--dry-run] [METHOD ...]   (METHOD: a method slug, listed below, or an
#        overlay .yaml file; default: every method of the table)
#        recipes/run_${SIZE}.sh --rehearse [METHOD ...] [--corpus DIR [--unpinned]] [--input DOMAIN=PATH ...]
#        runs this path end to end on CPU in a minute or two, the model and batch shrunk (default methods:
#        nu du0.5): tokenizer, dense seed, shards, recipe, upcycle, torchrun (EP=2) + resume, lm-eval, into
#        RUNS/rehearsal/<size>/ (replaced each time); python -m drop_upcycling.rehearse --help for the rest
# Environment:
#   DENSE_CKPT   dense seed checkpoint (HF Llama dir)       default runs/dense/$DENSE_NAME
#   BTX_SOURCES  four dense checkpoints for BTX: seed, ja, en, code (space separated); BTX is skipped without
#                (a rehearsal makes them from its seed)
#   RUNS         output root                                default runs
#   DATA         token shards to train on (drop-upcycling data tokenize; their manifest is checked against the
#                recipe's model and the dense seed before anything runs)   default: the recipe's data: section
#   DATA_WEIGHTS their domain mix, e.g. ja=0.5,en=0.4,code=0.1  default: the domains' sizes
#   NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT   multi-node rendezvous (torchrun); defaults: one node
#   GPUS_PER_NODE                                 default: the number of GPUs nvidia-smi lists
#   REHEARSE_INPUT  --rehearse only: your own documents instead of the built-in corpus, e.g. "ja=a.jsonl en=b.jsonl"
# Without GPUs (or with --dry-run) it prints the plan instead of running anything.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PY=${PYTHON:-python}
RECIPES=("$PY" -m drop_upcycling.recipes)
BASE="$HERE/configs/${SIZE,,}.yaml"

for arg in "$@"; do  # --rehearse: the rehearsal takes every other argument (drop_upcycling/rehearse.py)
  if [ "$arg" = --rehearse ]; then
    REST=()
    for a in "$@"; do [ "$a" = --rehearse ] || REST+=("$a"); done
    exec "$PY" -m drop_upcycling.rehearse "$SIZE" --base "$BASE" --dense-name "$DENSE_NAME" ${REST[@]+"${REST[@]}"}
  fi
done

DRY_RUN=0
SELECTED=()
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY_RUN=1 ;;
    -h|--help) sed -n '2,27p' "${BASH_SOURCE[0]}"; echo "methods: $("${RECIPES[@]}" --list)"; exit 0 ;;
    -*) echo "unknown flag: $arg (flags: --dry-run, --rehearse, --help)" >&2; exit 2 ;;
    *) SELECTED+=("$arg") ;;
  esac
done
[ ${#SELECTED[@]} -eq 0 ] && read -r -a SELECTED <<< "$("${RECIPES[@]}" --list)"
DATA_ARGS=()  # DATA=DIR: the recipes train on these shards (data: {shards: DIR, weights: DATA_WEIGHTS})
[ -n "${DATA:-}" ] && DATA_ARGS=(--data "$DATA")
[ -n "${DATA_WEIGHTS:-}" ] && DATA_ARGS+=(--data-weights "$DATA_WEIGHTS")
"${RECIPES[@]}" "$BASE" "${SELECTED[@]}" ${DATA_ARGS[@]+"${DATA_ARGS[@]}"} || exit 2  # every method resolves before anything runs

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
if [ -n "${DATA:-}" ] && [ "$DRY_RUN" -eq 0 ]; then  # shards that cannot train these models stop us now
  "${RECIPES[@]}" "$BASE" "${SELECTED[@]}" ${DATA_ARGS[@]+"${DATA_ARGS[@]}"} --check-shards --dense "$DENSE" || exit 2
fi
CONFIGS="$RUNS/configs"
if [ "$DRY_RUN" -eq 1 ]; then  # the plan writes nothing: the merged configs go to a temp dir
  WRITE_DIR=$(mktemp -d)
  trap 'rm -rf "$WRITE_DIR"' EXIT
else
  WRITE_DIR=$CONFIGS
fi

for method in "${SELECTED[@]}"; do
  # RECIPE_NAME, RECIPE_METHOD, RECIPE_CONFIG, RECIPE_INIT, RECIPE_BRANCHES, RECIPE_NODES, RECIPE_UPCYCLE (array)
  recipe=$("${RECIPES[@]}" "$BASE" "$method" --runs "$RUNS" --write-dir "$WRITE_DIR" ${DATA_ARGS[@]+"${DATA_ARGS[@]}"}) || exit 2
  eval "$recipe"
  config="$CONFIGS/$RECIPE_NAME.yaml"  # what the run reads (in a dry run: where it would be)
  echo "=== ${SIZE} ${method} ==="
  upcycle=()
  if [ ${#RECIPE_UPCYCLE[@]} -gt 0 ]; then
    if [ "$RECIPE_BRANCHES" -eq 1 ]; then
      if [ -z "${BTX_SOURCES:-}" ]; then
        echo "$RECIPE_METHOD needs BTX_SOURCES (the seed and its ja, en and code continuations): skipped"
        continue
      fi
      # shellcheck disable=SC2206
      upcycle=("$PY" -m drop_upcycling.cli upcycle "$RECIPE_INIT" "${RECIPE_UPCYCLE[@]}" --sources $BTX_SOURCES)
    else
      upcycle=("$PY" -m drop_upcycling.cli upcycle "$DENSE" "$RECIPE_INIT" "${RECIPE_UPCYCLE[@]}")
    fi
  fi
  nodes=$NNODES
  gpus=$GPUS_PER_NODE
  if [ "$DRY_RUN" -eq 1 ]; then
    # The plan: the recipe's layout (nodes in the YAML, 8 GPUs per node) unless NNODES/GPUS_PER_NODE are set.
    nodes=${NNODES_SET:-$RECIPE_NODES}
    [ "${gpus:-0}" -gt 0 ] || gpus=8
  fi
  train=("$PY" -m torch.distributed.run --nnodes "$nodes" --node_rank "$NODE_RANK" --nproc_per_node "$gpus"
         --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT"
         -m drop_upcycling.train "$config" --resume)
  if [ "$DRY_RUN" -eq 1 ]; then
    [ ${#upcycle[@]} -gt 0 ] && echo "upcycle: ${upcycle[*]}"
    echo "train (on each of the $nodes node(s), NODE_RANK=0..$((nodes - 1))): ${train[*]}"
    "$PY" -m drop_upcycling.train "$RECIPE_CONFIG" --dry-run --nodes "$nodes" --gpus-per-node "$gpus"
    continue
  fi
  if [ ${#upcycle[@]} -gt 0 ] && [ ! -f "$RECIPE_INIT/config.json" ]; then
    if [ "$NODE_RANK" -eq 0 ]; then
      "${upcycle[@]}"
    else
      echo "waiting for node 0 to write $RECIPE_INIT"
      until [ -f "$RECIPE_INIT/config.json" ]; do sleep 10; done
    fi
  fi
  "${train[@]}"
done
