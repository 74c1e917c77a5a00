"""Size-weighted token merging for consolidation (ToMe bipartite soft matching, repeated).

Every token carries a size: how many clip tokens it stands for (1 for a token as encoded). Two
tokens merge into their size-weighted mean and the sizes add, so the size-weighted sum of the
tokens is unchanged by a merge (no part of the history counts more than its share).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def merge_tokens(
    tokens: torch.Tensor, sizes: torch.Tensor, target: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reduce ``tokens`` [n, H] with ``sizes`` [n] to ``target`` tokens; keep time order.

    Each round splits the tokens alternately into sets A and B, matches every A token to its most
    similar (cosine) B token and merges the ``r`` best-matched A tokens into their partners, with
    ``r <= n // 2``. Rounds repeat until ``target`` tokens remain. The survivors keep the order of
    the original positions they sit at. Returns new tensors (never views of the input): tokens
    [target, H] in the input dtype and sizes [target] float32.
    """
    n = tokens.shape[0]
    if target < 1:
        raise ValueError("target must be at least 1")
    if n <= target:
        return tokens.clone(), sizes.to(torch.float32).clone()
    size = sizes.to(torch.float32).clamp_min(1e-6)  # [n]
    weighted = tokens.to(torch.float32) * size[:, None]  # [n, H] size-weighted sums
    position = torch.arange(n, device=tokens.device)  # [n] original index, for order
    while weighted.shape[0] > target:
        weighted, size, position = _merge_round(weighted, size, position, target)
    merged = (weighted / size[:, None]).to(tokens.dtype)
    return merged, size


def _merge_round(
    weighted: torch.Tensor, size: torch.Tensor, position: torch.Tensor, target: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One bipartite round over [n, H] weighted sums; removes ``min(n - target, n // 2)``."""
    n = weighted.shape[0]
    r = min(n - target, n // 2)
    metric = F.normalize(weighted / size[:, None], dim=-1)  # [n, H] unit means
    a, b = torch.arange(0, n, 2), torch.arange(1, n, 2)
    scores = metric[a] @ metric[b].T  # [na, nb]
    best_score, best_b = scores.max(dim=-1)  # [na]
    ranked = torch.argsort(best_score, descending=True, stable=True)
    merged_a, kept_a = ranked[:r], ranked[r:]
    dst = best_b[merged_a]  # [r] index into b
    b_weighted = weighted[b].index_add(0, dst, weighted[a][merged_a])  # [nb, H]
    b_size = size[b].index_add(0, dst, size[a][merged_a])  # [nb]
    out_weighted = torch.cat([weighted[a][kept_a], b_weighted])
    out_size = torch.cat([size[a][kept_a], b_size])
    out_position = torch.cat([position[a][kept_a], position[b]])
    order = torch.argsort(out_position, stable=True)
    return out_weighted[order], out_size[order], out_position[order]


def merge_tokens_batched(
    tokens: torch.Tensor, sizes: torch.Tensor, target: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``merge_tokens`` for ``B`` groups of the same length at once: [B, n, H], [B, n].

    The same rounds, group by group (each group's result equals ``merge_tokens`` on it, up to
    float rounding), in a few batched ops instead of ``B`` separate calls: consolidation merges
    thousands of equal-sized pairs per pass. Returns tokens [B, target, H] in the input dtype
    and sizes [B, target] float32.
    """
    b, n, _ = tokens.shape
    if target < 1:
        raise ValueError("target must be at least 1")
    if n <= target:
        return tokens.clone(), sizes.to(torch.float32).clone()
    size = sizes.to(torch.float32).clamp_min(1e-6)  # [B, n]
    weighted = tokens.to(torch.float32) * size[..., None]  # [B, n, H]
    position = torch.arange(n, device=tokens.device).expand(b, n)  # [B, n]
    while weighted.shape[1] > target:
        weighted, size, position = _merge_round_batched(weighted, size, position, target)
    return (weighted / size[..., None]).to(tokens.dtype), size


def _merge_round_batched(
    weighted: torch.Tensor, size: torch.Tensor, position: torch.Tensor, target: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``_merge_round`` over a batch: [B, n, H] weighted sums, [B, n] sizes and positions."""
    _, n, hidden = weighted.shape
    r = min(n - target, n // 2)
    metric = F.normalize(weighted / size[..., None], dim=-1)  # [B, n, H]
    a, b = torch.arange(0, n, 2), torch.arange(1, n, 2)
    scores = metric[:, a] @ metric[:, b].transpose(1, 2)  # [B, na, nb]
    best_score, best_b = scores.max(dim=-1)  # [B, na]
    ranked = torch.argsort(best_score, dim=-1, descending=True, stable=True)
    merged_a, kept_a = ranked[:, :r], ranked[:, r:]  # [B, r], [B, na - r]
    dst = best_b.gather(1, merged_a)  # [B, r] index into b

    def rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:  # x [B, m, H]
        return x.gather(1, index[..., None].expand(-1, -1, hidden))

    wa, sa, pa = weighted[:, a], size[:, a], position[:, a]
    b_weighted = weighted[:, b].scatter_add(
        1, dst[..., None].expand(-1, -1, hidden), rows(wa, merged_a)
    )
    b_size = size[:, b].scatter_add(1, dst, sa.gather(1, merged_a))
    out_weighted = torch.cat([rows(wa, kept_a), b_weighted], dim=1)
    out_size = torch.cat([sa.gather(1, kept_a), b_size], dim=1)
    out_position = torch.cat([pa.gather(1, kept_a), position[:, b]], dim=1)
    order = torch.argsort(out_position, dim=1, stable=True)
    return rows(out_weighted, order), out_size.gather(1, order), out_position.gather(1, order)
