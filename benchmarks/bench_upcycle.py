"""Upcycling a dense checkpoint of the real 152M shape into 8x152M: time, throughput, peak memory.

Reference in the same run: ``safetensors.torch.save_file`` of the very same output tensors, already
in memory. The ratio says how much the streaming conversion (read, build experts, write) costs over
just writing the bytes; the peak RSS shows that streaming never holds the whole MoE.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file, save_file

from drop_upcycling.checkpoint import save_model
from drop_upcycling.configs import MODEL_CONFIGS
from drop_upcycling.model import CausalLM
from drop_upcycling.upcycle import UpcycleOptions, upcycle


class PeakRSS:
    """Samples this process's resident memory in a thread; ``peak_mb`` is the maximum above the start."""

    def __init__(self, interval: float = 0.01) -> None:
        self.interval, self.proc = interval, psutil.Process()
        self.start = self.peak = self.proc.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(self.interval)

    def __enter__(self) -> PeakRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def peak_mb(self) -> float:
        return (self.peak - self.start) / 1e6


@pytest.fixture(scope="module")
def dense_152m(tmp_path_factory) -> Path:
    """Random weights of the real 152M shape, bf16 like the released checkpoints."""
    cfg = MODEL_CONFIGS["dense-152m"]
    with torch.device("meta"):
        model = CausalLM(cfg)
    model = model.to_empty(device="cpu")
    with torch.no_grad():
        g = torch.Generator().manual_seed(0)
        for p in model.parameters():
            p.normal_(0.0, 0.02, generator=g)
    return save_model(model.to(torch.bfloat16), tmp_path_factory.mktemp("bench") / "dense-152m")


def test_upcycle_152m_to_8x152m(benchmark, dense_152m: Path, tmp_path: Path) -> None:
    out = tmp_path / "du-0.5"
    opts = UpcycleOptions(method="drop", ratio=0.5, num_experts=8, seed=0)

    def convert() -> None:
        upcycle(dense_152m, out, opts, overwrite=True, progress=False)

    with PeakRSS() as rss:
        benchmark.pedantic(convert, rounds=2, iterations=1, warmup_rounds=0)
    seconds = benchmark.stats.stats.min
    out_bytes = sum(f.stat().st_size for f in out.glob("*.safetensors"))

    # Reference: write the same tensors from memory with safetensors, best of 2.
    tensors = {}
    for f in sorted(out.glob("*.safetensors")):
        tensors.update(load_file(f))
    ref_times = []
    for _ in range(2):
        t0 = time.perf_counter()
        save_file(tensors, str(tmp_path / "reference.safetensors"))
        ref_times.append(time.perf_counter() - t0)
    in_memory_mb = sum(t.numel() * t.element_size() for t in tensors.values()) / 1e6
    info = {
        "seconds": round(seconds, 3),
        "output_MB": round(out_bytes / 1e6, 1),
        "output_MB_per_s": round(out_bytes / 1e6 / seconds, 1),
        "peak_rss_MB_above_start": round(rss.peak_mb, 1),
        "save_file_seconds": round(min(ref_times), 3),
        "ratio_upcycle_over_save_file": round(seconds / min(ref_times), 2),
        "reference_holds_MB_in_memory": round(in_memory_mb, 1),
    }
    benchmark.extra_info.update(info)
    print("\nupcycle 152M -> 8x152M (DU-0.5, bf16):", info)
    assert out_bytes > 0.8e9  # 0.417B params in bf16
