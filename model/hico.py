"""HiCo clip-level compression: ToMe inside the ``tome16_mlp_hd64`` projector (spec §2, §3).

The merge math is a set of small pure functions over batched tensors ``[B, T, C]`` (every clip in a
batch has the same token count, so one call merges all of them, each clip on its own):

- ``merge_schedule``: how many tokens each step removes to reach the target.
- ``head_chunk_metric``: the matching metric, the mean of the ``num_heads`` channel chunks.
- ``bipartite_soft_matching``: even slots (A) matched to odd slots (B) by cosine similarity.
- ``merge_weighted``: size-weighted average of the merged tokens into their partners.
- ``tome_merge``: the whole schedule, metric recomputed from the current features at each step.

``HiCoProjector`` is the glue: ToMe, then Linear, exact GELU, Linear.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


def merge_schedule(n_tokens: int, target: int) -> tuple[int, ...]:
    """Tokens removed per step to go from ``n_tokens`` to ``target`` (official schedule).

    While more than ``target`` remain: remove ``t - target`` if that is at most ``t // 2`` (and
    stop), else remove ``t // 2``. 3136 -> 64 gives (1568, 784, 392, 196, 98, 34).
    """
    if n_tokens <= target:
        raise ValueError(f"ToMe needs more than {target} tokens, got {n_tokens}")
    steps: list[int] = []
    t = n_tokens
    while t != target:
        r = t - target if t - target <= t // 2 else t // 2
        steps.append(r)
        t -= r
    return tuple(steps)


def head_chunk_metric(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Mean of the ``num_heads`` contiguous channel chunks: [B, T, C] -> [B, T, C/num_heads].

    Computed in float32: argsort ties under bf16 could reorder tokens (spec §10.4).
    """
    b, t, c = x.shape
    return x.float().reshape(b, t, num_heads, c // num_heads).mean(dim=2)


@dataclass(frozen=True)
class MergePlan:
    """Which A tokens (even slots) merge into which B tokens (odd slots), per batch row.

    unmerged [B, tA - r] A indices kept, by descending best score; merged [B, r] A indices merged;
    partners [B, r] the B index each merged A token joins.
    """

    unmerged: torch.Tensor
    merged: torch.Tensor
    partners: torch.Tensor


def bipartite_soft_matching(metric: torch.Tensor, r: int) -> MergePlan:
    """ToMe's bipartite matching without protected tokens. metric [B, T, c]; r <= T // 2."""
    r = min(r, metric.shape[1] // 2)
    metric = metric / metric.norm(dim=-1, keepdim=True)
    a, b = metric[:, ::2, :], metric[:, 1::2, :]  # [B, tA, c], [B, tB, c]
    scores = a @ b.transpose(1, 2)  # [B, tA, tB] cosine similarity
    best_score, best_partner = scores.max(dim=-1)  # [B, tA]
    order = best_score.argsort(dim=-1, descending=True)  # [B, tA]
    merged = order[:, :r]
    return MergePlan(
        unmerged=order[:, r:],
        merged=merged,
        partners=best_partner.gather(dim=1, index=merged),
    )


def _apply_plan(x: torch.Tensor, plan: MergePlan) -> torch.Tensor:
    """Sum-merge [B, T, C] -> [B, T - r, C]: [unmerged A in plan order] + [all B in slot order]."""
    a, b = x[:, ::2, :], x[:, 1::2, :]
    c = x.shape[-1]
    unmerged = a.gather(1, plan.unmerged[..., None].expand(-1, -1, c))
    sources = a.gather(1, plan.merged[..., None].expand(-1, -1, c))
    b = b.scatter_add(1, plan.partners[..., None].expand(-1, -1, c), sources)
    return torch.cat((unmerged, b), dim=1)


def merge_weighted(
    x: torch.Tensor, size: torch.Tensor, plan: MergePlan
) -> tuple[torch.Tensor, torch.Tensor]:
    """Size-weighted average merge. x [B, T, C], size [B, T, 1] -> ([B, T-r, C], [B, T-r, 1])."""
    merged_x = _apply_plan(x * size, plan)
    merged_size = _apply_plan(size, plan)
    return merged_x / merged_size, merged_size


def tome_merge(x: torch.Tensor, target: int, num_heads: int) -> torch.Tensor:
    """Merge each row of x [B, T, C] down to [B, target, C] with the official schedule.

    Runs in float32 whatever the input dtype (a size-weighted sum of up to ~50 tokens loses
    digits in bf16; the merge is ~0.1% of the encoder's time) and returns x's dtype.
    """
    merged = x.float()
    size = torch.ones_like(merged[..., :1])  # [B, T, 1]: every token starts as one patch
    for r in merge_schedule(x.shape[1], target):
        plan = bipartite_soft_matching(head_chunk_metric(merged, num_heads), r)
        merged, size = merge_weighted(merged, size, plan)
    return merged.to(x.dtype)


class HiCoProjector(nn.Module):
    """``tome16_mlp_hd64``: ToMe to ``target`` tokens, then Linear(D->H), GELU, Linear(H->H).

    ``num_heads`` is the vision encoder's head count (16 for UMT-L: 64-channel chunks, "hd64").
    """

    def __init__(self, vision_width: int, hidden_size: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.mlp = nn.Sequential(
            nn.Linear(vision_width, hidden_size), nn.GELU(), nn.Linear(hidden_size, hidden_size)
        )

    def merge(self, features: torch.Tensor, target: int) -> torch.Tensor:
        """ToMe alone: [B, T, D] -> [B, target, D]."""
        return tome_merge(features, target, self.num_heads)

    def forward(self, features: torch.Tensor, target: int) -> torch.Tensor:
        return self.mlp(self.merge(features, target))  # [B, target, H]
