"""Which streams a daemon should try to own: pure functions over plain data.

- ``static``: every stream its own config lists. A stream listed by two daemons goes to whoever
  takes its lease first; the other is its standby and adopts it when the lease expires.
- ``auto``: ``streams:`` is the list all daemons share, and each stream goes to one live daemon,
  balanced by weight. Every daemon computes the same answer from the same inputs (the live
  presence records), so nobody needs to coordinate: a stream placed elsewhere is handed over
  (final snapshot, release) and its new owner adopts it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

Placement = Literal["static", "auto"]


def balance(streams: Mapping[str, float], daemons: Mapping[str, float]) -> dict[str, str]:
    """Assign each stream (name -> weight) to a daemon (id -> capacity); stream -> daemon id.

    Heaviest streams first, each to the daemon whose load over capacity would be lowest after
    taking it (ties: the smaller id), the classic greedy balance. Deterministic: it depends only
    on the names and numbers given, never on their order. No daemons: nothing is assigned.
    """
    if not daemons:
        return {}
    load = dict.fromkeys(sorted(daemons), 0.0)
    assigned: dict[str, str] = {}
    for name in sorted(streams, key=lambda s: (-streams[s], s)):
        weight = streams[name]
        target = min(load, key=lambda d: ((load[d] + weight) / daemons[d], d))
        load[target] += weight
        assigned[name] = target
    return assigned


def wanted(
    placement: Placement,
    daemon_id: str,
    weight: float,
    streams: Mapping[str, float],
    live: Mapping[str, float],
) -> tuple[str, ...]:
    """The streams ``daemon_id`` should own now, in the order of ``streams``.

    ``streams``: its configured streams with their weights; ``live``: the live daemons' ids
    and capacities (from their presence records). It counts itself live whatever ``live`` says
    (its own record may not have reached Redis yet).
    """
    if placement == "static":
        return tuple(streams)
    daemons = {**live, daemon_id: weight}
    assigned = balance(streams, daemons)
    return tuple(name for name in streams if assigned.get(name) == daemon_id)


def moves(owned: Sequence[str], want: Sequence[str]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """``(adopt, hand_over)``: streams wanted but not owned, and owned but no longer wanted."""
    wanted_set, owned_set = set(want), set(owned)
    return (
        tuple(s for s in want if s not in owned_set),
        tuple(s for s in owned if s not in wanted_set),
    )


__all__ = ["Placement", "balance", "moves", "wanted"]
