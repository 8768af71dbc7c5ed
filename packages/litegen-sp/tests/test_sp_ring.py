"""The Ulysses x Ring split rule, a pure function, against a brute-force reading of its definition."""

from __future__ import annotations

import itertools

import pytest
from litegen_sp import usp_split


def best_split(sp_size: int, heads: int, kv_heads: int) -> tuple[int, int]:
    """The largest Ulysses degree dividing the SP size, the heads and the kv heads; the rest is ring."""
    ulysses = max(
        u for u in range(1, sp_size + 1) if sp_size % u == 0 and heads % u == 0 and kv_heads % u == 0
    )
    return ulysses, sp_size // ulysses


def test_the_automatic_split_is_the_most_ulysses_the_heads_allow():
    for sp_size, heads in itertools.product(range(1, 65), range(1, 129)):
        for kv_heads in {heads, max(1, heads // 4), 1}:
            if heads % kv_heads:
                continue
            ulysses, ring = usp_split(sp_size, heads, kv_heads)
            assert (ulysses, ring) == best_split(sp_size, heads, kv_heads), (sp_size, heads, kv_heads)
            assert usp_split(sp_size, heads, kv_heads, ring=ring) == (ulysses, ring)


def test_an_explicit_split_the_heads_do_not_allow_lists_the_ones_that_work():
    with pytest.raises(
        ValueError, match=r"valid Ulysses x Ring splits: 2 x 4 \(sp_ring=4\), 1 x 8 \(sp_ring=8\)"
    ):
        usp_split(8, 38, ring=2)  # SD3.5-Large's 38 heads: Ulysses 4 does not divide them
    with pytest.raises(ValueError, match="sp_ring=3"):
        usp_split(8, 24, ring=3)  # not a divisor of sp_size
    assert usp_split(8, 24, ring=2) == (4, 2)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="heads"):
            usp_split(4, bad)
