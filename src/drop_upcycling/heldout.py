"""Held-out evaluation during training: what a run's curve is judged on.

Training loss mixes the data order into the comparison and, once the corpus repeats, measures
memorization. Every run that sets ``heldout_every_tokens`` instead evaluates, at step 0, at each
multiple of that many tokens and at the end, the same fixed sequences: the first
``heldout_sequences`` windows of ``seq_len`` tokens of each domain's **test** split, in file order.
Runs of different methods, seeds and parallel layouts therefore see exactly the same held-out
tokens, and their curves can be subtracted point by point (the DU - NU gap of the CPU study).

One row per evaluation goes to ``OUT/heldout.jsonl``:

- ``loss``: the mean next-token cross-entropy per domain, and ``mean`` over domains (unweighted,
  so a large domain does not hide a small one);
- ``routing`` (MoE): top-k assignment counts per domain, ``[layer][expert]``, on those sequences;
  :mod:`drop_upcycling.routing` turns them into routing specialization over training;
- ``expert_cosine`` (MoE): per layer, the mean pairwise cosine similarity of the experts' weights
  (``w1``, ``w2``, ``w3`` of an expert as one vector): 1.0 for naive upcycling's copies at step 0,
  which shows how fast copies diverge compared with partially re-initialized experts.

The sequences are split over all ranks (rank ``r`` takes rows ``r::world``, the same number on every
rank, which expert parallelism's all-to-all needs) and the sums are all-reduced, so the numbers do not
depend on the layout.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .configs import ModelConfig
from .errors import UserError

HELDOUT_SPLIT = "test"


@dataclass
class HeldoutSet:
    """This rank's share of the held-out sequences, per domain ([n, seq_len] token ids)."""

    batches: dict[str, torch.Tensor]
    sequences_per_domain: int


def windows(files: list[Path], seq_len: int, count: int) -> torch.Tensor:
    """The first ``count`` consecutive ``seq_len``-token windows of ``files`` read as one stream."""
    from .data import iter_windows

    rows = list(iter_windows(files, seq_len, count))
    return torch.stack(rows) if rows else torch.empty(0, seq_len, dtype=torch.int64)


def load_heldout(files_by_domain: dict[str, list[Path]], seq_len: int, per_domain: int, rank: int,
                 world_size: int) -> HeldoutSet:
    """The held-out set of this rank: ``per_domain`` windows per domain (fewer when a domain's test split
    is shorter, always the same number on every rank), rank ``rank`` taking rows ``rank::world_size``."""
    full = {d: windows(files, seq_len, per_domain) for d, files in files_by_domain.items()}
    n = min(len(t) for t in full.values()) // world_size * world_size
    if n < world_size:
        short = min(full, key=lambda d: len(full[d]))
        raise UserError(f"held-out evaluation: the {HELDOUT_SPLIT} split of domain {short!r} has "
                        f"{len(full[short])} windows of {seq_len} tokens, fewer than the {world_size} ranks")
    return HeldoutSet({d: t[:n][rank::world_size] for d, t in full.items()}, n)


@torch.no_grad()
def evaluate_heldout(model: torch.nn.Module, cfg: ModelConfig, heldout: HeldoutSet, micro_batch: int,
                     group: dist.ProcessGroup | None, expert_group: dist.ProcessGroup | None,
                     autocast=None) -> dict:
    """Loss per domain, routing counts per domain and expert similarity per layer (see the module doc)."""
    import contextlib

    from .model import next_token_ce_sum

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    row: dict = {"loss": {}, "sequences_per_domain": heldout.sequences_per_domain}
    routing: dict[str, list[list[int]]] = {}
    for domain, ids in heldout.batches.items():
        sums = torch.zeros(2, dtype=torch.float64, device=device)  # CE sum, predicted tokens
        counts = torch.zeros(cfg.num_hidden_layers if cfg.is_moe else 0, max(cfg.num_experts, 1),
                             dtype=torch.float64, device=device)
        for chunk in ids.split(micro_batch):
            chunk = chunk.to(device)
            with autocast or contextlib.nullcontext():
                out = model(chunk, return_expert_ids=cfg.is_moe)
            sums[0] += next_token_ce_sum(out.logits, chunk).double()
            sums[1] += chunk.shape[0] * (chunk.shape[1] - 1)
            for layer, ids_TK in enumerate(out.expert_ids):
                counts[layer] += torch.bincount(ids_TK.reshape(-1), minlength=cfg.num_experts).double()
        if group is not None and dist.get_world_size(group) > 1:
            dist.all_reduce(sums, group=group)
            if counts.numel():
                dist.all_reduce(counts, group=group)
        row["loss"][domain] = float(sums[0] / sums[1])
        if cfg.is_moe:
            routing[domain] = [[int(c) for c in layer] for layer in counts.tolist()]
    row["mean"] = sum(row["loss"].values()) / len(row["loss"])
    if cfg.is_moe:
        row["routing"] = routing
        row["expert_cosine"] = expert_cosine(model, expert_group)
    if was_training:
        model.train()
    return row


def expert_cosine(model: torch.nn.Module, expert_group: dist.ProcessGroup | None) -> list[float]:
    """Per MoE layer, the mean over expert pairs of the cosine similarity of their flattened weights.

    Under expert parallelism each rank holds a slice of the experts; the slices are gathered over
    ``expert_group`` first (equal sizes on every rank)."""
    from .moe import GroupedExperts

    out = []
    for module in model.modules():
        if not isinstance(module, GroupedExperts):
            continue
        flat_EP = torch.cat([w.detach().float().reshape(w.shape[0], -1) for w in (module.w1, module.w2, module.w3)],
                            dim=1)
        if expert_group is not None and dist.get_world_size(expert_group) > 1:
            parts = [torch.empty_like(flat_EP) for _ in range(dist.get_world_size(expert_group))]
            dist.all_gather(parts, flat_EP.contiguous(), group=expert_group)
            flat_EP = torch.cat(parts)
        unit_EP = F.normalize(flat_EP.double(), dim=1)
        sim_EE = unit_EP @ unit_EP.T
        e = sim_EE.shape[0]
        out.append(float((sim_EE.sum() - sim_EE.diagonal().sum()) / (e * (e - 1))) if e > 1 else 1.0)
    return out


def due(tokens_before: int, tokens_after: int, every: int) -> bool:
    """Whether a step that took the run from ``tokens_before`` to ``tokens_after`` crossed a multiple of ``every``."""
    return every > 0 and tokens_after // every > tokens_before // every
