"""The shard of a route: stable across processes and releases, balanced, and the Lease names."""

from __future__ import annotations

import subprocess
import sys
from collections import Counter

import pytest
from hypothesis import given
from hypothesis import strategies as st

from canaryd.core.shards import MAX_SHARDS, lease_name, lease_names, preferred_shard, shard_of


def test_pinned_values_do_not_change() -> None:
    """A change here moves routes between shards on upgrade: during a rolling update two releases would
    disagree on who drives a route. Values of sha256("namespace/name")[:8] (big-endian) mod N."""
    assert shard_of("default", "whoami-route-service", 4) == 2
    assert shard_of("shop", "cart", 4) == 2
    assert shard_of("payments", "api", 3) == 0
    assert shard_of("bench", "r00001", 4) == 1


def test_same_in_another_process() -> None:
    """Python's hash() of a str is salted per process; the shard must not be."""
    names = [("ns-a", f"route-{i}") for i in range(50)]
    here = [shard_of(ns, n, 7) for ns, n in names]
    code = f"from canaryd.core.shards import shard_of\nprint(','.join(str(shard_of(ns, n, 7)) for ns, n in {names!r}))"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env={"PYTHONHASHSEED": "12345"}
    )
    assert out.stdout.strip() == ",".join(map(str, here))


def test_balanced_over_10000_routes() -> None:
    for shards in (2, 3, 4, 8):
        counts = Counter(shard_of(f"ns{i % 37}", f"r{i:05d}", shards) for i in range(10_000))
        expected = 10_000 / shards
        assert set(counts) == set(range(shards))
        # A fair split's standard deviation is ~sqrt(n p (1-p)) < 50: 5 % off is over 5 sigma.
        assert all(abs(c - expected) < 0.05 * expected for c in counts.values()), counts


@given(st.text(min_size=1, max_size=63), st.text(min_size=1, max_size=63), st.integers(1, MAX_SHARDS))
def test_always_within_range(ns: str, name: str, shards: int) -> None:
    assert 0 <= shard_of(ns, name, shards) < shards


def test_namespace_and_name_are_not_interchangeable() -> None:
    # "a/bc" and "ab/c" are different routes; the separator keeps them apart (not a concatenation).
    diffs = sum(shard_of(f"a{i}", f"b{i}c", 64) != shard_of(f"a{i}b", f"{i}c", 64) for i in range(200))
    assert diffs > 150


def test_one_shard_is_no_sharding() -> None:
    assert shard_of("any", "route", 1) == 0
    assert lease_name("canaryd-leader", 0, 1) == "canaryd-leader"
    assert preferred_shard("canaryd-7d9f8b6c4-x2x7q", 1) == 0


def test_lease_names() -> None:
    assert lease_names("canaryd-leader", 3) == [
        "canaryd-leader-shard-0",
        "canaryd-leader-shard-1",
        "canaryd-leader-shard-2",
    ]
    with pytest.raises(ValueError, match="outside"):
        lease_name("x", 3, 3)


@pytest.mark.parametrize("bad", [0, -1, MAX_SHARDS + 1])
def test_shard_count_checked(bad: int) -> None:
    with pytest.raises(ValueError, match="shards must be within"):
        shard_of("ns", "r", bad)


def test_preferred_shard_from_the_ordinal() -> None:
    assert [preferred_shard(f"canaryd-{i}", 4) for i in range(6)] == [0, 1, 2, 3, 0, 1]
    # A Deployment's random pod name: a stable hash, the same every time.
    p = preferred_shard("canaryd-7d9f8b6c4-xkcdq", 4)
    assert 0 <= p < 4 and p == preferred_shard("canaryd-7d9f8b6c4-xkcdq", 4)
