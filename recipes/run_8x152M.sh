#!/usr/bin/env bash
# Upcycle the dense-152m seed by every method and train each 8x152M MoE (FACTS.md §3-§4); see common.sh.
# Usage: recipes/run_8x152M.sh [--dry-run | --rehearse] [METHOD ...]   (--help lists the methods)
SIZE=8x152M
DENSE_NAME=dense-152m
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
