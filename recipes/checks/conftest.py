"""``--smoke-dir DIR``: the finished smoke run that recipes/checks tests (required: missing = failure)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--smoke-dir", default=None, help="a finished recipes/run_smoke.sh output dir")


@pytest.fixture(scope="session")
def smoke_dir(request: pytest.FixtureRequest) -> Path:
    value = request.config.getoption("--smoke-dir")
    if value is None:
        pytest.fail("tests/smoke checks a finished smoke run: pass --smoke-dir DIR (recipes/run_smoke.sh --out)")
    path = Path(value)
    record = path / "smoke.json"
    if not record.is_file() or not json.loads(record.read_text()).get("finished"):
        pytest.fail(f"{path} is not a finished smoke run (no smoke.json with a finish time)")
    return path
