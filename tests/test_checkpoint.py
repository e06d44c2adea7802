"""The streaming safetensors writer and the plain-read reader against safetensors itself, their
refusal of surprises, and the HF tensor names and shapes derived from a config."""

from __future__ import annotations

import errno
import json
import os
import signal
import struct
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from drop_upcycling.checkpoint import (
    INDEX_FILE,
    CheckpointReader,
    PlannedWriter,
    SafetensorsFile,
    hf_tensor_shapes,
    load_model,
    save_model,
    to_hf,
)
from drop_upcycling.configs import MODEL_CONFIGS
from drop_upcycling.errors import UserError
from drop_upcycling.model import CausalLM


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


def test_planned_writer_error_in_its_thread_reaches_the_caller(tmp_path, monkeypatch) -> None:
    """Disk full while the thread writes: the OSError itself is raised by the next add or by close,
    and the thread is gone afterwards."""
    def full(self, i):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(PlannedWriter, "_open_shard", full)
    tensors = _tensors()
    writer = PlannedWriter(tmp_path, [(n, tuple(t.shape)) for n, t in tensors.items()], torch.float32)
    with pytest.raises(OSError, match="No space left") as raised:
        for name, t in tensors.items():
            writer.add(name, t)
        writer.close()
    assert raised.value.errno == errno.ENOSPC and not writer._thread.is_alive()


def test_planned_writer_leaving_on_an_error_stops_its_thread(tmp_path) -> None:
    tensors = _tensors()
    with pytest.raises(KeyboardInterrupt), PlannedWriter(
            tmp_path, [(n, tuple(t.shape)) for n, t in tensors.items()], torch.float32) as writer:
        writer.add("t0", tensors["t0"])
        raise KeyboardInterrupt
    assert not writer._thread.is_alive()


def _blocked_signals(tid: int) -> set[int]:
    """The signals a thread blocks, from Linux's /proc (SigBlk is a hex mask, bit n-1 for signal n)."""
    status = Path(f"/proc/self/task/{tid}/status").read_text()
    mask = int(next(line.split()[1] for line in status.splitlines() if line.startswith("SigBlk:")), 16)
    return {n for n in range(1, 65) if mask >> (n - 1) & 1}


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads Linux's /proc")
def test_planned_writer_thread_leaves_sigint_and_sigterm_to_the_caller(tmp_path, monkeypatch) -> None:
    """The kernel hands a process's signal to any thread that does not block it; the writer blocks
    SIGINT and SIGTERM so that they reach the main thread, whose handler interrupts a wait for room."""
    real_open_shard, entered, gate = PlannedWriter._open_shard, threading.Event(), threading.Event()

    def held(self, i):
        entered.set()
        gate.wait(10)
        return real_open_shard(self, i)

    monkeypatch.setattr(PlannedWriter, "_open_shard", held)
    writer = PlannedWriter(tmp_path, [("t0", (4,))], torch.float32)
    writer.add("t0", torch.zeros(4))
    assert entered.wait(10)  # the thread is inside _write_all, held at its first shard
    try:
        blocked = _blocked_signals(writer._thread.native_id)
    finally:
        gate.set()
        writer.close()
    assert {signal.SIGINT, signal.SIGTERM} <= blocked
    assert not {signal.SIGINT, signal.SIGTERM} & _blocked_signals(threading.main_thread().native_id)


def test_planned_writer_holds_at_most_queue_bytes_after_add(tmp_path, monkeypatch) -> None:
    """add returns only once what waits for the thread fits in queue_bytes: a slow disk bounds memory."""
    real_open_shard, gate = PlannedWriter._open_shard, threading.Event()

    def slow(self, i):
        gate.wait(10)
        return real_open_shard(self, i)

    monkeypatch.setattr(PlannedWriter, "_open_shard", slow)
    tensors = {f"t{i}": torch.zeros(256) for i in range(4)}  # 1 KiB each in fp32
    writer = PlannedWriter(tmp_path, [(n, (256,)) for n in tensors], torch.float32, queue_bytes=2048)
    writer.add("t0", tensors["t0"])
    writer.add("t1", tensors["t1"])  # 2 KiB queued: still fits
    blocked = threading.Thread(target=writer.add, args=("t2", tensors["t2"]))
    blocked.start()
    blocked.join(0.3)
    assert blocked.is_alive()  # 3 KiB would wait: add blocks until the thread catches up
    gate.set()
    blocked.join(10)
    writer.add("t3", tensors["t3"])
    writer.close()
    assert torch.equal(load_file(tmp_path / "model.safetensors")["t3"], tensors["t3"])


# ---------------------------------------------------------------------------- tensor names and shapes
@pytest.mark.parametrize("cfg", [
    MODEL_CONFIGS["tiny-dense"], MODEL_CONFIGS["tiny-moe"], MODEL_CONFIGS["dense-1.5b"],  # GQA: 16 heads, 8 kv
    MODEL_CONFIGS["moe-8x152m"], MODEL_CONFIGS["tiny-moe"].replace(tie_word_embeddings=True, num_experts=3),
], ids=lambda c: c.name + ("-tied" if c.tie_word_embeddings else ""))
def test_hf_tensor_shapes_are_the_models_state_dict_in_hf_names(cfg) -> None:
    """Names, shapes and order, against the model itself (on the meta device) mapped by to_hf."""
    with torch.device("meta"):
        model = CausalLM(cfg)
    expected = [(hf_name, tuple(t.shape)) for name, param in model.state_dict().items()
                if not (cfg.tie_word_embeddings and name == "lm_head.weight")
                for hf_name, t in to_hf(name, param)]
    assert list(hf_tensor_shapes(cfg).items()) == expected


# ---------------------------------------------------------------------------- reading
ALL_DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int64, torch.int32,
              torch.int16, torch.int8, torch.uint8, torch.bool]


def test_reader_reads_what_safetensors_wrote_in_every_dtype(tmp_path) -> None:
    g = torch.Generator().manual_seed(0)
    tensors = {f"x.{str(d).removeprefix('torch.')}": (torch.randn(5, 7, generator=g) * 50).to(d) for d in ALL_DTYPES}
    tensors["scalar"], tensors["empty"] = torch.tensor(3.5), torch.zeros(0, 4)
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    (tmp_path / "config.json").write_text(json.dumps(MODEL_CONFIGS["tiny-dense"].to_hf_dict()))
    reader = CheckpointReader(tmp_path)
    assert set(reader) == set(tensors)
    for name, t in tensors.items():
        got = reader.get(name)
        assert got.dtype == t.dtype and got.shape == t.shape and torch.equal(got, t), name
        assert reader.shape(name) == tuple(t.shape)


def test_reader_reads_sharded_checkpoints_and_maps_nothing(tiny_moe_dir, tmp_path) -> None:
    """Tensors come from plain reads into their own memory: no shard stays mapped (the reason for the
    reader: a mapped source stays in the process's resident memory)."""
    model = load_model(tiny_moe_dir)
    out = save_model(model, tmp_path / "sharded", max_shard_bytes=50_000)
    assert len(list(out.glob("*.safetensors"))) > 2
    reader = CheckpointReader(out)
    read = {name: reader.get(name) for name in reader}
    if Path("/proc/self/maps").is_file():
        assert str(out) not in Path("/proc/self/maps").read_text()
    reference = {}
    for f in out.glob("*.safetensors"):
        reference.update(load_file(f))
    assert read.keys() == reference.keys()
    for name, t in reference.items():
        assert torch.equal(read[name], t), name


def _write_raw(path: Path, header: dict, data: bytes) -> None:
    blob = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)


@pytest.mark.parametrize("case,message", [
    ("truncated", "truncated or corrupt"),
    ("header longer than file", "header of"),
    ("not json", "not a readable safetensors file"),
    ("bad dtype", "bad header entry w"),
    ("size mismatch", "24 bytes expected"),
    ("tiny", "shorter than the 8-byte header length"),
])
def test_reader_refuses_broken_files_when_opening_them(tmp_path, case, message) -> None:
    f = tmp_path / "model.safetensors"
    entry = {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]}
    if case == "truncated":
        _write_raw(f, {"w": entry}, b"\0" * 12)
    elif case == "header longer than file":
        f.write_bytes(struct.pack("<Q", 10_000) + b"{}")
    elif case == "not json":
        f.write_bytes(struct.pack("<Q", 4) + b"{{{{")
    elif case == "bad dtype":
        _write_raw(f, {"w": {**entry, "dtype": "Q7"}}, b"\0" * 24)
    elif case == "size mismatch":
        _write_raw(f, {"w": {**entry, "data_offsets": [0, 20]}}, b"\0" * 24)
    else:
        f.write_bytes(b"\1\2")
    with pytest.raises(UserError, match="not a readable safetensors file") as raised:
        SafetensorsFile(f)
    assert message in str(raised.value) and str(f) in str(raised.value)


@pytest.mark.parametrize("kernel_copy", [True, False], ids=["copy_file_range", "buffered-copy"])
def test_planned_writer_copies_stored_tensors_file_to_file(tmp_path, monkeypatch, kernel_copy) -> None:
    """A StoredTensor is copied without being read into memory (or, in another dtype, read and
    converted): the output equals writing the tensors themselves."""
    if not kernel_copy:
        monkeypatch.delattr(os, "copy_file_range", raising=False)
    tensors = _tensors()
    save_file(tensors, tmp_path / "src.safetensors")
    stored = SafetensorsFile(tmp_path / "src.safetensors").tensors
    for dtype in (torch.float32, torch.bfloat16):
        out = tmp_path / str(dtype)
        out.mkdir()
        with PlannedWriter(out, [(n, tuple(t.shape)) for n, t in tensors.items()], dtype) as writer:
            for i, name in enumerate(tensors):
                writer.add(name, stored[name] if i % 2 == 0 else tensors[name])
            writer.close()
        loaded = load_file(out / "model.safetensors")
        for name, t in tensors.items():
            assert torch.equal(loaded[name], t.to(dtype)), (dtype, name)
        assert stored["t0"].read().dtype == torch.float32
