#!/usr/bin/env bash
# Upcycle the dense-1.5b seed by every method and train each 8x1.5B MoE (FACTS.md §3-§4); see common.sh.
# Usage: recipes/run_8x1.5B.sh [--dry-run | --rehearse] [METHOD ...]   (--help lists the methods)
SIZE=8x1.5B
DENSE_NAME=dense-1.5b
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
