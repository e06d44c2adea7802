"""The expert kernels behind GroupedExperts' seam: torch's grouped GEMM against the per-expert loop.

torch 2.13's CPU build runs ``F.grouped_mm`` (float32/bf16/fp16, autograd included), so the grouped
path is tested here on CPU itself, forward and backward, empty experts included; the selection
(``kernel="loop"|"grouped"|"auto"``) is tested as a pure function of device, dtype and capability.
The host-sync guard sees Python-level reads (``tolist``/``item``/``int``...); on a GPU,
benchmarks/gpu_check.py counts the same path's syncs under ``torch.cuda.set_sync_debug_mode("warn")``.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import random_model
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from drop_upcycling.configs import MODEL_CONFIGS
from drop_upcycling.moe import (
    GroupedExperts,
    SparseMoeBlock,
    _block_transpose,
    auto_kernel,
    resolve_kernel,
    set_expert_kernel,
)

ROOT = Path(__file__).resolve().parents[1]
TINY_MOE = MODEL_CONFIGS["tiny-moe"]
_HOST_READS = {torch.Tensor.tolist, torch.Tensor.item, torch.Tensor.__int__, torch.Tensor.__float__,
               torch.Tensor.__bool__, torch.Tensor.__index__, torch.Tensor.cpu, torch.Tensor.numpy}


class HostReads(TorchFunctionMode):
    """Counts the ways Python code reads a tensor's values onto the host (a sync on a GPU).

    A TorchFunctionMode sees tensor methods called from Python; the dispatch mode inside catches
    ``.item()`` reached from C++ (``aten._local_scalar_dense``).
    """

    def __init__(self) -> None:
        super().__init__()
        self.reads: list[str] = []
        outer = self

        class _Scalars(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                if func is torch.ops.aten._local_scalar_dense.default:
                    outer.reads.append("_local_scalar_dense")
                return func(*args, **(kwargs or {}))

        self._scalars = _Scalars()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in _HOST_READS:
            self.reads.append(func.__name__)
        return func(*args, **(kwargs or {}))

    def __enter__(self):
        self._scalars.__enter__()
        return super().__enter__()

    def __exit__(self, *exc):
        super().__exit__(*exc)
        return self._scalars.__exit__(*exc)


def _experts(num_local: int = 5, dim: int = 32, ffn: int = 48, seed: int = 0) -> GroupedExperts:
    experts = GroupedExperts(num_local, dim, ffn)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in experts.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return experts


def _run(experts: GroupedExperts, kernel: str, x_GD: torch.Tensor, counts_L: torch.Tensor,
         grad_GD: torch.Tensor) -> dict[str, torch.Tensor]:
    """Output and every gradient of one forward + backward with ``kernel``."""
    experts.kernel = kernel
    experts.zero_grad(set_to_none=True)
    x = x_GD.clone().requires_grad_(True)
    y = experts(x, counts_L)
    y.backward(grad_GD)
    return {"y": y.detach(), "x.grad": x.grad, **{f"{n}.grad": p.grad for n, p in experts.named_parameters()}}


@pytest.mark.parametrize("counts", [
    [3, 0, 7, 1, 0],  # empty experts in the middle and at the end
    [0, 0, 9, 0, 0],  # every row to one expert
    [0, 0, 0, 0, 0],  # no rows at all (a rank that received nothing)
    [1, 1, 1, 1, 1],
    [64, 17, 0, 33, 2],
], ids=["empty-mid-end", "one-expert", "no-rows", "one-each", "uneven"])
def test_grouped_kernel_equals_the_loop_forward_and_backward(counts: list[int]) -> None:
    experts = _experts()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(sum(counts), 32, generator=gen)
    grad = torch.randn(sum(counts), 32, generator=gen)
    counts_L = torch.tensor(counts)
    loop = _run(experts, "loop", x, counts_L, grad)
    grouped = _run(experts, "grouped", x, counts_L, grad)
    for name, want in loop.items():
        assert grouped[name] is not None, name
        torch.testing.assert_close(grouped[name], want, rtol=1e-5, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")
    for e, c in enumerate(counts):  # an expert with no rows: a zero gradient, present, in both kernels
        if c == 0:
            for w in ("w1", "w2", "w3"):
                assert not grouped[f"{w}.grad"][e].any() and not loop[f"{w}.grad"][e].any()


@pytest.mark.parametrize("counts", [[3, 0, 7, 1, 0], [0, 0, 0, 0, 0]], ids=["rows", "no-rows"])
def test_grouped_kernel_takes_an_expanded_gradient(counts: list[int]) -> None:
    """``y.sum().backward()`` sends a stride-0 gradient, which torch's grouped GEMM backward rejects
    on its own (zero rows included): the kernel hands it dense strides."""
    experts = _experts()
    x = torch.randn(sum(counts), 32, generator=torch.Generator().manual_seed(3))
    grads = {}
    for kernel in ("loop", "grouped"):
        experts.kernel = kernel
        experts.zero_grad(set_to_none=True)
        experts(x, torch.tensor(counts)).sum().backward()
        grads[kernel] = [p.grad for p in experts.parameters()]
    for got, want in zip(grads["grouped"], grads["loop"], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_grouped_kernel_under_bf16_autocast_matches_the_loop() -> None:
    """fp32 weights and activations under autocast: the grouped path casts to bf16 as autocast does for mm."""
    experts = _experts(num_local=4, dim=64, ffn=96)
    gen = torch.Generator().manual_seed(2)
    counts_L = torch.tensor([20, 0, 5, 39])
    x = torch.randn(64, 64, generator=gen)
    grad = torch.randn(64, 64, generator=gen)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loop = _run(experts, "loop", x, counts_L, grad)
        grouped = _run(experts, "grouped", x, counts_L, grad)
    assert grouped["y"].dtype == loop["y"].dtype == torch.bfloat16
    assert grouped["w1.grad"].dtype == torch.float32  # gradients land on the fp32 parameters
    for name, want in loop.items():
        scale = float(want.abs().max())
        torch.testing.assert_close(grouped[name].float(), want.float(), rtol=2e-2, atol=2e-2 * scale,
                                   msg=lambda m, n=name: f"{n}: {m}")


def test_model_with_grouped_experts_equals_the_loop() -> None:
    model = random_model(TINY_MOE, varied_norms=True)
    ids = torch.randint(0, TINY_MOE.vocab_size, (2, 24), generator=torch.Generator().manual_seed(4))
    results = {}
    for kernel in ("loop", "grouped"):
        set_expert_kernel(model, kernel)
        model.zero_grad(set_to_none=True)
        with HostReads() as guard:
            out = model(ids, labels=ids)
            out.loss.backward()
        results[kernel] = (out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()})
        # The whole step, losses included, reads nothing to the host with the grouped kernel.
        assert len(guard.reads) == (0 if kernel == "grouped" else TINY_MOE.num_hidden_layers), guard.reads
    torch.testing.assert_close(results["grouped"][0], results["loop"][0], rtol=1e-6, atol=0)
    for name, want in results["loop"][1].items():
        atol = 1e-5 * float(want.abs().max())
        torch.testing.assert_close(results["grouped"][1][name], want, rtol=1e-4, atol=atol,
                                   msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize(("device", "dtype", "capability", "want"), [
    ("cuda", torch.bfloat16, (9, 0), "grouped"),  # H100 / H200
    ("cuda", torch.bfloat16, (10, 0), "loop"),  # B200: empty experts' gradients reported wrong (moe.auto_kernel)
    ("cuda", torch.bfloat16, (8, 0), "loop"),  # A100: torch's grouped GEMM is a loop there
    ("cuda", torch.float32, (9, 0), "loop"),
    ("cpu", torch.float32, None, "loop"),  # CPU: the loop measures as fast (bench_moe_layer.py)
    ("cpu", torch.bfloat16, None, "loop"),
])
def test_auto_picks_the_grouped_gemm_only_on_hopper_in_bf16(device, dtype, capability, want) -> None:
    assert auto_kernel(device, dtype, capability) == want


def test_kernel_selection_on_this_machine_and_its_errors() -> None:
    x32 = torch.zeros(3, 32)
    assert resolve_kernel("auto", x32, 48) == "loop"
    assert resolve_kernel("grouped", x32, 48) == "grouped"
    assert resolve_kernel("loop", x32.double(), 48) == "loop"
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert resolve_kernel("grouped", x32, 48) == "grouped"  # bf16 under autocast
    # What torch's grouped GEMM cannot take: float64, and rows not a multiple of 16 bytes.
    with pytest.raises(ValueError, match=r"float32, bfloat16 or float16, not torch\.float64"):
        resolve_kernel("grouped", x32.double(), 48)
    assert resolve_kernel("auto", x32.double(), 48) == "loop"
    with pytest.raises(ValueError, match="multiple of 16 bytes; hidden 6 and ffn 48"):
        resolve_kernel("grouped", torch.zeros(3, 6), 48)
    with pytest.raises(ValueError, match="must be one of loop, grouped, auto, got 'fast'"):
        GroupedExperts(2, 8, 8, kernel="fast")
    with pytest.raises(ValueError, match="got 'cutlass'"):
        set_expert_kernel(SparseMoeBlock(8, 8, 2, 1), "cutlass")
    block = SparseMoeBlock(8, 16, 4, 2, kernel="grouped")
    assert block.experts.kernel == "grouped"
    set_expert_kernel(block, "loop")
    assert block.experts.kernel == "loop"


@pytest.mark.parametrize(("kernel", "reads"), [("grouped", 0), ("loop", 1)])
def test_grouped_path_reads_nothing_back_to_the_host(kernel: str, reads: int) -> None:
    """Routing, dispatch, grouped experts, combine and backward: the counts stay tensors. The loop
    reads them once per layer (torch.split needs Python ints), which shows the guard works."""
    torch.manual_seed(0)
    block = SparseMoeBlock(64, 128, 8, 2, kernel=kernel)
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0.0, 0.1)
    x = torch.randn(2, 16, 64, requires_grad=True)
    with HostReads() as guard:
        y, _ = block(x)
        y.sum().backward()
    assert len(guard.reads) == reads, guard.reads


def test_gpu_check_script_parses_and_its_python_parts_import_on_cpu() -> None:
    """benchmarks/gpu_check.sh is run by hand on a lent GPU, never by tests: it parses, its helpers
    import, and their CPU reference half runs."""
    subprocess.run(["bash", "-n", str(ROOT / "benchmarks" / "gpu_check.sh")], check=True)
    for name in ("gpu_check", "gpu_mfu", "bench_moe_layer"):
        spec = importlib.util.spec_from_file_location(f"_bench_{name}", ROOT / "benchmarks" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
        assert callable(module.main)
    ref = sys.modules["_bench_gpu_check"].reference_losses()
    assert set(ref) >= {"loss", "lm_loss", "aux_loss"} and all(v == v for v in ref.values())


@pytest.mark.parametrize("kernel", ["loop", "grouped"])
def test_model_trains_under_bf16_autocast(kernel: str) -> None:
    """Mixed precision as on a GPU (bf16 autocast, fp32 residual stream): the experts return bf16, the
    routing weights are fp32, and the combine sums in fp32; the loss stays near the fp32 one."""
    model = random_model(TINY_MOE, varied_norms=True)
    set_expert_kernel(model, kernel)
    ids = torch.randint(0, TINY_MOE.vocab_size, (2, 24), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        fp32_loss = model(ids, labels=ids).loss
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(ids, labels=ids)
    out.loss.backward()
    assert abs(float(out.loss.detach()) - float(fp32_loss)) < 1e-2 * float(fp32_loss)
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.parameters())


def test_block_transpose_regroups_source_major_rows_expert_major_on_the_device() -> None:
    """The all-to-all receives rows as (source rank, local expert) blocks; the experts need (expert, source)."""
    gen = torch.Generator().manual_seed(6)
    for ranks, local in ((1, 4), (2, 2), (3, 4)):
        counts_PL = torch.randint(0, 4, (ranks, local), generator=gen)
        counts_PL[0, 0] = 0  # empty blocks, first one included
        blocks, start = {}, 0
        for p in range(ranks):
            for e in range(local):
                blocks[p, e] = list(range(start, start + int(counts_PL[p, e])))
                start += int(counts_PL[p, e])
        want = [row for e in range(local) for p in range(ranks) for row in blocks[p, e]]
        assert _block_transpose(counts_PL, start).tolist() == want
