"""Shared fixtures: tiny checkpoints made on the fly and the shared corpus."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from drop_upcycling.checkpoint import save_model
from drop_upcycling.configs import MODEL_CONFIGS
from drop_upcycling.model import CausalLM

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


@pytest.fixture(scope="session")
def corpus_dir() -> Path:
    """The shared four-domain corpus; missing in CI is a failure, never a skip."""
    path = Path(os.environ.get("DROP_UPCYCLING_CORPUS", SHARED / "corpus" / "drop_upcycling_routing_texts"))
    assert path.is_dir(), f"corpus not found at {path} (set DROP_UPCYCLING_CORPUS)"
    return path


@pytest.fixture(scope="session")
def tiny_dense_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random dense Llama checkpoint in HF format (fp32)."""
    torch.manual_seed(0)
    model = CausalLM(MODEL_CONFIGS["tiny-dense"])
    model.init_weights(seed=1234)
    # Non-trivial norm weights so that copying them (not re-initializing) is observable.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return save_model(model, tmp_path_factory.mktemp("ckpt") / "tiny-dense")
