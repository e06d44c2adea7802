"""The smoke recipe's stage runner: skip what is up to date, redo what changed, resume what was cut short."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from drop_upcycling.errors import UserError
from drop_upcycling.smoke import SCALES, Pipeline, Smoke, Stage


def _pipeline(out: Path, calls: list[str], spec_b: dict, force: bool = False, fail_b: bool = False) -> Pipeline:
    """Two stages, b depends on a; each appends its name to ``calls`` and writes its output file."""
    def action(name: str, path: Path):
        def run() -> None:
            calls.append(name)
            if name == "b" and fail_b:
                raise RuntimeError("interrupted")
            path.write_text(f"{name} {len(calls)}")
        return run

    p = Pipeline(out, force)
    p.add(Stage("a", {"x": 1}, [out / "a.txt"], action("a", out / "a.txt")))
    p.add(Stage("b", spec_b, [out / "b.txt"], action("b", out / "b.txt"), deps=["a"]))
    return p


def test_rerun_skips_finished_stages_and_force_redoes_them(tmp_path: Path) -> None:
    calls: list[str] = []
    _pipeline(tmp_path, calls, {"y": 1}).run()
    assert calls == ["a", "b"]
    times = _pipeline(tmp_path, calls, {"y": 1}).run()
    assert calls == ["a", "b"] and times["a"]["skipped"] and times["b"]["skipped"]
    _pipeline(tmp_path, calls, {"y": 1}, force=True).run()
    assert calls == ["a", "b", "a", "b"]


def test_changed_config_redoes_the_stage_and_removes_its_old_output(tmp_path: Path) -> None:
    calls: list[str] = []
    _pipeline(tmp_path, calls, {"y": 1}).run()
    (tmp_path / "b.txt").write_text("stale")
    _pipeline(tmp_path, calls, {"y": 2}).run()
    assert calls == ["a", "b", "b"]
    assert (tmp_path / "b.txt").read_text() == "b 3"
    stamp = json.loads((tmp_path / "stages" / "b.json").read_text())
    assert stamp["status"] == "done" and stamp["spec"] == {"y": 2}


def test_a_changed_dependency_invalidates_its_dependents(tmp_path: Path) -> None:
    p1 = _pipeline(tmp_path, [], {"y": 1})
    p2 = Pipeline(tmp_path, False)
    p2.add(Stage("a", {"x": 2}, [], lambda: None))
    p2.add(Stage("b", {"y": 1}, [], lambda: None, deps=["a"]))
    assert p1.by_name["b"].hash != p2.by_name["b"].hash


def test_an_interrupted_stage_is_not_marked_done(tmp_path: Path) -> None:
    calls: list[str] = []
    with pytest.raises(RuntimeError):
        _pipeline(tmp_path, calls, {"y": 1}, fail_b=True).run()
    assert json.loads((tmp_path / "stages" / "b.json").read_text())["status"] == "started"
    _pipeline(tmp_path, calls, {"y": 1}).run()
    assert calls == ["a", "b", "b"]


def test_a_stage_that_writes_nothing_fails(tmp_path: Path) -> None:
    p = Pipeline(tmp_path, False)
    p.add(Stage("a", {}, [tmp_path / "never.txt"], lambda: None))
    with pytest.raises(UserError, match="without writing"):
        p.run()


@pytest.mark.parametrize("scale", sorted(SCALES))
def test_every_scale_plans_every_method_and_a_dense_reference_per_seed(tmp_path: Path, scale: str) -> None:
    smoke = Smoke(scale, tmp_path)
    smoke.build()
    s = SCALES[scale]
    methods = {(r.method, r.seed) for r in smoke.runs}
    assert methods == {(m, seed) for seed in s.seeds for m in (*s.methods, "dense")
                       if m not in s.single_seed or seed == s.seeds[0]}
    names = [st.name for st in smoke.pipe.stages]
    assert names[:2] == ["data", "pretrain"] and names[-1] == "report" and "analyze" in names
    assert len(set(names)) == len(names)
    # MoE runs use expert parallelism over the scale's processes per run (2, or 1 run per core in the study).
    moe = [st for st in smoke.pipe.stages if st.name.startswith("train-") and "dense" not in st.name]
    assert moe and all(st.spec["ep"] == s.procs for st in moe)


def test_unknown_scale_is_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="unknown scale"):
        Smoke("huge", tmp_path)


def test_the_study_compiles_unless_told_not_to_and_other_scales_keep_their_configs(tmp_path: Path) -> None:
    """``compile`` (TrainConfig) is the study scale's choice; ``--no-compile`` trains eagerly, and a scale
    that does not compile writes no ``compile`` key, so its stages keep the hashes they had before it."""
    def training_specs(smoke: Smoke) -> list[dict]:
        smoke.build()
        return [st.spec for st in smoke.pipe.stages if st.name == "pretrain" or st.name.startswith("train-")]

    assert all(spec["compile"] is True for spec in training_specs(Smoke("study", tmp_path / "a")))
    assert all("compile" not in spec for spec in training_specs(Smoke("study", tmp_path / "b", compile=False)))
    assert all("compile" not in spec for spec in training_specs(Smoke("ci", tmp_path / "c")))
