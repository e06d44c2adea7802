"""The streaming safetensors writer against safetensors' own reader, and its refusal of surprises."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from drop_upcycling.checkpoint import INDEX_FILE, PlannedWriter


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {f"t{i}": torch.randn(3 + i, 5, generator=g) for i in range(6)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_planned_writer_files_read_back_with_safetensors(tmp_path, dtype) -> None:
    tensors = _tensors()
    writer = PlannedWriter(tmp_path, [(n, tuple(t.shape)) for n, t in tensors.items()], dtype, max_shard_bytes=200)
    for name, t in tensors.items():
        writer.add(name, t)
    weight_map = writer.close()
    index = json.loads((tmp_path / INDEX_FILE).read_text())
    assert index["weight_map"] == weight_map and len(set(weight_map.values())) > 1
    loaded = {}
    for f in sorted(set(weight_map.values())):
        loaded.update(load_file(tmp_path / f))
    assert loaded.keys() == tensors.keys()
    for name, t in tensors.items():
        assert loaded[name].dtype == dtype and torch.equal(loaded[name], t.to(dtype))


def test_planned_writer_refuses_out_of_plan_tensors(tmp_path) -> None:
    writer = PlannedWriter(tmp_path, [("a", (2,)), ("b", (3,))], torch.float32)
    with pytest.raises(RuntimeError, match="planned a"):
        writer.add("b", torch.zeros(3))
    writer = PlannedWriter(tmp_path, [("a", (2,)), ("b", (3,))], torch.float32)
    writer.add("a", torch.zeros(2))
    with pytest.raises(RuntimeError, match="never written"):
        writer.close()
