"""Process topology for training: nanotron's ``ParallelContext``, on GPU (NCCL) or CPU (gloo).

This is the one place that decides CPU-gloo vs GPU-NCCL. The topology is nanotron 0.4's: ranks are
laid out as ``(ep, pp, dp, tp)`` and its ``expert_pg`` groups the ranks that exchange tokens. We use
``tp = pp = 1``, so every rank consumes its own slice of the data (``dp_size * ep_size`` data ranks;
the loss each rank back-propagates is :func:`drop_upcycling.model.causal_lm_loss` over ``world_pg``) and:

- non-expert gradients are averaged over all ranks (``world_pg``);
- expert gradients are summed over the ranks holding the same experts (nanotron's ``dp_pg``, the
  ranks with the same expert-parallel index) and divided by the number of data ranks, because the
  all-to-all backward already summed the contributions of the ``ep_size`` ranks that sent tokens.

Those two groups are also what :mod:`drop_upcycling.sharding` (``zero_stage`` >= 1) shards the optimizer
state over: it replaces :func:`reduce_gradients` and :func:`clip_gradients` by a reduce-scatter per group and
a norm over the shards, with the same scale and the same clipping (:func:`clip_coefficient`).

nanotron 0.4 hard-codes CUDA in ``ParallelContext.set_device`` and refuses to create the default
group without a GPU, so on CPU we create the gloo default group ourselves first and override only
``set_device``; everything else (group construction, rank layout) is nanotron's code unchanged.
"""

from __future__ import annotations

import datetime
import os
import socket
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from .errors import UserError

if TYPE_CHECKING:
    from .configs import TrainConfig


def free_port() -> int:
    """A TCP port that is free right now on 127.0.0.1 (for single-node launches and tests)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def resolve_device(device: str | None = None) -> str:
    """The device to run on (default: ``cuda`` when a GPU is visible, else ``cpu``), checked before
    anything is loaded: a CPU-only build or a missing GPU index is one line, not a traceback deep
    in a model load, and an unknown name is not silently replaced by the CPU."""
    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise UserError(f"unknown device {device!r}: expected cpu, cuda or cuda:N") from None
    if dev.type == "cpu":
        return device
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = "this PyTorch build has no CUDA support" if torch.version.cuda is None else "no GPU is visible"
            raise UserError(f"device {device!r} requested but {why}: use --device cpu")
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise UserError(f"device {device!r} requested but only {count} GPU(s) are visible (cuda:0..{count - 1})")
        return device
    raise UserError(f"device {device!r} is not supported: expected cpu, cuda or cuda:N")


def validate_layout(world_size: int, ep_size: int, num_experts: int) -> int:
    """Check ``world_size = dp_size * ep_size`` and ``E % ep_size == 0``; return dp_size. Violations are
    one-line UserErrors."""
    if ep_size < 1:
        raise UserError(f"expert-parallel size must be >= 1, got {ep_size}")
    if world_size % ep_size:
        raise UserError(f"world size {world_size} is not divisible by the expert-parallel size {ep_size}")
    if ep_size > 1 and num_experts == 0:
        raise UserError(f"expert parallelism (ep={ep_size}) needs an MoE model; this model is dense")
    if num_experts and num_experts % ep_size:
        raise UserError(f"the number of experts ({num_experts}) is not divisible by the expert-parallel size "
                        f"{ep_size}")
    return world_size // ep_size


def accumulation_steps(run: TrainConfig, world_size: int) -> int:
    """Micro-batches per rank and optimizer step: the global batch split over ``world_size`` data ranks
    of ``micro_batch_size`` sequences each; a batch that does not split evenly is a one-line UserError."""
    seqs = run.global_batch_tokens // run.seq_len
    per_step = world_size * run.micro_batch_size
    if seqs % per_step:
        raise UserError(f"global batch of {seqs} sequences is not divisible by {world_size} ranks x micro batch "
                        f"{run.micro_batch_size}")
    return seqs // per_step


def _parallel_context_class():
    from nanotron.parallel.context import ParallelContext

    class CPUParallelContext(ParallelContext):
        """nanotron's context with the CUDA-only ``set_device`` replaced by a no-op (CPU ranks)."""

        def set_device(self) -> None:
            return None

    return ParallelContext, CPUParallelContext


@dataclass
class ParallelEnv:
    """What the trainer needs from the topology: ranks, sizes, groups and the device."""

    rank: int
    world_size: int
    dp_rank: int
    dp_size: int
    ep_rank: int
    ep_size: int
    device: torch.device
    world_pg: dist.ProcessGroup
    expert_pg: dist.ProcessGroup  # ranks exchanging tokens (hold different experts)
    expert_dp_pg: dist.ProcessGroup  # ranks holding the same experts (nanotron's dp_pg)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def data_rank(self) -> int:
        """Index of this rank's data slice among the ``world_size`` data-consuming ranks."""
        return self.rank

    def barrier(self) -> None:
        dist.barrier(group=self.world_pg)

    def broadcast_str(self, value: str | None) -> str:
        """Rank 0's ``value`` on every rank (what the others pass is ignored)."""
        obj = [value]
        if self.world_size > 1:
            dist.broadcast_object_list(obj, src=0, group=self.world_pg)
        return obj[0]

    def destroy(self) -> None:
        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()


def init_parallel(ep_size: int = 1, num_experts: int = 0, device: str | None = None) -> ParallelEnv:
    """Create the process groups for ``dp_size x ep_size`` (``dp_size = world / ep_size``) and return the
    environment.

    Reads torchrun's ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/``MASTER_*``; a plain ``python`` run is a
    world of one on a free local port. ``device``: ``cuda`` (NCCL) when available, else ``cpu`` (gloo).
    """
    if "WORLD_SIZE" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(free_port()))
    world_size = int(os.environ["WORLD_SIZE"])
    rank = int(os.environ["RANK"])
    dp_size = validate_layout(world_size, ep_size, num_experts)
    use_cuda = (device or ("cuda" if torch.cuda.is_available() else "cpu")) == "cuda"
    if use_cuda and not torch.cuda.is_available():
        raise UserError("device 'cuda' requested but no GPU is visible")
    base_cls, cpu_cls = _parallel_context_class()
    if use_cuda:
        ctx = base_cls(tensor_parallel_size=1, pipeline_parallel_size=1, data_parallel_size=dp_size,
                       expert_parallel_size=ep_size)
        dev = torch.device("cuda", torch.cuda.current_device())
    else:
        if not dist.is_initialized():
            dist.init_process_group("gloo", rank=rank, world_size=world_size,
                                    timeout=datetime.timedelta(minutes=10))
        # backend="nccl" only satisfies nanotron's assertion; the default group is already gloo and
        # nanotron creates every sub-group with dist.get_backend().
        ctx = cpu_cls(tensor_parallel_size=1, pipeline_parallel_size=1, data_parallel_size=dp_size,
                      expert_parallel_size=ep_size)
        dev = torch.device("cpu")
    return ParallelEnv(
        rank=rank,
        world_size=world_size,
        dp_rank=dist.get_rank(ctx.dp_pg),
        dp_size=dp_size,
        ep_rank=dist.get_rank(ctx.expert_pg),
        ep_size=ep_size,
        device=dev,
        world_pg=ctx.world_pg,
        expert_pg=ctx.expert_pg,
        expert_dp_pg=ctx.dp_pg,
    )


# ---------------------------------------------------------------------------- gradient reduction
def is_expert_param(name: str) -> bool:
    return ".experts." in name


def _all_reduce_flat(tensors: list[torch.Tensor], group: dist.ProcessGroup, scale: float) -> None:
    """Sum ``tensors`` over ``group`` in one flat buffer, then multiply by ``scale`` (in place).

    A group of one rank (the expert gradients under EP = world size) has nothing to exchange: the
    tensors are scaled where they are, element by element, so the result is bitwise the flat path's
    without copying every gradient into a buffer and back.
    """
    if not tensors:
        return
    if dist.get_world_size(group) == 1:
        if scale != 1.0:
            for t in tensors:
                t.mul_(scale)
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat, group=group)
    flat.mul_(scale)
    offset = 0
    for t in tensors:
        n = t.numel()
        t.copy_(flat[offset:offset + n].view_as(t))
        offset += n


def reduce_gradients(model: torch.nn.Module, env: ParallelEnv) -> None:
    """Turn per-rank gradients of the per-rank losses into gradients of their mean over data ranks."""
    dense, expert = [], []
    for name, p in model.named_parameters():
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        (expert if is_expert_param(name) else dense).append(p.grad)
    scale = 1.0 / env.world_size
    _all_reduce_flat(dense, env.world_pg, scale)
    _all_reduce_flat(expert, env.expert_dp_pg, scale)


def clip_gradients(model: torch.nn.Module, env: ParallelEnv, max_norm: float) -> float:
    """Clip by the global norm over both groups; returns the norm before clipping.

    Non-expert gradients are identical on every rank after :func:`reduce_gradients`, so they count
    once; expert gradients are sharded over ``expert_pg``, so their squared norms are summed there.
    """
    dense_sq = torch.zeros((), dtype=torch.float64, device=env.device)
    expert_sq = torch.zeros((), dtype=torch.float64, device=env.device)
    named = list(model.named_parameters())
    # One fp64 scratch for every tensor's squares: a fresh fp64 copy and a fresh square per tensor
    # (``g.double().pow(2)``) cost more in allocation and page faults than in arithmetic. The same
    # values are summed the same way (a contiguous sum), so the norm is bitwise the per-tensor one.
    scratch = torch.empty(max(p.numel() for _, p in named), dtype=torch.float64, device=env.device)
    for name, p in named:
        sq = scratch[:p.numel()]
        sq.copy_(p.grad.detach().reshape(-1))
        sq.mul_(sq)
        if is_expert_param(name):
            expert_sq += sq.sum()
        else:
            dense_sq += sq.sum()
    if env.ep_size > 1:
        dist.all_reduce(expert_sq, group=env.expert_pg)
    total = float((dense_sq + expert_sq).sqrt())
    coef = clip_coefficient(total, max_norm)
    if coef is not None:
        for p in model.parameters():
            p.grad.mul_(coef)
    return total


def clip_coefficient(total: float, max_norm: float) -> float | None:
    """What clipping multiplies the gradients by, or None when their global norm ``total`` is within
    ``max_norm`` (0: measure only); shared by the unsharded and the sharded step."""
    if max_norm <= 0:
        return None
    coef = max_norm / (total + 1e-6)
    return coef if coef < 1.0 else None


def all_reduce_mean(values: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """Mean of ``values`` over ``group`` (gloo has no AVG op: sum, then divide)."""
    out = values.clone()
    n = dist.get_world_size(group)
    if n > 1:
        dist.all_reduce(out, group=group)
    return out / n


# ---------------------------------------------------------------------------- local multi-process runs
def _local_worker(rank: int, world_size: int, port: int, fn, args: tuple) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    try:
        fn(*args)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def spawn_local(fn, world_size: int, *args) -> None:
    """Run ``fn(*args)`` in ``world_size`` fresh processes on this machine with torchrun's environment
    variables set (a free port on 127.0.0.1); an exception in any process is raised here."""
    import torch.multiprocessing as mp

    mp.spawn(_local_worker, args=(world_size, free_port(), fn, args), nprocs=world_size, join=True)
