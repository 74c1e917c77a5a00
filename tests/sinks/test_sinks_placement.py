"""Placement: static lists, and the deterministic weighted balance of ``placement: auto``."""

from __future__ import annotations

import itertools

from hypothesis import given
from hypothesis import strategies as st

from sinks.fleet.placement import balance, moves, wanted

FOUR = {"a": 1.0, "b": 1.0, "c": 1.0, "d": 1.0}


def test_static_wants_every_listed_stream_whoever_else_lives() -> None:
    assert wanted("static", "d1", 1.0, FOUR, {"d2": 1.0}) == ("a", "b", "c", "d")


def test_auto_splits_four_streams_two_and_two_and_both_daemons_agree() -> None:
    live = {"d1": 1.0, "d2": 1.0}
    mine = wanted("auto", "d1", 1.0, FOUR, live)
    theirs = wanted("auto", "d2", 1.0, FOUR, live)
    assert len(mine) == len(theirs) == 2
    assert set(mine) | set(theirs) == set(FOUR) and not set(mine) & set(theirs)


def test_auto_alone_takes_all_and_counts_itself_live() -> None:
    assert wanted("auto", "d1", 1.0, FOUR, {}) == ("a", "b", "c", "d")


def test_weights_of_streams_and_daemons_are_balanced() -> None:
    streams = {"big": 3.0, "s1": 1.0, "s2": 1.0, "s3": 1.0}
    assert balance(streams, {"x": 1.0, "y": 1.0}) == {"big": "x", "s1": "y", "s2": "y", "s3": "y"}
    assigned = balance(FOUR, {"strong": 3.0, "weak": 1.0})
    assert sorted(assigned.values()).count("strong") == 3


def test_moves_are_what_to_adopt_and_what_to_hand_over() -> None:
    assert moves(["a", "b"], ["b", "c"]) == (("c",), ("a",))
    assert moves([], []) == ((), ())


@given(
    st.dictionaries(st.text("abcdef", min_size=1, max_size=3), st.floats(0.1, 10.0), max_size=8),
    st.dictionaries(st.text("xyz", min_size=1, max_size=2), st.floats(0.1, 10.0), min_size=1,
                    max_size=4),
)  # fmt: skip
def test_balance_assigns_each_stream_once_whatever_the_order(
    streams: dict[str, float], daemons: dict[str, float]
) -> None:
    assigned = balance(streams, daemons)
    assert set(assigned) == set(streams) and set(assigned.values()) <= set(daemons)
    for order in itertools.islice(itertools.permutations(streams), 3):
        reordered = {name: streams[name] for name in order}
        assert balance(reordered, dict(reversed(daemons.items()))) == assigned
