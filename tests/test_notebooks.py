"""The analysis notebooks run top to bottom, in this venv's Python, on small inputs."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import nbformat
import pandas as pd
import pytest
from conftest import RELEASED_COUNTS
from nbclient import NotebookClient

from drop_upcycling.flops import plan_table
from drop_upcycling.routing import routing_metrics
from drop_upcycling.routing_csv import read_counts

ANALYSIS = Path(__file__).resolve().parents[1] / "analysis"
RELEASED = RELEASED_COUNTS


def _execute(name: str, env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> str:
    """Run a notebook (the kernel inherits ``env``) and return all its stream output."""
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    nb = nbformat.read(ANALYSIS / name, as_version=4)
    # kernel "python3" with argv[0] "python" is started as sys.executable by jupyter_client: this venv.
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(ANALYSIS)}}).execute()
    text = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            assert out.get("output_type") != "error", out
            if out.get("output_type") == "stream":
                text.append(out["text"])
    return "".join(text)


def test_routing_notebook(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    released = read_counts(RELEASED)
    # Small input: two models, eight layers, split over two files.
    small = released[released["layer"] < 8]
    paths = []
    for model in ("NU-8x1.5B", "DU-0.5-8x1.5B"):
        path = tmp_path / f"{model}.csv"
        small[small["model"] == model].to_csv(path, index=False)
        paths.append(str(path))
    out = tmp_path / "out"
    text = _execute("routing.ipynb", {"ROUTING_COUNTS": ":".join(paths), "ROUTING_OUT": str(out)}, monkeypatch)
    assert f"python: {sys.executable}" in text or f"python: {os.path.realpath(sys.executable)}" in text
    assert "NU-8x1.5B            same top-2 in 8/8 layers" in text
    assert (out / "routing_fig5.png").stat().st_size > 10_000
    got = pd.read_csv(out / "routing_metrics.csv")
    expected = routing_metrics(read_counts(paths))
    pd.testing.assert_frame_equal(got, expected, check_dtype=False)


def test_flops_notebook(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "out"
    text = _execute("flops.ipynb", {"FLOPS_SEQ_LEN": "2048", "FLOPS_OUT": str(out)}, monkeypatch)
    assert "python:" in text and "DU-0.5 moe-8x3.7b costs 0.2" in text
    assert (out / "flops_plan.png").is_file()
    table = pd.read_csv(out / "flops_plan.csv")
    from drop_upcycling.flops import TrainingPlan

    expected = pd.DataFrame(plan_table(TrainingPlan(seq_len=2048)))
    assert table["total_flops_full"].tolist() == pytest.approx(expected["total_flops_full"].tolist())


def test_curves_notebook(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from test_curves import write_run

    from drop_upcycling.curves import analyze_curves

    runs = [write_run(tmp_path / "runs", "nu-s0", "NU", 0, [3.0, 2.9, 2.8, 2.7]),
            write_run(tmp_path / "runs", "du0.5-s0", "DU-0.5", 0, [3.5, 2.9, 2.6, 2.5])]
    dense = write_run(tmp_path / "runs", "dense-s0", "dense", 0, [3.0, 3.0, 2.95, 2.9], moe=False)
    out = tmp_path / "out"
    env = {"CURVES_RUNS": ":".join(map(str, runs)), "CURVES_DENSE": str(dense), "CURVES_SMOOTH": "1",
           "CURVES_OUT": str(out)}
    text = _execute("curves.ipynb", env, monkeypatch)
    assert "python:" in text and "lowest final LM loss: Drop-Upcycling r=0.5 (DU-0.5) 2.5000" in text
    assert (out / "loss_curves.png").stat().st_size > 10_000
    expected = analyze_curves(runs, tmp_path / "ref", dense=dense, window=1)["final"]
    got = pd.read_csv(out / "final_losses.csv")
    assert got["method"].tolist() == ["dense", "NU", "DU-0.5"]
    assert got["final_lm_loss_mean"].tolist() == pytest.approx(expected["final_lm_loss_mean"].tolist())
