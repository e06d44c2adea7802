"""FLOPs and parameter counts: FACTS.md §3, an audit against torch's FlopCounterMode, the plan and CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import random_model
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from drop_upcycling.cli import main
from drop_upcycling.configs import MODEL_CONFIGS
from drop_upcycling.errors import UserError
from drop_upcycling.flops import (
    ROW_FIELDS,
    TrainingPlan,
    flops_row,
    forward_flops_per_token,
    headline,
    plan_table,
    training_flops_per_token,
)

# FACTS.md §3, in billions, as printed there (rounded).
FACTS_PARAMS = {
    "dense-152m": (0.152, 0.152, 3), "moe-8x152m": (0.417, 0.190, 3),
    "dense-1.5b": (1.558, 1.558, 3), "moe-8x1.5b": (8.957, 2.616, 3),
    "dense-3.7b": (3.783, 3.783, 3), "moe-8x3.7b": (18.58, 5.90, 2),
    "dense-13b": (13.7, 13.7, 1),
}


@pytest.mark.parametrize("name", sorted(FACTS_PARAMS))
def test_params_match_facts_table(name: str) -> None:
    total, active, digits = FACTS_PARAMS[name]
    row = flops_row(MODEL_CONFIGS[name])
    assert round(row["total_params"] / 1e9, digits) == pytest.approx(total)
    assert round(row["active_params"] / 1e9, digits) == pytest.approx(active)
    assert row["flops_per_token_6n"] == 6 * row["active_params"]


@pytest.mark.parametrize("name", ["tiny-dense", "tiny-moe"])
def test_full_count_matches_flop_counter(name: str) -> None:
    """Forward + backward of our model, counted by torch, vs the analytic full count (within 2%).

    The math SDPA backend is forced because torch's counter has no formula for the CPU flash kernel;
    the math backend runs attention as plain (masked, full S x S) batched matmuls, which it counts.
    """
    cfg = MODEL_CONFIGS[name]
    model = random_model(cfg, 0)
    batch, seq = 3, 48
    ids = torch.randint(0, cfg.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(0))
    counter = FlopCounterMode(display=False)
    with sdpa_kernel(SDPBackend.MATH), counter:
        model(ids, labels=ids).loss.backward()
    measured = counter.get_total_flops()
    expected = training_flops_per_token(cfg, seq_len=seq) * batch * seq
    assert measured == pytest.approx(expected, rel=0.02)
    # The attention term is what the 6N approximation leaves out: it must be visible in the count.
    attn = 3 * forward_flops_per_token(cfg, seq)["attention_scores"] * batch * seq
    assert counter.get_flop_counts()["Global"][torch.ops.aten.bmm] == pytest.approx(attn, rel=0.02)


@pytest.mark.parametrize("name", ["dense-1.5b", "moe-8x1.5b", "moe-8x3.7b", "dense-13b"])
def test_full_count_is_6n_on_matmul_params_plus_attention(name: str) -> None:
    """Independent bookkeeping: every parameter except the embedding table and the norm weights sits
    in exactly one matmul per token (6 FLOPs per training token); attention adds 12 * S * d per layer."""
    cfg = MODEL_CONFIGS[name]
    d, n, s = cfg.hidden_size, cfg.num_hidden_layers, 4096
    matmul_params = cfg.param_counts()["active"] - cfg.vocab_size * d - (2 * n + 1) * d
    assert training_flops_per_token(cfg, s) == 6 * matmul_params + 12 * n * s * d
    # Causal: half the keys plus one half per query on average.
    assert training_flops_per_token(cfg, s, causal=True) == 6 * matmul_params + 12 * n * (s + 1) / 2 * d


def test_plan_table_and_headline() -> None:
    rows = plan_table(TrainingPlan())
    by = {(r["model"], r["method"]): r for r in rows}
    fs, du, seed = by[("moe-8x3.7b", "FS")], by[("moe-8x3.7b", "DU-0.5")], by[("dense-3.7b", "dense")]
    assert fs["seed_flops_6n"] == 0 and fs["tokens"] == 5e11
    assert du["total_flops_6n"] == pytest.approx(seed["total_flops_6n"] + fs["total_flops_6n"])
    assert du["total_flops_6n"] == pytest.approx(6 * 3.783e9 * 1e12 + 6 * 5.898e9 * 5e11, rel=1e-3)
    head = headline()
    # Paper: 8x3.7B DU matches 13B dense at about 1/4 of the training FLOPs.
    assert 0.2 < head["ratio_6n"] < 0.3 and 0.2 < head["ratio_full"] < 0.3
    # With 1T tokens for the reference too, the saving halves: the ratio depends on the plan, not fixed.
    assert headline(TrainingPlan(reference_tokens=1e12))["ratio_6n"] == pytest.approx(head["ratio_6n"] * 2.1)


def test_plan_yaml(tmp_path: Path) -> None:
    good = tmp_path / "plan.yaml"
    good.write_text("plan:\n  moe_tokens: 1.0e11\n  moe_models: [moe-8x152m]\n  methods: [FS, DU-0.5]\n")
    plan = TrainingPlan.from_yaml(good)
    assert plan.moe_tokens == 1e11 and len(plan_table(plan)) == 4
    bad = tmp_path / "bad.yaml"
    bad.write_text("moe_tokenz: 5\n")
    with pytest.raises(UserError, match="unknown plan field"):
        TrainingPlan.from_yaml(bad)


def test_flops_cli_json_csv_table(capsys, tmp_path: Path) -> None:
    assert main(["flops", "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["model"] for r in rows] == [n for n in MODEL_CONFIGS if not n.startswith("tiny-")]
    assert all(set(ROW_FIELDS) <= set(r) for r in rows)
    assert main(["flops", "--model", "tiny-moe", "--model", "moe-8x1.5b", "--tokens", "1e9", "--format", "csv"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(",".join(ROW_FIELDS)) and "training_flops_full" in lines[0] and len(lines) == 3
    cfg = tmp_path / "m.yaml"
    cfg.write_text("model:\n  base: tiny-dense\n  num_hidden_layers: 4\n")
    assert main(["flops", "--config", str(cfg), "--format", "json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row["total_params"] == MODEL_CONFIGS["tiny-dense"].replace(num_hidden_layers=4).param_counts()["total"]
    assert main(["flops", "--plan", "paper"]) == 0
    assert "headline" in capsys.readouterr().out


def test_plan_cli_writes_files_and_figure(tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    assert main(["flops", "--plan", "paper", "--out", str(out), "--formats", "png,svg"]) == 0
    data = json.loads((out / "flops_plan.json").read_text())
    assert data["headline"]["ratio_6n"] == pytest.approx(headline()["ratio_6n"])
    assert len(data["rows"]) == len(plan_table()) == len((out / "flops_plan.csv").read_text().splitlines()) - 1
    assert (out / "flops_plan.png").read_bytes()[:4] == b"\x89PNG" and (out / "flops_plan.svg").is_file()
    assert main(["flops", "--model", "dense-13b", "--out", str(out)]) == 0
    assert json.loads((out / "flops.json").read_text())["rows"][0]["model"] == "dense-13b"


def test_flops_cli_errors(capsys, tmp_path: Path) -> None:
    assert main(["flops", "--model", "moe-9x9"]) == 2
    assert "unknown model" in capsys.readouterr().err
    assert main(["flops", "--tokens", "-5"]) == 2
    assert main(["flops", "--plan", str(tmp_path / "missing.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err
