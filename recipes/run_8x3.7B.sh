#!/usr/bin/env bash
# Upcycle the dense-3.7b seed by every method and train each 8x3.7B MoE (FACTS.md §3-§4); see common.sh.
# Usage: recipes/run_8x3.7B.sh [--dry-run | --rehearse] [METHOD ...]   (--help lists the methods)
SIZE=8x3.7B
DENSE_NAME=dense-3.7b
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
