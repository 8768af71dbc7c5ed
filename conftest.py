"""Root pytest configuration: the shared multi-process harness, available to every package's tests.

Tests take the ``dist_pool`` fixture and call ``dist_pool.run(fn, *args, world_size=N)``; see
``tests/dist_harness.py``. The pool's worker processes live for the whole pytest (or xdist worker)
process and are reused by every test.
"""

from __future__ import annotations

import os
import sys
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
