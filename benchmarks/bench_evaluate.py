"""lm-eval on the CI-size local suite: what the harness costs compared with the model's own forward passes.

Reference in the same run: our :class:`~drop_upcycling.model.CausalLM` scoring exactly the token
sequences lm-eval scores for the suite (each perplexity document after the EOS token, each cloze
context + choice), one unbatched forward pass per sequence, nothing else. The ratio
(``evaluate_checkpoint`` on the suite) / (bare forwards) is the harness's net cost: building tasks,
loading the HF model, tokenizing and aggregating, against the batching (16 sequences per call) it
adds. A ratio near or below 1 means the harness is not the bottleneck. The one-time imports
(about 10 s) are paid in the warm-up round.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from drop_upcycling import data
from drop_upcycling.checkpoint import save_model
from drop_upcycling.configs import MODEL_CONFIGS
from drop_upcycling.evaluate import _cached_task_manager, evaluate_checkpoint
from drop_upcycling.local_suite import LOCAL_GROUP, build_local_suite
from drop_upcycling.model import CausalLM

CFG = MODEL_CONFIGS["tiny-dense"].replace(vocab_size=512, max_position_embeddings=1024)


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("eval")
    prepared = data.prepare_all(None, root / "cache", vocab_size=512, max_docs_per_domain=500)
    suite = build_local_suite(prepared.splits_dir / "test", root / "suite", size="ci")
    model = CausalLM(CFG).eval()
    model.init_weights(seed=0)
    ckpt = save_model(model, root / "ckpt", tokenizer_from=prepared.tokenizer_dir)
    return model, ckpt, suite, prepared.tokenizer_dir


def _sequences(suite: Path, tokenizer_dir: Path) -> list[list[int]]:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    eos = tok.token_to_id("<|endoftext|>")
    seqs = []
    for path in sorted(suite.glob("*.jsonl")):
        for line in path.read_text().splitlines():
            item = json.loads(line)
            if "text" in item:
                seqs.append([eos, *tok.encode(item["text"]).ids])
            else:
                seqs += [tok.encode(item["context"] + c).ids for c in item["choices"]]
    return seqs


@pytest.mark.benchmark(group="evaluate-ci")
def test_bare_forwards(benchmark, setup) -> None:
    model, _, suite, tokenizer_dir = setup
    seqs = [torch.tensor([s]) for s in _sequences(suite, tokenizer_dir)]

    def run() -> None:
        with torch.inference_mode():
            for ids in seqs:
                model(ids)

    benchmark.pedantic(run, rounds=3, warmup_rounds=1)
    benchmark.extra_info["sequences"] = len(seqs)


@pytest.mark.benchmark(group="evaluate-ci")
def test_lm_eval_local_ci_suite(benchmark, setup) -> None:
    _, ckpt, suite, _ = setup
    tm = _cached_task_manager((str(suite),), False)
    results = benchmark.pedantic(lambda: evaluate_checkpoint(ckpt, tm, [LOCAL_GROUP], device="cpu"),
                                 rounds=3, warmup_rounds=1)
    assert len(results["results"]) >= 8
