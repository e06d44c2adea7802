"""The CPU study: its statistics against hand-computed numbers, and the study pipeline end to end at toy
size (held-out logs, runs one per core, the ablation, the report's regime and du_vs_nu)."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from drop_upcycling import smoke
from drop_upcycling.study import HeldoutRun, crossover, expert_trajectories, paired_gaps, t_interval

TOKENS = np.geomspace(1e5, 1e6, 9)


def _gaps(per_seed: dict[int, np.ndarray]) -> pd.DataFrame:
    return pd.DataFrame([{"seed": s, "tokens": t, "gap": g} for s, gaps in per_seed.items()
                         for t, g in zip(TOKENS, gaps, strict=True)])


def test_t_interval_is_the_textbook_one() -> None:
    # mean 2, sample sd 1, n 3: half-width t(0.975, 2) / sqrt(3) = 4.303 / 1.7321 = 2.4843
    got = t_interval([1.0, 2.0, 3.0])
    assert got["mean"] == 2.0 and got["n"] == 3
    assert got["low"] == pytest.approx(2 - 2.4843, abs=1e-4) and got["high"] == pytest.approx(2 + 2.4843, abs=1e-4)
    assert t_interval([5.0])["low"] is None


def test_crossover_extrapolates_the_zero_of_a_log_line_with_the_seeds_as_interval() -> None:
    # gap = a - 0.02 ln t: zeros at exp(a / 0.02) = e^25, e^30, e^35; the seed mean has a = 0.6 -> e^30.
    cross = crossover(_gaps({s: a - 0.02 * np.log(TOKENS) for s, a in ((0, 0.5), (1, 0.6), (2, 0.7))}))
    assert cross["crossover_tokens"] is None
    ex = cross["extrapolated_crossover"]
    assert ex["tokens"] == pytest.approx(math.exp(30), rel=1e-6)
    assert ex["low"] == pytest.approx(math.exp(25), rel=1e-6) and ex["high"] == pytest.approx(math.exp(35), rel=1e-6)
    assert cross["fit"]["b"] == pytest.approx(-0.02)


def test_crossover_is_measured_where_the_mean_gap_stays_below_zero() -> None:
    gaps = np.array([0.1, 0.05, -0.01, 0.01, -0.02, -0.03, -0.03, -0.04, -0.05])
    cross = crossover(_gaps({0: gaps, 1: gaps + 0.001, 2: gaps - 0.001}))
    assert cross["crossover_tokens"] == pytest.approx(TOKENS[4])  # dips at 2, back above at 3, below from 4 on
    assert cross["extrapolated_crossover"] is None and cross["method"].startswith("measured")


def test_a_widening_gap_is_no_crossover_in_sight() -> None:
    cross = crossover(_gaps({s: 0.01 * s + 0.02 * np.log(TOKENS / 1e4) for s in range(3)}))
    assert cross["crossover_tokens"] is None and cross["extrapolated_crossover"] is None
    assert cross["method"].startswith("no crossover in sight")


def _run(label: str, method: str, seed: int, rows: list[dict]) -> HeldoutRun:
    return HeldoutRun(label, method, seed, Path(label), rows, {}, None)


def test_gaps_pair_runs_by_seed_and_tokens() -> None:
    def rows(losses):
        return [{"step": i, "tokens": 100 * i, "loss": {"a": x}, "mean": x} for i, x in enumerate(losses)]
    runs = [_run("nu-s0", "NU", 0, rows([5.0, 4.0])), _run("du-s0", "DU-0.5", 0, rows([6.0, 3.5])),
            _run("nu-s1", "NU", 1, rows([5.0, 4.2])), _run("du-s1", "DU-0.5", 1, rows([6.5, 4.0]))]
    gaps = paired_gaps(runs)
    assert gaps.to_dict(orient="list") == {"seed": [0, 0, 1, 1], "tokens": [0, 100, 0, 100],
                                           "gap": pytest.approx([1.0, -0.5, 1.5, -0.2])}


def test_specialization_is_two_for_disjoint_domains_and_zero_for_alike() -> None:
    disjoint = {"x": [[10, 0, 0, 0]], "y": [[0, 0, 7, 0]]}
    alike = {"x": [[1, 2, 3, 4]], "y": [[2, 4, 6, 8]]}
    rows = [{"step": 0, "tokens": 0, "loss": {}, "mean": 0.0, "routing": disjoint, "expert_cosine": [1.0]},
            {"step": 1, "tokens": 8, "loss": {}, "mean": 0.0, "routing": alike, "expert_cosine": [0.5]}]
    traj = expert_trajectories([_run("nu-s0", "NU", 0, rows)])
    assert traj["specialization"].tolist() == pytest.approx([2.0, 0.0])
    assert traj["specialization_x"].tolist() == pytest.approx([1.0, 0.0])  # L1 to the pooled (0.5, 0, 0.5, 0)
    assert traj["expert_cosine"].tolist() == [1.0, 0.5]


def test_the_study_pipeline_end_to_end_at_toy_size(corpus_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture) -> None:
    """Two paired seeds of NU and DU-0.5 and a 2-arm ablation (r = 0, both index sets), 2 runs at a time:
    held-out rows at the planned evaluations, runs overlapping in time, the r = 0 arms identical
    (the index set cannot matter when nothing is re-drawn), and the report's regime and du_vs_nu."""
    monkeypatch.setenv("DROP_UPCYCLING_CACHE", str(tmp_path / "cache"))
    base = smoke.SCALES["study"]
    toy = dataclasses.replace(
        base, model={**base.model, "num_hidden_layers": 2}, global_batch_tokens=1024, micro_batch_size=8,
        pretrain_steps=16, moe_steps=8, ablation_steps=4, heldout_every_tokens=4 * 1024, heldout_sequences=4,
        eval_size="ci", eval_limit=2, routing_tokens=1024, methods=("NU", "DU-0.5"), seeds=(0, 1), single_seed=("dense",),
        ablation=((0.0, "per-matrix"), (0.0, "shared")))
    monkeypatch.setitem(smoke.SCALES, "study", toy)
    out = tmp_path / "out"
    code = smoke.main(["--scale", "study", "--out", str(out), "--corpus", str(corpus_dir), "--unpinned",
                       "--ablation-report", str(tmp_path / "ablations")])
    log = capsys.readouterr().out
    assert code == 0, log[-3000:]

    rows = [json.loads(x) for x in (out / "runs" / "nu-s0" / "heldout.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 4, 8]
    assert rows[0]["expert_cosine"] == pytest.approx([1.0, 1.0])  # NU: copies of one FFN
    # Parallel: the second run started before the first finished.
    lines = log.splitlines()
    start_du = next(i for i, x in enumerate(lines) if "train-du0.5-s0 ..." in x)
    end_nu = next(i for i, x in enumerate(lines) if "train-nu-s0: done" in x)
    assert start_du < end_nu

    sweep = pd.read_csv(tmp_path / "ablations" / "r_sweep.csv")
    assert set(sweep.columns) >= {"r", "index_mode", "seed", "tokens", "final_heldout_loss"}
    assert sorted(sweep["index_mode"]) == ["per-matrix", "shared"]
    assert sweep["final_heldout_loss"].iloc[0] == sweep["final_heldout_loss"].iloc[1]
    assert (tmp_path / "ablations" / "r_sweep.png").is_file() and (tmp_path / "ablations" / "README.md").is_file()

    findings = json.loads((out / "report" / "findings.json").read_text())
    reg = findings["regime"]
    assert reg["seeds"] == {"dense": 1, "DU-0.5": 2, "NU": 2} and reg["heldout_loss"] is True
    assert reg["dense_tokens"] == 16 * 1024 and reg["moe_to_dense_tokens"] == pytest.approx(0.5)
    assert reg["dense_tokens_per_param"] == pytest.approx(16 * 1024 / reg["dense_params"])
    assert set(findings["du_vs_nu"]) >= {"crossover_tokens", "extrapolated_crossover", "method"}
    assert json.loads((out / "checks" / "matmul_rate.json").read_text())["flops_per_s"] > 0
