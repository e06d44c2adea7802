"""Loss curves: final losses, crossovers, seeds and FLOPs against hand-computed values on synthetic logs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from drop_upcycling.cli import main
from drop_upcycling.configs import get_model_config
from drop_upcycling.curves import analyze_curves, first_stays_below, read_metrics, read_run, read_runs, smooth
from drop_upcycling.errors import UserError
from drop_upcycling.flops import training_flops_per_token

TOKENS_PER_STEP = 100
SEQ_LEN = 32


def write_run(root: Path, name: str, method: str | None, seed: int, lm_loss: list[float], *, moe: bool = True,
              run_extra: dict | None = None, info_extra: dict | None = None) -> Path:
    """A run folder as the trainer leaves it: metrics.jsonl (``loss`` = lm_loss + 10, so using the
    wrong column shows) and run.json with the tiny model's HF config."""
    d = root / name
    d.mkdir(parents=True)
    cfg = get_model_config("tiny-moe" if moe else "tiny-dense")
    run = {"method": method, "seed": seed, "seq_len": SEQ_LEN, "global_batch_tokens": TOKENS_PER_STEP,
           "data": {"corpus": "c"}, **(run_extra or {})}
    info = {"seed": seed, "run": run, "model": cfg.to_hf_dict(), "world_size": 2, **(info_extra or {})}
    (d / "run.json").write_text(json.dumps(info))
    with open(d / "metrics.jsonl", "w") as f:
        for i, v in enumerate(lm_loss, 1):
            f.write(json.dumps({"step": i, "tokens": i * TOKENS_PER_STEP, "loss": v + 10.0, "lm_loss": v,
                                "aux_loss": 10.0}) + "\n")
    return d


def test_first_stays_below_hand_cases() -> None:
    t = np.array([100.0, 200, 300, 400, 500])
    b = np.full(5, 3.0)
    assert first_stays_below(t, np.array([5.0, 4, 3, 2, 1]), b) == 400  # 3 < 3 is false at index 2
    assert first_stays_below(t, np.array([4.0, 2, 4, 2, 2]), b) == 400  # dips below, back above, below for good
    assert first_stays_below(t, np.array([1.0, 1, 1, 1, 1]), b) == 100  # below from the start
    assert first_stays_below(t, np.array([1.0, 1, 1, 1, 3]), b) is None  # not below at the end: never


def test_smoothing_is_a_trailing_moving_average() -> None:
    np.testing.assert_allclose(smooth([5, 4, 3, 2, 1], 2), [5, 4.5, 3.5, 2.5, 1.5])
    np.testing.assert_allclose(smooth([5, 4, 3, 2, 1], 3), [5, 4.5, 4, 3, 2])
    with pytest.raises(UserError, match="window"):
        smooth([1.0], 0)


def test_final_losses_crossovers_seeds_and_dense(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    a0 = write_run(runs, "A-s0", "DU-0.5", 0, [5, 4, 3, 2, 1])
    a1 = write_run(runs, "A-s1", "DU-0.5", 1, [5, 4, 3, 2, 2])
    b = write_run(runs, "B", "NU", 0, [3, 3, 3, 3, 3])
    dense = write_run(runs, "ref", None, 0, [3.5, 3.5, 3.5, 3.5, 3.5], moe=False)
    out = tmp_path / "out"
    res = analyze_curves([a0, a1, b], out, dense=dense, window=2, last=2)

    # Final loss = mean of the last 2 raw lm_loss values; across seeds mean / sample std / min / max.
    per_run = res["runs"].set_index("run")
    assert per_run.loc["A-s0", "final_lm_loss"] == pytest.approx(1.5)
    assert per_run.loc["A-s1", "final_lm_loss"] == pytest.approx(2.0)
    assert per_run.loc["A-s0", "first_lm_loss"] == pytest.approx(5.0)  # lm_loss, not loss (= 15)
    final = res["final"].set_index("method")
    assert list(final.index) == ["dense", "NU", "DU-0.5"]  # the paper's order
    du = final.loc["DU-0.5"]
    assert du["n_seeds"] == 2 and du["seeds"] == "0 1"
    assert du["final_lm_loss_mean"] == pytest.approx(1.75)
    assert du["final_lm_loss_std"] == pytest.approx(np.std([1.5, 2.0], ddof=1))
    assert (du["final_lm_loss_min"], du["final_lm_loss_max"]) == pytest.approx((1.5, 2.0))
    assert final.loc["dense", "label"] == "dense" and final.loc["NU", "label"] == "naive upcycling (NU)"
    assert final.loc["dense", "final_lm_loss_mean"] == pytest.approx(3.5)

    # Smoothed (window 2): A-s0 [5, 4.5, 3.5, 2.5, 1.5], A-s1 [5, 4.5, 3.5, 2.5, 2]; mean [5, 4.5, 3.5, 2.5, 1.75].
    curve = res["curves"]["DU-0.5"]
    np.testing.assert_allclose(curve.mean, [5, 4.5, 3.5, 2.5, 1.75])
    lo, hi = curve.band("minmax")
    np.testing.assert_allclose(lo, [5, 4.5, 3.5, 2.5, 1.5])
    np.testing.assert_allclose(hi, [5, 4.5, 3.5, 2.5, 2.0])
    cross = res["crossovers"].set_index(["a", "b"])
    assert cross.loc[("DU-0.5", "NU"), "crossover_tokens"] == 400  # 2.5 < 3 from step 4
    assert cross.loc[("DU-0.5", "dense"), "crossover_tokens"] == 400  # 3.5 < 3.5 is false at step 3
    assert pd.isna(cross.loc[("NU", "DU-0.5"), "crossover_tokens"]) and cross.loc[("NU", "DU-0.5"), "note"] == "never"
    assert cross.loc[("NU", "dense"), "crossover_tokens"] == 100
    assert cross.loc[("NU", "dense"), "note"] == "from the start"

    # FLOPs axis: tokens x the full training count of the run's model at its sequence length.
    moe_fpt = training_flops_per_token(get_model_config("tiny-moe"), SEQ_LEN)
    dense_fpt = training_flops_per_token(get_model_config("tiny-dense"), SEQ_LEN)
    assert per_run.loc["A-s0", "training_flops"] == pytest.approx(500 * moe_fpt)
    assert per_run.loc["ref", "training_flops"] == pytest.approx(500 * dense_fpt)
    assert per_run.loc["ref", "method"] == "dense"

    for name in ("final_losses.csv", "final_losses_runs.csv", "crossovers.csv", "final_losses.md", "crossovers.md"):
        assert (out / name).stat().st_size > 0
    assert (out / "loss_curves.png").stat().st_size > 20_000
    md = (out / "final_losses.md").read_text()
    assert "Drop-Upcycling r=0.5 (DU-0.5)" in md and "1.7500 ± 0.3536 (1.5000–2.0000)" in md


def test_crossover_beyond_spread(tmp_path: Path) -> None:
    """A's upper band edge against B's lower one: with seeds A stays below B later (or never)."""
    runs = tmp_path / "runs"
    a = [write_run(runs, "A0", "DU-0.5", 0, [4, 2, 2, 2]), write_run(runs, "A1", "DU-0.5", 1, [4, 4, 2, 2])]
    b = [write_run(runs, "B0", "NU", 0, [3, 3, 3, 3]), write_run(runs, "B1", "NU", 1, [3, 3, 3, 1.5])]
    res = analyze_curves(a + b, tmp_path / "out", window=1, last=1)
    cross = res["crossovers"].set_index(["a", "b"])
    # means: A [4, 3, 2, 2], B [3, 3, 3, 2.25] -> A below from step 3; band: A max [4,4,2,2] vs B min [3,3,3,1.5].
    assert cross.loc[("DU-0.5", "NU"), "crossover_tokens"] == 300
    assert pd.isna(cross.loc[("DU-0.5", "NU"), "crossover_beyond_spread_tokens"])


def test_seeds_on_different_grids_are_interpolated(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    a = write_run(runs, "A0", "FS", 0, [4.0, 3.0, 2.0, 1.0])
    d = runs / "A1"
    d.mkdir()
    (d / "run.json").write_text((a / "run.json").read_text().replace('"seed": 0', '"seed": 1'))
    # Logged every other step: tokens 200 and 400 only, losses 4 and 2.
    (d / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "tokens": 100 * s, "lm_loss": v}) + "\n"
                                             for s, v in ((2, 4.0), (4, 2.0))))
    curve = analyze_curves([a, d], tmp_path / "out", window=1, last=1)["curves"]["FS"]
    np.testing.assert_allclose(curve.tokens, [200, 300, 400])  # the range both cover
    np.testing.assert_allclose(curve.mean, [(3 + 4) / 2, (2 + 3) / 2, (1 + 2) / 2])


def test_bad_inputs_are_one_clear_error(tmp_path: Path) -> None:
    good = write_run(tmp_path, "ok", "NU", 0, [3.0, 2.0])
    with pytest.raises(UserError, match="does not exist"):
        read_metrics(tmp_path / "nothing" / "metrics.jsonl")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(UserError, match="no metrics"):
        read_metrics(empty)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"step": 1, "tokens": 100, "lm_loss": 3.0}\n{"step": 2, "tok\n')
    with pytest.raises(UserError, match=r"bad.jsonl:2 is not valid JSON"):
        read_metrics(bad)
    nolm = tmp_path / "nolm.jsonl"
    nolm.write_text('{"step": 1, "tokens": 100, "loss": 3.0}\n')
    with pytest.raises(UserError, match=r"nolm.jsonl:1 lacks lm_loss"):
        read_metrics(nolm)
    twice = tmp_path / "twice.jsonl"
    twice.write_text((good / "metrics.jsonl").read_text() * 2)
    with pytest.raises(UserError, match="must increase"):
        read_metrics(twice)
    (tmp_path / "norun").mkdir()
    (tmp_path / "norun" / "metrics.jsonl").write_text((good / "metrics.jsonl").read_text())
    with pytest.raises(UserError, match=r"no run\.json"):
        read_run(tmp_path / "norun")
    with pytest.raises(UserError, match="same method NU and seed 0"):
        read_runs([good, good])
    # Through the CLI: exit status 2 and one line on stderr, nothing written.
    out = tmp_path / "out"
    assert main(["analyze", "curves", str(good), str(tmp_path / "empty_run"), "--out", str(out)]) == 2
    assert not out.exists()


def test_cli_writes_figures_in_every_format(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    runs = tmp_path / "runs"
    nu = write_run(runs, "NU", "NU", 0, list(np.linspace(3, 2, 40)))
    fs = write_run(runs, "FS", "FS", 0, list(np.linspace(9, 1.9, 40)))
    out = tmp_path / "out"
    assert main(["analyze", "curves", str(nu), str(fs), "--out", str(out), "--smooth", "3", "--formats",
                 "png,svg"]) == 0
    assert (out / "loss_curves.png").is_file() and (out / "loss_curves.svg").is_file()
    text = capsys.readouterr().out
    assert "from scratch (FS)" in text and "naive upcycling (NU)" in text


def test_method_from_run_json_else_from_the_folder_slug(tmp_path: Path) -> None:
    """run.json's method wins; without one, the recipe's label slug names it (du0.5-s1 -> DU-0.5)."""
    named = write_run(tmp_path, "whatever", "RNU-0.5", 0, [3.0])
    slug = write_run(tmp_path, "du0.5-s1", None, 1, [3.0])
    assert read_run(named).method == "RNU-0.5"
    assert read_run(slug).method == "DU-0.5"
    from drop_upcycling.plotstyle import method_label

    assert method_label("du0.5-s1") == "Drop-Upcycling r=0.5 (DU-0.5), s1"
    assert method_label("rnu0.5-s0") == "noise upcycling (RNU-0.5), s0"
