"""Assertions on the outputs of a finished smoke run (``recipes/run_smoke.sh``); CI runs them after it.

Not part of ``pytest tests``: the directory is given explicitly and a missing run is a failure, not a skip::

    pytest recipes/checks --smoke-dir reports/smoke

(``recipes/checks/conftest.py`` adds the option; the folder lies outside ``testpaths``, so ``pytest tests`` never collects it.)
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from drop_upcycling.layout import METRICS, ReproLayout
from drop_upcycling.methods import DENSE
from drop_upcycling.smoke import SCALES

MOE_METHODS = SCALES["ci"].methods  # every scale runs at least these


def _manifest(run_dir: Path) -> dict:
    path = ReproLayout(run_dir).manifest
    assert path.is_file(), f"{path} missing: the smoke run did not finish"
    return json.loads(path.read_text())


def _first_lm_loss(run_dir: Path, label: str) -> float:
    with open(ReproLayout(run_dir).run(label) / METRICS) as f:
        return float(json.loads(f.readline())["lm_loss"])


def _runs(run_dir: Path, method: str) -> list[dict]:
    return [r for r in _manifest(run_dir)["runs"] if r["method"] == method]


def test_every_method_has_checkpoint_logs_and_eval_rows(smoke_dir: Path) -> None:
    manifest = _manifest(smoke_dir)
    methods = {r["method"] for r in manifest["runs"]}
    assert set(MOE_METHODS) | {DENSE} <= methods
    with open(ReproLayout(smoke_dir).eval_csv) as f:
        eval_labels = {row["checkpoint"] for row in csv.DictReader(f)}
    for r in manifest["runs"]:
        ckpt = smoke_dir / r["checkpoint"]
        assert (ckpt / "config.json").is_file() and (ckpt / "model.safetensors.index.json").is_file(), ckpt
        config = json.loads((ckpt / "config.json").read_text())
        assert (config.get("num_local_experts", 0) > 0) == (r["method"] != DENSE), (r["label"], config)
        lines = (smoke_dir / r["dir"] / METRICS).read_text().splitlines()
        assert len(lines) == manifest["scale_config"]["moe_steps"], r["label"]
        assert (smoke_dir / r["dir"] / "run.json").is_file()
        assert any(label.startswith(r["label"] + "__") or label == r["label"] for label in eval_labels), \
            (r["label"], sorted(eval_labels))
        if r["method"] != DENSE:
            assert ReproLayout(smoke_dir).routing_counts(r["label"]).is_file(), r["label"]


def test_figures_and_report(smoke_dir: Path) -> None:
    report = ReproLayout(smoke_dir).report
    for rel in ("README.md", "findings.json", "curves/loss_curves.png", "routing/routing_fig5.png", "flops.png"):
        path = report / rel
        assert path.is_file() and path.stat().st_size > 0, path
    assert (ReproLayout(smoke_dir).analysis / "routing" / "routing_fig5.png").is_file()


def test_nu_starts_at_the_dense_loss_on_the_same_batch(smoke_dir: Path) -> None:
    """The dense model's final loss on the MoEs' first batch is an explicit evaluation pass (checks/)."""
    first = json.loads(ReproLayout(smoke_dir).first_batch.read_text())["losses"]
    for r in _runs(smoke_dir, "NU"):
        dense = first[str(r["seed"])]["dense-final"]
        assert abs(_first_lm_loss(smoke_dir, r["label"]) - dense) < 1e-3, (r["label"], dense)
    # The dense reference runs start from the same checkpoint on the same batch: same loss.
    for r in _runs(smoke_dir, DENSE):
        assert abs(_first_lm_loss(smoke_dir, r["label"]) - first[str(r["seed"])]["dense-final"]) < 1e-3


def test_du_starts_between_nu_and_fs(smoke_dir: Path) -> None:
    for du in _runs(smoke_dir, "DU-0.5"):
        seed = du["seed"]
        nu = next(r for r in _runs(smoke_dir, "NU") if r["seed"] == seed)
        fs = next(r for r in _runs(smoke_dir, "FS") if r["seed"] == seed)
        nu_l, du_l, fs_l = (_first_lm_loss(smoke_dir, r["label"]) for r in (nu, du, fs))
        assert nu_l < du_l < fs_l, (nu_l, du_l, fs_l)
