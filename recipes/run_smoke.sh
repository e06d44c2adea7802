#!/usr/bin/env bash
# The main job: the paper's pipeline end to end at CPU scale (no GPU needed).
#
#   bash recipes/run_smoke.sh [--scale ci|full] [--out DIR] [--force] [--corpus DIR] [--report DIR]
#
# corpus -> tokenizer -> shards; pre-train a small dense Llama; upcycle it by FS, NU, RNU-0.5, DU-0.5,
# DU-1.0 (and BTX at full scale); train every MoE for the same token budget with EP=2 under torchrun
# (gloo, 2 processes) and continue the dense model for the same budget as the dense reference;
# evaluate every final checkpoint on the local lm-eval suite; count routing per MoE; write the
# figures and the report (default --out reports/smoke, report in OUT/report/README.md).
# --scale ci takes a few minutes (CI runs it); full (the default) under an hour on 2 cores.
# Stages are resumable: a rerun skips finished stages whose config hash matches; --force redoes them.
# Every stage prints the drop-upcycling / torchrun command it runs (stage logs under OUT).
# The corpus: --corpus DIR, else $DROP_UPCYCLING_CORPUS, else ~/.cache/drop_upcycling/corpus, else the
# pinned, sha256-checked download (about 10 MB); offline with none of these, it stops in seconds.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
case "${1:-}" in -h|--help) sed -n '2,15p' "${BASH_SOURCE[0]}"; exit 0 ;; esac
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false MPLBACKEND=Agg
exec "${PYTHON:-python}" -m drop_upcycling.smoke "$@"
