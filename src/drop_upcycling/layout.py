"""Folder layouts, written down once: a training run's folder and a reproduction's folder.

**A training run** (``drop-upcycling train --out RUN``): ``RUN/metrics.jsonl`` (one JSON object per
optimizer step), ``RUN/run.json`` (seed, config, versions, resumes), ``RUN/checkpoints/step-<8
digits>/`` (each saved checkpoint, a plain HF directory) and ``RUN/checkpoints/latest``, a one-line
text file naming the newest finished one. Training writes a checkpoint in a temp dir, renames it when
whole and only then rewrites the pointer (atomically), so readers follow the pointer rather than guess
from step numbers. Evaluation and analysis read runs through these names instead of importing
:mod:`.train`, which would pull in torch's distributed stack and the optimizer.

**A reproduction** (what the smoke job writes and the report reads): the writer
(:mod:`drop_upcycling.smoke`) and the reader (:mod:`drop_upcycling.report`) both take their paths from
:class:`ReproLayout`; the layout below is the contract between them. Only ``runs/`` is required by the
report, so any recipe that leaves the same files can be reported on::

    OUT/
      runs/<label>/metrics.jsonl, run.json  every run of the comparison, one folder each (drop-upcycling
                                            train --out): the MoE runs (run.method FS, NU, RNU-0.5, DU-0.5,
                                            DU-1.0, BTX; seeds = more folders with another run.seed) and the
                                            dense reference (run.method dense): the pre-trained dense model
                                            continued for the same budget with the same seed, data,
                                            batch and world size as the MoE runs, so its first logged
                                            step is the dense model's loss on the MoEs' first batch.
                                            The method is run.method, else the folder name (NU-s1 -> NU).
      pretrain/[<name>/]metrics.jsonl       optional: the dense pre-training, run.json beside it (its cost =
                                            the seed cost of every upcycled method)
      btx_branches/<domain>/metrics.jsonl   optional: BTX's domain branches (their cost joins BTX's seed cost)
      checks/first_batch.json               optional: {"losses": {"<seed>": {"dense-final": x, ...}}}, the
                                            pre-trained dense model's LM loss on the first global batch of the
                                            runs of each seed (an evaluation pass); preferred for finding (a)
      eval/results.csv                      optional: drop-upcycling evaluate (checkpoint, task, metric,
                                            value, stderr, n); a checkpoint's method is its label's prefix
      routing/<label>/routing_counts.csv    optional: drop-upcycling routing, one folder per model
                                            (or routing/*.csv); the model column's prefix is the method
      provenance.json, smoke.json           optional: anything the recipe records (scale, runs, stage times)
      *.yaml, configs/**                    optional: config files, listed with their sha256

The smoke job also keeps, for itself (the report reads none of them): ``data/prepared.txt`` (the
prepared data's path), ``upcycled/<label>/`` (each MoE's initial checkpoint), ``analysis/`` (the
standalone figures and tables), ``stages/<stage>.json`` (the resume stamps), ``logs/`` and, by
default, the report itself in ``report/``.

Labels are ``<method slug>-s<seed>`` (``nu-s0``, ``du0.5-s1``, ``dense-s0``), with the slugs of the
method table (:mod:`drop_upcycling.methods`), so the folder name alone names the method.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

# ---------------------------------------------------------------------------- a training run
METRICS = "metrics.jsonl"
HELDOUT = "heldout.jsonl"  # held-out evaluations (drop_upcycling.heldout)
RUN_JSON = "run.json"
CHECKPOINTS = "checkpoints"
LATEST = "latest"


def checkpoint_dir(out: Path, step: int) -> Path:
    """Where run ``out`` saves the checkpoint after ``step`` optimizer steps."""
    return out / CHECKPOINTS / f"step-{step:08d}"


def latest_checkpoint(out: Path) -> Path | None:
    """The checkpoint ``RUN/checkpoints/latest`` names, or None when there is no pointer or its directory is gone."""
    pointer = out / CHECKPOINTS / LATEST
    if not pointer.is_file():
        return None
    path = out / CHECKPOINTS / pointer.read_text().strip()
    return path if path.is_dir() else None


# ---------------------------------------------------------------------------- a reproduction
RUNS = "runs"
PRETRAIN = "pretrain"
BRANCHES = "btx_branches"
ROUTING_COUNTS = "routing_counts.csv"
MANIFEST = "smoke.json"
PROVENANCE = "provenance.json"
RECORDS = (PROVENANCE, MANIFEST)  # JSON files the report shows as provenance, in this order


def run_label(slug: str, seed: int) -> str:
    """The folder name of one compared run: ``du0.5-s1``."""
    return f"{slug}-s{seed}"


@dataclass(frozen=True)
class ReproLayout:
    """The paths of the contract (module docstring) under one folder."""

    root: Path

    # -- what the report reads
    @property
    def runs(self) -> Path:
        return self.root / RUNS

    def run(self, label: str) -> Path:
        return self.runs / label

    @property
    def pretrain(self) -> Path:
        """The dense pre-training: ``pretrain/`` itself or the one run folder inside it."""
        return self.root / PRETRAIN

    @property
    def branches(self) -> Path:
        return self.root / BRANCHES

    def branch(self, domain: str) -> Path:
        return self.branches / domain

    @property
    def first_batch(self) -> Path:
        return self.root / "checks" / "first_batch.json"

    @property
    def eval_dir(self) -> Path:
        return self.root / "eval"

    @property
    def eval_csv(self) -> Path:
        return self.eval_dir / "results.csv"

    @property
    def routing(self) -> Path:
        return self.root / "routing"

    def routing_dir(self, label: str) -> Path:
        return self.routing / label

    def routing_counts(self, label: str) -> Path:
        return self.routing_dir(label) / ROUTING_COUNTS

    @property
    def ablation(self) -> Path:
        """The r x index-mode ablation of the study scale: ``ablation/runs/<label>``, ``ablation/upcycled/<label>``."""
        return self.root / "ablation"

    def ablation_run(self, label: str) -> Path:
        return self.ablation / RUNS / label

    @property
    def manifest(self) -> Path:
        return self.root / MANIFEST

    @property
    def configs(self) -> Path:
        return self.root / "configs"

    # -- what the smoke job keeps for itself
    @property
    def pretrain_run(self) -> Path:
        """The smoke job's pre-training run: ``pretrain/dense``."""
        return self.pretrain / "dense"

    @property
    def prepared_file(self) -> Path:
        return self.root / "data" / "prepared.txt"

    def upcycled(self, label: str) -> Path:
        return self.root / "upcycled" / label

    @property
    def analysis(self) -> Path:
        return self.root / "analysis"

    @property
    def matmul_rate(self) -> Path:
        return self.root / "checks" / "matmul_rate.json"

    @property
    def analysis_study(self) -> Path:
        return self.analysis / "study"

    def stamp(self, stage: str) -> Path:
        return self.root / "stages" / f"{stage}.json"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def report(self) -> Path:
        return self.root / "report"
