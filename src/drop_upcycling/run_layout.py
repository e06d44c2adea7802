"""The layout of a training run's folder, for the stages that read runs without training code.

``RUN/checkpoints/step-<8 digits>/`` holds each saved checkpoint (a plain HF directory) and
``RUN/checkpoints/latest`` is a one-line text file naming the newest finished one. Training writes
a checkpoint in a temp dir, renames it when whole and only then rewrites the pointer (atomically),
so readers follow the pointer rather than guess from step numbers.

Evaluation and analysis import this module instead of :mod:`.train`, which would pull in torch's
distributed stack and the optimizer for two names and a five-line function.
"""

from __future__ import annotations

from pathlib import Path

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
