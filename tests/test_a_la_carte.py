"""À la carte: each package builds alone, and each micro-package imports with only its own deps."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ["litegen-zero", "litegen-sp", "litegen-vae", "litegen-ema", "litegen-ckpt", "litegen"]
MICRO = PACKAGES[:-1]
UV = shutil.which("uv") or os.environ.get("UV")

pytestmark = pytest.mark.skipif(UV is None, reason="uv is not on PATH")

CHECK = """
import importlib.util, sys
import {name}
others = [m for m in {others!r} if importlib.util.find_spec(m) is not None]
if others:
    sys.exit(f"{name}'s environment also holds {{others}}")
print("{name} ok", {name}.__all__)
"""


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600, **kw)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture(scope="module")
def wheels(tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("dist")
    for package in PACKAGES:
        _run([UV, "build", "--package", package, "--out-dir", str(out), "--quiet"])
    found = {}
    for package in PACKAGES:
        stem = package.replace("-", "_")
        wheel = sorted(out.glob(f"{stem}-*.whl"))
        sdist = sorted(out.glob(f"{stem}-*.tar.gz"))
        assert wheel and sdist, f"{package}: uv build made no wheel or sdist in {out}"
        found[package] = wheel[0]
    return found


def test_every_package_builds_a_wheel_and_sdist(wheels):
    assert set(wheels) == set(PACKAGES)


def _isolated_import(package: str, wheel: Path, env_dir: Path) -> str:
    name = package.replace("-", "_")
    python = env_dir / "bin" / "python"
    _run([UV, "venv", "--quiet", "--python", sys.executable, str(env_dir)])
    torch_pin = f"torch=={torch.__version__.split('+')[0]}"  # same build as the workspace: from uv's cache
    _run([UV, "pip", "install", "--quiet", "--python", str(python), str(wheel), torch_pin])
    others = [p.replace("-", "_") for p in PACKAGES if p != package]
    return _run([str(python), "-c", CHECK.format(name=name, others=others)]).stdout


def test_each_micro_package_imports_alone(wheels, tmp_path):
    with ThreadPoolExecutor(max_workers=2) as pool:
        outputs = list(pool.map(lambda p: _isolated_import(p, wheels[p], tmp_path / p), MICRO))
    for package, out in zip(MICRO, outputs, strict=True):
        assert f"{package.replace('-', '_')} ok" in out
