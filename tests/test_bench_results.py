"""The benchmarks' results file (benchmarks/conftest.py) and the README table made from it (benchmarks/report.py)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


results_lib, report = _load("conftest"), _load("report")
RUN = {"date": "2030-01-02T03:04:05Z", "commit": "abc1234", "dirty": False,
       "machine": {"cores": 2, "cpu": "Some CPU", "gpu": None, "load_average_at_start": 0.3},
       "versions": {"torch": "2.13.0", "numpy": "2.4"}}


def test_a_row_is_the_median_of_its_rounds_with_the_spread_and_verdict() -> None:
    row = results_lib.ratio_row([1.9, 2.4, 1.7], label="conv", test="t", target=2.0, better="lower", seconds=3.0)
    assert (row["value"], row["min"], row["max"], row["rounds"]) == (1.9, 1.7, 2.4, 3)
    assert row["meets_target"] is True and row["details"] == {"seconds": 3.0}
    share = results_lib.ratio_row(0.45, label="share", test="t", target=0.7, better="higher", unit="%")
    assert share["meets_target"] is False and share["rounds"] == 1
    assert results_lib.ratio_row(1.0, label="x", test="t")["meets_target"] is None
    with pytest.raises(ValueError, match="better"):
        results_lib.ratio_row(1.0, label="x", test="t", better="faster")


def test_merging_replaces_rows_by_name_and_keeps_the_others_with_their_run(tmp_path: Path) -> None:
    path = tmp_path / "results.json"
    a = results_lib.ratio_row([1.5], label="A", test="t::a")
    b = results_lib.ratio_row([0.9], label="B", test="t::b", unit="%")
    results_lib.merge_results(path, RUN, "run1", {"a": a, "b": b})
    newer = results_lib.ratio_row([1.2], label="A", test="t::a")
    merged = results_lib.merge_results(path, {**RUN, "commit": "def5678"}, "run2", {"a": newer})
    assert json.loads(path.read_text()) == merged and merged["schema"] == results_lib.SCHEMA
    assert merged["ratios"]["a"]["value"] == 1.2 and merged["ratios"]["a"]["run"] == "run2"
    assert merged["ratios"]["b"]["run"] == "run1" and set(merged["runs"]) == {"run1", "run2"}
    merged = results_lib.merge_results(path, RUN, "run3", {"b": b})  # run1 is no longer named by any row
    assert set(merged["runs"]) == {"run2", "run3"}


def test_the_readme_block_is_rendered_from_the_results_and_checked(tmp_path: Path) -> None:
    path = tmp_path / "results.json"
    rows = {"conv": results_lib.ratio_row([1.62, 1.55, 1.80], label="Conversion / floor", test="t", target=2.0),
            "share": results_lib.ratio_row([0.72, 0.70], label="Step share", test="t", target=0.7, better="higher",
                                           unit="%"),
            "rss": results_lib.ratio_row(1.02, label="8x1.5B peak RSS", test="t", target=1.5, unit="GB"),
            "near": results_lib.ratio_row([0.698, 0.66, 0.73], label="Near share", test="t", target=0.7,
                                          better="higher", unit="%")}
    results_lib.merge_results(path, RUN, "run1", rows)
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\nbefore\n\n{report.START}\nold table\n{report.END}\n\nafter\n")
    assert report.main(["--results", str(path), "--readme", str(readme), "--check"]) == 1
    assert report.main(["--results", str(path), "--readme", str(readme)]) == 0
    text = readme.read_text()
    assert report.main(["--results", str(path), "--readme", str(readme), "--check"]) == 0
    assert text.startswith("# x\n\nbefore\n\n<!-- bench:start -->") and text.endswith("<!-- bench:end -->\n\nafter\n")
    assert "| Conversion / floor | 1.62x | <= 2.00x: met | 1.55x .. 1.80x (3) |" in text
    assert "| Step share | 71% | >= 70%: met | 70% .. 72% (2) |" in text
    assert "| 8x1.5B peak RSS | 1.02 GB | <= 1.50 GB: met |" in text
    # 69.8% would round to the target it misses: shown with a decimal more.
    assert "| Near share | 69.8% | >= 70%: **missed** | 66% .. 73% (3) |" in text
    assert "2030-01-02 at abc1234 on 2 CPU cores (Some CPU); torch 2.13.0, numpy 2.4" in text
    readme.write_text("no markers\n")
    with pytest.raises(SystemExit, match="bench:start"):
        report.main(["--results", str(path), "--readme", str(readme)])


def test_a_run_is_dirty_when_measured_code_changed_not_when_only_the_benchmarks_outputs_did(tmp_path: Path) -> None:
    """The results file and the README table are rewritten by every run; a second run on the same
    commit is still a clean one. Any other tracked change makes it dirty."""
    import subprocess

    def git(*args: str) -> None:
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=tmp_path, check=True,
                       capture_output=True)

    (tmp_path / "benchmarks").mkdir()
    files = {"README.md": "table\n", "benchmarks/results.json": "{}\n", "benchmarks/bench_x.py": "x = 1\n"}
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    git("init", "-q")
    git("add", ".")
    git("commit", "-qm", "c")
    assert results_lib._provenance(tmp_path)["dirty"] is False
    (tmp_path / "README.md").write_text("new table\n")
    (tmp_path / "benchmarks/results.json").write_text('{"ratios": {}}\n')
    (tmp_path / "notes.txt").write_text("untracked\n")
    assert results_lib._provenance(tmp_path)["dirty"] is False
    (tmp_path / "benchmarks/bench_x.py").write_text("x = 2\n")
    assert results_lib._provenance(tmp_path)["dirty"] is True
