"""The report: each finding's verdict on hand-made numbers (true, false and untested cases), and the files."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pandas as pd
import pytest
from test_curves import SEQ_LEN, write_run

from drop_upcycling.cli import main
from drop_upcycling.configs import get_model_config
from drop_upcycling.curves import final_table, read_runs, run_table
from drop_upcycling.errors import UserError
from drop_upcycling.flops import training_flops_per_token
from drop_upcycling.report import (
    finding_du_ends_below_nu,
    finding_fs_starts_worst,
    finding_nu_routing_collapses,
    finding_nu_starts_at_dense,
    write_report,
)
from drop_upcycling.routing import routing_metrics


def _final(runs) -> pd.DataFrame:
    return final_table(run_table(runs, last=1))


def test_nu_starts_at_dense(tmp_path: Path) -> None:
    dense = write_run(tmp_path, "dense", "dense", 0, [3.0, 2.9], moe=False)
    near = write_run(tmp_path, "nu_near", "NU", 0, [3.0005, 2.8])
    far = write_run(tmp_path / "b", "nu_far", "NU", 0, [3.002, 2.8])
    f = finding_nu_starts_at_dense(read_runs([dense, near]), tol=1e-3)
    assert f.reproduced is True and f.evidence["pairs"][0]["abs_diff"] == pytest.approx(5e-4)
    assert finding_nu_starts_at_dense(read_runs([dense, far]), tol=1e-3).reproduced is False
    assert finding_nu_starts_at_dense(read_runs([dense, far]), tol=3e-3).reproduced is True
    # Another seed or world size: not the same first batch, so the comparison is not made.
    other_seed = write_run(tmp_path / "c", "nu_s1", "NU", 1, [3.0, 2.8])
    f = finding_nu_starts_at_dense(read_runs([dense, other_seed]))
    assert f.reproduced is None and "seed" in f.detail
    other_world = write_run(tmp_path / "d", "nu_w", "NU", 0, [3.0, 2.8], info_extra={"world_size": 1})
    assert "world_size" in finding_nu_starts_at_dense(read_runs([dense, other_world])).detail
    assert finding_nu_starts_at_dense(read_runs([near])).reproduced is None  # no dense run
    # The recorded first-batch loss of the pre-trained dense model wins over the dense run's first step.
    recorded = {"losses": {"0": {"dense-final": 3.0019, "nu-s0": 3.0}}}
    f = finding_nu_starts_at_dense(read_runs([dense, far]), tol=1e-3, first_batch=recorded)
    assert f.reproduced is True and f.evidence["pairs"][0]["dense"].startswith("checks/first_batch.json")
    f = finding_nu_starts_at_dense(read_runs([near]), tol=1e-3, first_batch=recorded)
    assert f.reproduced is False and f.evidence["pairs"][0]["abs_diff"] == pytest.approx(1.4e-3)


def test_fs_starts_worst(tmp_path: Path) -> None:
    fs = [write_run(tmp_path, "fs0", "FS", 0, [9.0, 3.0]), write_run(tmp_path, "fs1", "FS", 1, [8.0, 3.0])]
    nu = write_run(tmp_path, "nu", "NU", 0, [3.0, 2.9])
    du1 = write_run(tmp_path, "du1", "DU-1.0", 0, [8.5, 2.9])
    f = finding_fs_starts_worst(_final(read_runs([*fs, nu])))
    assert f.reproduced is True and f.evidence["FS"]["min"] == 8.0
    # DU-1.0 starts at 8.5, above FS's lowest seed (8.0): not beyond the spread.
    f = finding_fs_starts_worst(_final(read_runs([*fs, nu, du1])))
    assert f.reproduced is False and "DU-1.0" in f.detail
    assert finding_fs_starts_worst(_final(read_runs([nu]))).reproduced is None


def test_du_ends_below_nu_beyond_the_spread(tmp_path: Path) -> None:
    nu = [write_run(tmp_path, "nu0", "NU", 0, [3.0, 2.50]), write_run(tmp_path, "nu1", "NU", 1, [3.0, 2.60])]
    du_clear = [write_run(tmp_path, "a0", "DU-0.5", 0, [4.0, 2.30]), write_run(tmp_path, "a1", "DU-0.5", 1, [4.0, 2.40])]
    f = finding_du_ends_below_nu(_final(read_runs([*nu, *du_clear])))
    assert f.reproduced is True
    assert f.evidence["DU-0.5"]["max"] == pytest.approx(2.4) and f.evidence["NU"]["min"] == pytest.approx(2.5)
    # Lower on average (2.45 < 2.55) but one DU seed (2.55) is above one NU seed (2.50): not reproduced.
    du_overlap = [write_run(tmp_path / "o", "b0", "DU-0.5", 0, [4.0, 2.35]),
                  write_run(tmp_path / "o", "b1", "DU-0.5", 1, [4.0, 2.55])]
    f = finding_du_ends_below_nu(_final(read_runs([*nu, *du_overlap])))
    assert f.reproduced is False and "beyond the spread" in f.detail
    one = finding_du_ends_below_nu(_final(read_runs([nu[0], du_clear[0]])))
    assert one.reproduced is True and one.evidence["single_seed"] and "one seed each" in one.detail
    assert finding_du_ends_below_nu(_final(read_runs(nu))).reproduced is None


def routing_counts(models: dict[str, str], layers: int = 2, experts: int = 4) -> pd.DataFrame:
    """``collapsed``: every domain on experts 0 and 1; ``specialized``: each domain its own expert."""
    rows = []
    for model, kind in models.items():
        for d, domain in enumerate(("c4", "en_wikipedia", "code_stack")):
            for layer in range(layers):
                for e in range(experts):
                    a = (100 if e < 2 else 1) if kind == "collapsed" else (100 if e == d else 5)
                    rows.append({"model": model, "domain": domain, "layer": layer, "expert": e, "assignments": a,
                                 "distinct_tokens": a})
    return pd.DataFrame(rows)


def test_nu_routing_collapses() -> None:
    good = routing_metrics(routing_counts({"NU-a": "collapsed", "FS-a": "specialized", "DU-0.5-a": "specialized"}))
    f = finding_nu_routing_collapses(good)
    assert f.reproduced is True and f.evidence["specialization"]["NU"][0] == pytest.approx(0.0)
    bad = routing_metrics(routing_counts({"NU-a": "specialized", "FS-a": "collapsed"}))
    assert finding_nu_routing_collapses(bad).reproduced is False
    # One DU seed collapsed too: NU is not below every FS/DU model.
    mixed = routing_metrics(routing_counts({"NU-a": "collapsed", "DU-0.5-a": "specialized", "DU-0.5-b": "collapsed"}))
    assert finding_nu_routing_collapses(mixed).reproduced is False
    assert finding_nu_routing_collapses(None).reproduced is None
    assert finding_nu_routing_collapses(routing_metrics(routing_counts({"FS-a": "specialized"}))).reproduced is None


def make_run_dir(root: Path) -> Path:
    """The layout contract as the smoke recipe writes it: runs/<slug>-s<seed> (2 seeds per method + dense),
    pretrain/dense/, eval/, routing/, checks/first_batch.json, smoke.json, configs/."""
    steps = 30
    curve = {"dense": (3.0, 2.9), "NU": (3.0, 2.8), "DU-0.5": (3.6, 2.6), "FS": (9.0, 2.7)}
    slug = {"dense": "dense", "NU": "nu", "DU-0.5": "du0.5", "FS": "fs"}
    for method, (start, end) in curve.items():
        for seed in (0, 1):
            losses = [end + (start - end) * (1 - i / (steps - 1)) ** 3 + 0.01 * seed for i in range(steps)]
            if method in ("NU", "dense"):
                losses[0] = start + 0.01 * seed  # NU starts where the dense reference of that seed starts
            write_run(root / "runs", f"{slug[method]}-s{seed}", method, seed, losses, moe=method != "dense")
    write_run(root / "pretrain", "dense", "dense", 0, [10.0, 5.0, 3.0], moe=False)
    (root / "checks").mkdir()
    (root / "checks" / "first_batch.json").write_text(json.dumps(
        {"losses": {str(s): {"dense-final": 3.0 + 0.01 * s + 2e-4} for s in (0, 1)}}))
    (root / "configs").mkdir()
    (root / "configs" / "pretrain.yaml").write_text("seed: 0\n")
    counts = routing_counts({"nu-s0": "collapsed", "fs-s0": "specialized", "du0.5-s0": "specialized"})
    for model, g in counts.groupby("model"):
        (root / "routing" / model).mkdir(parents=True)
        g.to_csv(root / "routing" / model / "routing_counts.csv", index=False)
    (root / "eval").mkdir()
    scores = (("du_c4_cloze", "acc", 0.4), ("du_c4_cloze", "acc_norm", 0.5), ("du_c4_ppl", "bits_per_byte", 1.2))
    rows = [{"checkpoint": f"{slug[m]}-s0__step-00000030", "task": t, "metric": metric, "value": v, "stderr": 0.01, "n": 10}
            for m in curve for t, metric, v in scores]
    pd.DataFrame(rows).to_csv(root / "eval" / "results.csv", index=False)
    (root / "smoke.json").write_text(json.dumps({"scale": "ci"}))
    return root


def test_report_files_and_verdicts(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = make_run_dir(tmp_path / "run")
    write_run(run_dir / "runs", "btx-s0", "BTX", 0, [3.2, 2.75])
    write_run(run_dir / "btx_branches", "ja", "dense-ja", 0, [3.0, 2.9], moe=False)
    out = tmp_path / "report"
    assert main(["report", str(run_dir), "--out", str(out), "--smooth", "3", "--last", "3"]) == 0
    printed = capsys.readouterr().out
    assert printed.count("REPRODUCED") == 4 and "NOT REPRODUCED" not in printed

    found = {f["id"]: f for f in json.loads((out / "findings.json").read_text(), parse_constant=_no_nan)["findings"]}
    assert {k: v["reproduced"] for k, v in found.items()} == {
        "nu_starts_at_dense": True, "fs_starts_worst": True, "du_ends_below_nu": True, "nu_routing_collapses": True}
    pairs = found["nu_starts_at_dense"]["evidence"]["pairs"]
    assert [p["abs_diff"] for p in pairs] == pytest.approx([2e-4, 2e-4])  # per seed, from checks/first_batch.json

    readme = (out / "README.md").read_text()
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", readme)
    assert {"curves/loss_curves.png", "routing/routing_fig5.png", "flops.png"} <= set(images)
    for rel in images:
        assert (out / rel).stat().st_size > 10_000, rel
    for text in ("naive upcycling (NU)", "Drop-Upcycling r=0.5 (DU-0.5)", "from scratch (FS)", "**reproduced**",
                 "du_c4_cloze (acc)", "git commit:", "torch ", '"scale": "ci"', "configs/pretrain.yaml",
                 "pre-training", "| du0.5-s0__step-00000030 | Drop-Upcycling r=0.5 (DU-0.5), s0 |"):
        assert text in readme, text
    assert (out / "eval_scores.csv").is_file() and (out / "flops.csv").is_file()
    flops = pd.read_csv(out / "flops.csv").set_index("method")
    pre_tokens = 3 * 100
    assert flops.loc["FS", "seed_tokens"] == 0 and flops.loc["NU", "seed_tokens"] == pre_tokens
    assert flops.loc["BTX", "seed_tokens"] == pre_tokens + 2 * 100  # + its branch
    dense_fpt = training_flops_per_token(get_model_config("tiny-dense"), SEQ_LEN)
    assert flops.loc["BTX", "seed_flops_full"] == pytest.approx((pre_tokens + 200) * dense_fpt)

    # Rerun over the previous report: replaced; a foreign non-empty folder is refused.
    assert main(["report", str(run_dir), "--out", str(out)]) == 0
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("x")
    with pytest.raises(UserError, match="not a previous report"):
        write_report(run_dir, foreign)


def test_report_flips_a_verdict_and_bad_inputs(tmp_path: Path) -> None:
    run_dir = make_run_dir(tmp_path / "run")
    # NU now ends below DU-0.5: the third finding must fail.
    for seed in (0, 1):
        path = run_dir / "runs" / f"nu-s{seed}" / "metrics.jsonl"
        lines = [json.loads(x) for x in path.read_text().splitlines()]
        path.write_text("".join(json.dumps({**r, "lm_loss": r["lm_loss"] - (0.5 if r["step"] > 1 else 0)}) + "\n"
                                for r in lines))
    res = write_report(run_dir, tmp_path / "out", window=1, last=3)
    assert {f.id: f.reproduced for f in res["findings"]}["du_ends_below_nu"] is False
    assert "**not reproduced**" in res["readme"].read_text()

    (run_dir / "runs" / "nu-s0" / "metrics.jsonl").write_text('{"step": 1, "tokens": 1, "lm_loss": 3}\nnot json\n')
    assert main(["report", str(run_dir), "--out", str(tmp_path / "out2")]) == 2
    assert not (tmp_path / "out2").exists()  # nothing half-written
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no runs/"):
        write_report(tmp_path / "empty", tmp_path / "out3")


def _no_nan(name: str) -> None:
    raise AssertionError(f"findings.json is not strict JSON: {name}")


def test_routing_figure_takes_the_first_seed_of_each_method() -> None:
    from drop_upcycling.report import _one_model_per_method

    models = pd.Series(["nu-s1", "du0.5-s1", "nu-s0", "fs-s0", "du0.5-s0", "fs-s1"])
    assert _one_model_per_method(models) == ["fs-s0", "nu-s0", "du0.5-s0"]
