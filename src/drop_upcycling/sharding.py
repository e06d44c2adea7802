"""ZeRO stages 1 and 2 on plain torch.distributed: what data parallelism replicates, sharded over the
ranks that replicate it (``zero_stage`` of the training config).

Every rank holding a parameter also holds, unsharded, its AdamW moments (8 bytes), its fp32 master
under ``param_dtype: bf16`` (4 bytes) and its summed gradient (4 bytes): identical copies on every
rank that replicates the parameter. ZeRO (Rajbhandari et al. 2020) keeps one shard of them per rank:
stage 1 the moments and the fp32 weights, stage 2 also the summed gradient. The ranks that replicate
a parameter are the groups :func:`~drop_upcycling.parallel.reduce_gradients` averages over: all ranks
(``world_pg``) for the non-expert parameters, the ranks holding the same experts (``expert_dp_pg``,
same ``ep_rank``) for the experts. A :class:`FlatGroup` is one of them.

A :class:`FlatGroup` lays its parameters end to end: the model's weights and gradients become views of
two flat buffers (DDP's ``gradient_as_bucket_view``, Megatron's gradient buffer: autograd adds into an
existing ``.grad`` in place), padded to ``size * L`` elements, and rank ``i`` of the group owns
elements ``[i * L, (i + 1) * L)``: its fp32 weights (``master``), its reduced gradient (``grad_shard``)
and, in AdamW's state, the moments. A step (:class:`ZeroSharding`):

1. after each micro-batch's backward: stage 1 sums the micro-batches in the flat gradient buffer itself
   (fp32 weights) or, under bf16 weights, adds their bf16 gradients to an fp32 buffer (what
   ``MasterWeights`` does); stage 2 reduce-scatters the micro-batch at once, in fp32 chunks, into
   ``grad_shard`` and keeps no full-size fp32 gradient;
2. stage 1: one reduce-scatter per group, then ``1 / world_size`` (the scale of ``reduce_gradients``);
3. the global norm: every element lives in exactly one rank's shard, so the fp64 squares of all shards
   summed over all ranks are the unsharded norm's; clipping scales the shards;
4. torch's AdamW on the shards, one tensor per piece of a parameter (weight decay by the parameter's
   shape, as unsharded): the same elementwise arithmetic as the unsharded run;
5. one all-gather per group of the updated shards into the flat weights (rounded to bf16 first under
   bf16 weights: rounding commutes with gathering), so every rank computes with the new weights.

Why our own ~200 lines rather than PyTorch's two ready-made tools:

- FSDP2 (``fully_shard``) is ZeRO-3: it shards the weights too and all-gathers each layer in every
  forward and backward, turns parameters into DTensors (our checkpoint writer, the two-group clipping
  and the bf16 master scheme would be rewritten around them), and needs a second device mesh for the
  experts, nested in the world's, whose reduce-scatters run inside the backward between our all-to-alls.
- ``ZeroRedundancyOptimizer`` wraps an optimizer over the existing parameters: the full fp32 master of
  bf16 weights (4 bytes per parameter) would stay on every rank; it assigns whole tensors to ranks (a
  300M-parameter embedding makes the shards unequal), takes one group (two instances, world and
  expert), and consolidates its state on one rank to checkpoint it.

Here the weights stay plain tensors, the shards are equal, a step adds one reduce-scatter (stage 1; one
per micro-batch at stage 2) and one all-gather per group, and the result equals the unsharded run to
fp32 rounding (on two ranks bitwise in practice: a sum of two is the same in any order).
Checkpoints: each rank writes its shards (:mod:`drop_upcycling.checkpoint`, ``trainer/zero-*``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from .configs import ZERO_STAGES
from .parallel import ParallelEnv, clip_coefficient, is_expert_param

# torch 2.13 renamed the flat collectives; the old names remain (deprecated) back to torch 2.4.
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
CHUNK_ELEMENTS = 1 << 24  # stage 2: fp32 elements (64 MiB) of a micro-batch's gradient reduced at a time
STATE_KEYS = ("master", "exp_avg", "exp_avg_sq")  # what a rank's checkpoint file holds per group


@dataclass
class Segment:
    """The piece of one parameter that lies in this rank's shard."""

    name: str
    ndim: int  # the parameter's (weight decay is chosen by it)
    offset: int  # where the piece starts in the shard
    tensor: torch.Tensor  # the piece of ``master`` (a view) that AdamW updates; its .grad views grad_shard


class FlatGroup:
    """The parameters one process group replicates, as flat weights and gradients split into equal shards."""

    def __init__(self, label: str, named: Sequence[tuple[str, nn.Parameter]], source: dict[str, torch.Tensor],
                 group: dist.ProcessGroup, stage: int) -> None:
        """Move ``named`` (the model's parameters) into the flat buffers, their values from ``source``
        (fp32, the same names; the fp32 master of a bf16 model), and take this rank's shard of it."""
        self.label, self.group, self.stage = label, group, stage
        self.size, self.index = dist.get_world_size(group), dist.get_rank(group)
        self.numel = sum(p.numel() for _, p in named)
        self.shard_len = -(-self.numel // self.size)
        dtype, device = named[0][1].dtype, named[0][1].device
        padded = self.shard_len * self.size
        self.weights = torch.zeros(padded, dtype=dtype, device=device)
        self.grads = torch.zeros(padded, dtype=dtype, device=device)
        # Stage 1 under bf16 weights: the fp32 sum of the micro-batches (fp32 weights sum in self.grads).
        self.accum = torch.zeros(padded, device=device) if stage == 1 and dtype != torch.float32 else None
        self.master = torch.zeros(self.shard_len, device=device)
        self.grad_shard = torch.zeros(self.shard_len, device=device)
        self.segments = self._lay_out(named, source)

    def _lay_out(self, named: Sequence[tuple[str, nn.Parameter]], source: dict[str, torch.Tensor]) -> list[Segment]:
        lo, hi = self.index * self.shard_len, (self.index + 1) * self.shard_len
        segments, start = [], 0
        with torch.no_grad():
            for name, p in named:
                n = p.numel()
                values = source[name].detach().reshape(-1)
                self.weights[start:start + n].copy_(values)
                a, b = max(lo, start), min(hi, start + n)
                if a < b:
                    piece = self.master[a - lo:b - lo]
                    piece.copy_(values[a - start:b - start])
                    piece.grad = self.grad_shard[a - lo:b - lo]
                    segments.append(Segment(name, p.ndim, a - lo, piece))
                p.data = self.weights[start:start + n].view_as(p)
                p.grad = self.grads[start:start + n].view_as(p)
                start += n
        return segments

    # ------------------------------------------------------------------ the step
    def after_backward(self) -> None:
        """Fold one micro-batch's gradients into what the step reduces (see the module docstring, 1)."""
        if self.stage == 2:
            self._reduce_scatter_chunks()
            self.grads.zero_()
        elif self.accum is not None:
            self.accum.add_(self.grads)
            self.grads.zero_()

    def _reduce_scatter_chunks(self) -> None:
        """grad_shard += this rank's shard of the group's sum of ``grads``, converted to fp32 a chunk at a
        time: chunk k is piece k of every rank's shard, so the full fp32 gradient never exists."""
        if self.size == 1:
            self.grad_shard.add_(self.grads)
            return
        rows = self.grads.view(self.size, self.shard_len)
        step = max(1, CHUNK_ELEMENTS // self.size)
        buf = torch.empty(self.size * min(step, self.shard_len), device=self.grads.device)
        out = torch.empty(min(step, self.shard_len), device=self.grads.device)
        for k in range(0, self.shard_len, step):
            width = min(step, self.shard_len - k)
            chunk = buf[:self.size * width].view(self.size, width)
            chunk.copy_(rows[:, k:k + width])
            _reduce_scatter(out[:width], chunk.view(-1), group=self.group)
            self.grad_shard[k:k + width].add_(out[:width])

    def reduce(self, scale: float) -> None:
        """grad_shard := this rank's shard of the gradient averaged like ``reduce_gradients``."""
        if self.stage == 1:
            summed = self.accum if self.accum is not None else self.grads
            if self.size == 1:
                self.grad_shard.copy_(summed)
            else:
                _reduce_scatter(self.grad_shard, summed, group=self.group)
            summed.zero_()
        self.grad_shard.mul_(scale)

    def squared_norm(self) -> torch.Tensor:
        """fp64 sum of squares of this rank's gradient shard (in chunks: no fp64 copy of the shard)."""
        total = torch.zeros((), dtype=torch.float64, device=self.grad_shard.device)
        scratch = torch.empty(min(CHUNK_ELEMENTS, self.shard_len), dtype=torch.float64, device=total.device)
        for k in range(0, self.shard_len, CHUNK_ELEMENTS):
            sq = scratch[:min(CHUNK_ELEMENTS, self.shard_len - k)]
            sq.copy_(self.grad_shard[k:k + sq.numel()])
            sq.mul_(sq)
            total += sq.sum()
        return total

    def publish(self) -> None:
        """Every rank's weights := the group's updated shards; the gradient shard is cleared for the next step."""
        shard = self.master if self.weights.dtype == torch.float32 else self.master.to(self.weights.dtype)
        if self.size == 1:
            self.weights.copy_(shard)
        else:
            _all_gather(self.weights, shard, group=self.group)
        self.grad_shard.zero_()

    def gathered_master(self) -> torch.Tensor:
        """The group's fp32 weights, all of them (a collective; for checkpoints of bf16 models)."""
        if self.size == 1:
            return self.master
        full = torch.empty(self.shard_len * self.size, device=self.master.device)
        _all_gather(full, self.master, group=self.group)
        return full

    # ------------------------------------------------------------------ checkpoints
    def state(self, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
        """This rank's shard: fp32 weights and AdamW moments, each ``[L]`` (zeros in the padding)."""
        out = {"master": self.master}
        for key in STATE_KEYS[1:]:
            flat = torch.zeros_like(self.master)
            for seg in self.segments:
                flat[seg.offset:seg.offset + seg.tensor.numel()].copy_(optimizer.state[seg.tensor][key])
            out[key] = flat
        return {f"{self.label}.{k}": v for k, v in out.items()}

    def load_state(self, tensors: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer, step: int,
                   fused: bool) -> None:
        """Restore :meth:`state` (AdamW's step count: ``step``, a float tensor as torch keeps it)."""
        with torch.no_grad():
            self.master.copy_(tensors[f"{self.label}.master"])
        for seg in self.segments:
            n = seg.tensor.numel()
            st: dict[str, torch.Tensor] = {
                "step": torch.tensor(float(step), device=seg.tensor.device if fused else "cpu")}
            for key in STATE_KEYS[1:]:
                st[key] = tensors[f"{self.label}.{key}"][seg.offset:seg.offset + n].to(seg.tensor.device).clone()
            optimizer.state[seg.tensor] = st


class ZeroSharding:
    """The model's parameters in two :class:`FlatGroup` s (non-expert over all ranks, experts over the
    ranks holding them) and the step of the module docstring; AdamW is built by the trainer over
    :meth:`param_groups`."""

    def __init__(self, model: nn.Module, source: nn.Module, env: ParallelEnv, stage: int) -> None:
        """``model``: the module that runs (its parameters become views of the flat buffers); ``source``:
        the fp32 weights to start from (``model`` itself under fp32 weights)."""
        if stage not in ZERO_STAGES[1:]:
            raise ValueError(f"ZeRO stage must be 1 or 2, got {stage}")
        self.env, self.stage = env, stage
        values = {n: p.detach() for n, p in source.named_parameters()}
        named = list(model.named_parameters())
        dense = [(n, p) for n, p in named if not is_expert_param(n)]
        experts = [(n, p) for n, p in named if is_expert_param(n)]
        self.groups = [FlatGroup("dense", dense, values, env.world_pg, stage)]
        if experts:
            self.groups.append(FlatGroup("experts", experts, values, env.expert_dp_pg, stage))

    def param_groups(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(pieces of matrices, pieces of 1-D parameters): what AdamW updates, split for weight decay."""
        segments = [s for g in self.groups for s in g.segments]
        return [s.tensor for s in segments if s.ndim >= 2], [s.tensor for s in segments if s.ndim < 2]

    def after_backward(self) -> None:
        for g in self.groups:
            g.after_backward()

    def reduce_and_clip(self, max_norm: float) -> float:
        """Reduce the gradients into the shards and clip them by the global norm; returns the norm before."""
        for g in self.groups:
            g.reduce(1.0 / self.env.world_size)
        sq = sum((g.squared_norm() for g in self.groups), torch.zeros((), dtype=torch.float64,
                                                                        device=self.env.device))
        if self.env.world_size > 1:
            dist.all_reduce(sq, group=self.env.world_pg)
        total = float(sq.sqrt())
        coef = clip_coefficient(total, max_norm)
        if coef is not None:
            for g in self.groups:
                g.grad_shard.mul_(coef)
        return total

    def publish(self) -> None:
        """After the optimizer step: the updated shards into every rank's weights."""
        for g in self.groups:
            g.publish()

    def full_weights(self, model: nn.Module, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """The weights a checkpoint saves in ``dtype``, by parameter name: the model's own, except fp32
        of a bf16 model, gathered from the shards (a collective: every rank calls it)."""
        named = dict(model.named_parameters())
        if dtype != torch.float32 or all(p.dtype == torch.float32 for p in named.values()):
            return {n: p.detach() for n, p in named.items()}
        out: dict[str, torch.Tensor] = {}
        for g in self.groups:
            full = g.gathered_master()
            start = 0
            for name, p in named.items():
                if is_expert_param(name) == (g.label == "experts"):
                    out[name] = full[start:start + p.numel()].view_as(p)
                    start += p.numel()
        return out

    def layout(self) -> dict[str, list[int]]:
        """Per group, [ranks sharing it, elements]: what a checkpoint's shards were cut from."""
        return {g.label: [g.size, g.numel] for g in self.groups}

    def state(self, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
        return {k: v.detach().contiguous().cpu() for g in self.groups for k, v in g.state(optimizer).items()}

    def load_state(self, tensors: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer, step: int,
                   fused: bool) -> None:
        """Restore this rank's shards and publish the weights they hold."""
        for g in self.groups:
            g.load_state(tensors, optimizer, step, fused)
        self.publish()

