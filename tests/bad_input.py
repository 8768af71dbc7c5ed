"""Shared machinery of the bad-input property tests (reliability scenario 6), one ``test_bad_input.py`` per package.

Property-based tests (hypothesis) over config dicts, YAML files, arguments and tensor shapes for the public APIs
of the six packages: every bad input raises a ValueError or TypeError whose message names the offending key or
argument exactly (see ``names``); never an AssertionError, KeyError, IndexError, a hang or a silent wrong result.
Distributed APIs run their whole property loop inside one harness call at world 2 (same derandomized examples on
both ranks, errors raised before any collective, or the call would hang).

Each probe records one outcome: "named" (rejected, message names the argument), "valid" (a generated input
that turned out to be valid, where a strategy can make those), or a failure description. The tests assert
there are no failures; ``check`` adds the outcomes to ``OUTCOMES``, which the root conftest reports once per
pytest run (xdist workers included).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from torch import nn

# Derandomized, though hypothesis also draws constants from the source modules a process has loaded: the examples
# shift a little with what else that process (or harness worker) ran before.
SETTINGS = settings(
    max_examples=40, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck)
)
OUTCOMES: Counter = Counter()  # this pytest process's tally: {"named": n, "valid": n}


def names(message: str, name: str) -> bool:
    """Whether ``message`` names ``name`` as a whole: not inside a longer identifier or dotted key (``lr`` is not
    named by ``clr``, ``lr_scale`` or ``ema.lr``). Callers quote a key that is not an identifier, as messages do."""
    assert name, "an empty name would be found in any message"
    return re.search(rf"(?<![\w.]){re.escape(name)}(?!\w|\.\w)", message) is not None


def probe(
    outcomes: list[str],
    keys: Sequence[str],
    call: Callable[[], Any],
    *,
    may_be_valid: bool = False,
    errors: tuple[type[Exception], ...] = (ValueError, TypeError),
) -> None:
    """Run ``call`` on one generated input and record what happened (see the module docstring); the error's
    message must name one of ``keys`` (see ``names``)."""
    try:
        call()
    except errors as error:
        message = str(error)
        if any(names(message, key) for key in keys):
            outcomes.append("named")
        else:
            outcomes.append(f"names none of {list(keys)}: {type(error).__name__}: {message}")
    except Exception as error:  # noqa: BLE001 - the point: anything else is a finding
        outcomes.append(f"{type(error).__name__} (not ValueError/TypeError) for {list(keys)}: {error}")
    else:
        outcomes.append("valid" if may_be_valid else f"accepted a bad {list(keys)}")


def check(outcomes: list[str], count: bool = True) -> None:
    """No failures; ``count``: add the outcomes to the tally (once per example: rank 0's only)."""
    failures = sorted({o for o in outcomes if o not in ("named", "valid")})
    if count:
        OUTCOMES.update(o for o in outcomes if o in ("named", "valid"))
    assert not failures, "\n".join(failures[:20])


def junk(*exclude: type) -> st.SearchStrategy:
    """Values of many types (minus ``exclude``) for arguments that expect something else."""
    options = {
        type(None): st.none(),
        bool: st.booleans(),
        int: st.integers(-(10**20), 10**20),
        float: st.floats(allow_nan=True, allow_infinity=True),
        str: st.text(max_size=8),
        list: st.lists(st.integers(), max_size=3),
        dict: st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
    }
    return st.one_of(*(s for t, s in options.items() if t not in exclude))


def ints(bad_below: int, optional: bool = False, above: int | None = None) -> st.SearchStrategy:
    out = [st.integers(max_value=bad_below - 1), junk(int, *([type(None)] if optional else []))]
    if above is not None:
        out.append(st.integers(min_value=above + 1))
    return st.one_of(*out)


def floats(
    lo: float, hi: float | None = None, lo_valid: bool = False, optional: bool = False
) -> st.SearchStrategy:
    out = [
        st.floats(max_value=lo, exclude_max=lo_valid),
        st.sampled_from([math.nan, math.inf, -math.inf]),
        junk(int, float, *([type(None)] if optional else [])),
    ]
    if hi is not None:
        out.append(st.floats(min_value=hi, exclude_min=True))
    return st.one_of(*out)


NOT_A_MODULE = st.one_of(junk(), st.just(torch.ones(2)))
SHAPES = st.lists(st.integers(0, 4), min_size=0, max_size=5).map(tuple)


class Denoiser(nn.Module):
    """x: (batch, 8) -> (batch, 8): an MLP of two residual blocks in ``blocks``, for the APIs that shard them."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(8, 16)
        self.blocks = nn.ModuleList(nn.Sequential(nn.LayerNorm(16), nn.Linear(16, 16)) for _ in range(2))
        self.head = nn.Linear(16, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        for block in self.blocks:
            h = h + block(h)
        return self.head(h)


def refusals(calls: Sequence[Callable[[], Any]]) -> list:
    """Inside a harness call: each call's ValueError message ("no error" when it passed), then the sum of one last
    all-reduce of ones, which every rank reaches only if no rank was left inside a collective."""
    errors: list = []
    for call in calls:
        try:
            call()
            errors.append("no error")
        except ValueError as exc:
            errors.append(str(exc))
    t = torch.ones(1)
    dist.all_reduce(t)
    return [*errors, t.item()]
