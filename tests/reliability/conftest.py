"""Fixtures of the reliability tests: torchrun launchers killed at teardown, and the ``slow`` marker."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

HERE = str(Path(__file__).resolve().parent)
if HERE not in sys.path:  # the tests import their helpers (reliability_launch, small_trainer) by name
    sys.path.append(HERE)

from reliability_launch import Launcher  # noqa: E402


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: a long reliability test (still run by default)")


@pytest.fixture
def launch():
    """A ``Launcher`` whose launches are killed when the test ends, passed or not."""
    launcher = Launcher()
    yield launcher
    launcher.close()


@pytest.fixture(scope="module")
def module_launch():
    """A ``Launcher`` for runs shared by a module's tests (e.g. an uninterrupted reference run)."""
    launcher = Launcher()
    yield launcher
    launcher.close()
