"""Root pytest configuration: the shared multi-process harness, available to every package's tests.

Tests take the ``dist_pool`` fixture and call ``dist_pool.run(fn, *args, world_size=N)``; see
``tests/dist_harness.py``. The pool's worker processes live for the whole pytest (or xdist worker)
process and are reused by every test. The bad-input property tests' tally (``tests/bad_input.py``) is
summed over the xdist workers and reported once, at the end.
"""

from __future__ import annotations

import os
import sys
from collections import Counter
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "tests"))
os.environ.setdefault("OMP_NUM_THREADS", "1")

from dist_harness import DistPool  # noqa: E402


@pytest.fixture(scope="session")
def dist_pool():
    """A ``DistPool`` of up to 4 long-lived gloo ranks, shared by all tests of this process."""
    pool = DistPool(max_workers=4)
    yield pool
    pool.shutdown()


BAD_INPUTS = pytest.StashKey[Counter]()


def pytest_configure(config: pytest.Config) -> None:
    config.stash[BAD_INPUTS] = Counter()


def pytest_sessionfinish(session: pytest.Session) -> None:
    """This process's tally, handed to the xdist controller when this is a worker."""
    tally = session.config.stash[BAD_INPUTS]
    if "bad_input" in sys.modules:  # imported by a test_bad_input.py that ran here
        tally.update(sys.modules["bad_input"].OUTCOMES)
    if hasattr(session.config, "workeroutput"):
        session.config.workeroutput["bad_inputs"] = dict(tally)


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error) -> None:
    node.config.stash[BAD_INPUTS].update(node.workeroutput.get("bad_inputs", {}))


def pytest_terminal_summary(terminalreporter, config: pytest.Config) -> None:
    tally = config.stash[BAD_INPUTS]
    if tally:
        terminalreporter.write_line(
            f"bad-input property tests: {tally['named']} bad inputs refused with a named ValueError/TypeError, "
            f"{tally['valid']} generated inputs were valid and gave correct results"
        )
