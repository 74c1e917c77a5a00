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
