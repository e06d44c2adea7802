"""Shared fixtures: tiny checkpoints made on the fly, a synthetic four-domain corpus, and the real one.

Every test model is built by :func:`random_model` (imported by the test modules); the tiny
checkpoints that several modules read are the session fixtures ``tiny_dense_dir`` and ``tiny_moe_dir``.

Tests need nothing outside the repository: multi-domain text comes from :mod:`synthetic_corpus`, the
authors' released routing counts from ``reports/reference/``. The real corpus (the authors' routing
texts) is read only by tests about it, marked ``real_corpus``; they find it the product's way
(``$DROP_UPCYCLING_CORPUS``, then the user cache; tests never download). CI has it and fails if it
is missing; elsewhere those tests are skipped, saying how to provide it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from synthetic_corpus import write_synthetic_corpus

from drop_upcycling import data_pipeline
from drop_upcycling.checkpoint import save_model
from drop_upcycling.configs import MODEL_CONFIGS, ModelConfig
from drop_upcycling.model import CausalLM

REPO = Path(__file__).resolve().parents[1]
RELEASED_COUNTS = REPO / "reports" / "reference" / "fig5_routing_counts.csv"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "real_corpus: reads the authors' routing texts (CI has them; "
                                       "deselect with -m 'not real_corpus')")


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The synthetic four-domain corpus (same layout as the real one; use it with ``pinned=False``)."""
    return write_synthetic_corpus(tmp_path_factory.mktemp("synthetic") / "corpus")


@pytest.fixture
def pinned_corpus(corpus_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """The synthetic corpus with the pins set to its own sha256: the verify/download paths on local files."""
    for domain, path in data_pipeline.verify_corpus(corpus_dir, pinned=False).items():
        monkeypatch.setitem(data_pipeline.CORPUS_SHA256, domain, data_pipeline.sha256_file(path))
    yield corpus_dir


@pytest.fixture(scope="session")
def real_corpus() -> Path:
    """The authors' routing texts, found as the product finds them (no download); pinned-verified."""
    explicit = os.environ.get(data_pipeline.ENV_CORPUS)
    path = Path(explicit) if explicit else data_pipeline.cache_root() / "corpus"
    if not path.is_dir():
        message = (f"real corpus not found at {path}: set ${data_pipeline.ENV_CORPUS} or run "
                   "`drop-upcycling data corpus --out /tmp/splits` once with network")
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    data_pipeline.verify_corpus(path)
    return path


class RandomTokens:
    """A resumable reader of random token batches for trainer tests: batch i of a rank depends only on
    (rank, i), so a resumed run reads what the uninterrupted one read."""

    def __init__(self, rank: int, vocab_size: int, seq_len: int) -> None:
        self.rank, self.vocab_size, self.seq_len, self.drawn = rank, vocab_size, seq_len, 0

    def next_batch(self, batch_size: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(1000 * self.rank + self.drawn)
        self.drawn += 1
        return torch.randint(0, self.vocab_size, (batch_size, self.seq_len), generator=gen)

    def state_dict(self) -> dict:
        return {"drawn": self.drawn}

    def load_state_dict(self, state: dict) -> None:
        self.drawn = state["drawn"]


def random_model(cfg: ModelConfig | str, seed: int = 0, varied_norms: bool = False) -> CausalLM:
    """A :class:`CausalLM` with the keyed from-scratch init of ``seed`` (``cfg``: a config or a registered name).

    ``varied_norms`` draws the norm weights from U[0.5, 1.5) (one generator seeded ``seed``, in
    parameter order) instead of leaving them at 1, so that a norm that is lost, re-initialized or
    applied wrongly shows.
    """
    model = CausalLM(MODEL_CONFIGS[cfg] if isinstance(cfg, str) else cfg)
    model.init_weights(seed)
    if varied_norms:
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("norm.weight"):
                    p.uniform_(0.5, 1.5, generator=g)
    return model


@pytest.fixture(scope="session")
def tiny_dense_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random dense Llama checkpoint in HF format (fp32), its norms varied: upcycling must copy them."""
    return save_model(random_model("tiny-dense", seed=1234, varied_norms=True),
                      tmp_path_factory.mktemp("ckpt") / "tiny-dense")


@pytest.fixture(scope="session")
def tiny_moe_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Mixtral checkpoint in HF format (4 experts, fp32), named like an upcycled model
    (the routing analysis reads the method from a model's name)."""
    return save_model(random_model("tiny-moe", seed=7), tmp_path_factory.mktemp("ckpt") / "DU-0.5-tiny")
