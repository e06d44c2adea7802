"""Routing counts: what counting adds to the forward pass it rides on.

Reference in the same run: the forward pass (``return_expert_ids=True``) of a 2-layer slice of the
8x152M shape (full 99,584-token vocabulary, so the distinct-token table has its real size) on one
512-token chunk. The ratio (:class:`RoutingCounter` update) / (forward) is the bookkeeping's share of
the work; it should be far below 1.
"""

from __future__ import annotations

import pytest
import torch

from drop_upcycling.configs import MODEL_CONFIGS
from drop_upcycling.count_routing import RoutingCounter
from drop_upcycling.model import CausalLM

CFG = MODEL_CONFIGS["moe-8x152m"].replace(num_hidden_layers=2)
SEQ = 512


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = CausalLM(CFG).eval()
    model.init_weights(seed=0)
    ids = torch.randint(0, CFG.vocab_size, (1, SEQ), generator=torch.Generator().manual_seed(0))
    return model, ids


@pytest.mark.benchmark(group="routing-count")
def test_forward_only(benchmark, setup) -> None:
    model, ids = setup
    with torch.inference_mode():
        benchmark.pedantic(lambda: model(ids, return_expert_ids=True), rounds=5, warmup_rounds=1)


@pytest.mark.benchmark(group="routing-count")
def test_count_update_only(benchmark, setup) -> None:
    model, ids = setup
    with torch.inference_mode():
        expert_ids = model(ids, return_expert_ids=True).expert_ids
    counter = RoutingCounter(CFG.num_hidden_layers, CFG.num_experts, CFG.vocab_size)
    benchmark.pedantic(lambda: counter.update(ids, expert_ids), rounds=50, warmup_rounds=1)
    assert int(counter.assignments_LE[0].sum()) == 51 * SEQ * CFG.num_experts_per_tok
