"""Release readiness: one workspace version, Apache-2.0 and the package metadata in what `uv build` makes.

One version: every package takes `version` from the root pyproject.toml's `version` line through hatchling's
regex source (`[tool.hatch.version]`), and `litegen` pins the five micro-packages to it through the metadata
hook in packages/litegen/hatch_build.py (static `dependencies` cannot name a version read at build time).
A wheel built from an sdist takes both from the sdist's PKG-INFO, so the sdist needs nothing outside itself.
LICENSE: each package holds a copy of the root LICENSE (its `license-files`); a copy, not a path outside the
package, so the sdist carries it and the wheel built from that sdist finds it.

One real build (sdist, then the wheel from it) of `litegen`, the package with the hook, the console script and
the pins; the other five are checked from their pyproject.toml.
"""

from __future__ import annotations

import email
import os
import re
import shutil
import subprocess
import tarfile
import zipfile
from email.message import Message
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[1]
MICRO = ["litegen-zero", "litegen-sp", "litegen-vae", "litegen-ema", "litegen-ckpt"]
PACKAGES = [*MICRO, "litegen"]
UV = shutil.which("uv") or os.environ.get("UV")
BUILT = "litegen"

LICENSE = "Apache-2.0"
REQUIRES_PYTHON = ">=3.10"
REQUIRED_CLASSIFIERS = {
    "License :: OSI Approved :: Apache Software License",
    "Topic :: Scientific/Engineering :: Artificial Intelligence",
    "Intended Audience :: Science/Research",
    "Operating System :: POSIX :: Linux",
    "Programming Language :: Python :: 3",
    "Programming Language :: Python :: 3.10",
    "Programming Language :: Python :: 3.11",
    "Programming Language :: Python :: 3.12",
}


def _toml(path: Path) -> dict:
    return tomllib.loads(path.read_text())


WORKSPACE_VERSION = _toml(ROOT / "pyproject.toml")["project"]["version"]


def _pyproject(package: str) -> dict:
    return _toml(ROOT / "packages" / package / "pyproject.toml")


def _version_from_source(package: str) -> str:
    """The version hatchling's regex source reads for `package`, following its path and pattern."""
    source = _pyproject(package)["tool"]["hatch"]["version"]
    text = (ROOT / "packages" / package / source["path"]).read_text()
    match = re.search(source["pattern"], text, flags=re.MULTILINE)
    assert match, f"{package}: pattern {source['pattern']!r} finds no version in {source['path']}"
    return match.group("version")


@pytest.mark.parametrize("package", PACKAGES)
def test_every_package_takes_the_one_workspace_version(package):
    project = _pyproject(package)
    assert "version" not in project["project"], f"{package} has a static version; it must come from the root"
    assert "version" in project["project"]["dynamic"]
    source = project["tool"]["hatch"]["version"]
    assert (ROOT / "packages" / package / source["path"]).resolve() == ROOT / "pyproject.toml"
    assert _version_from_source(package) == WORKSPACE_VERSION
    # uv reinstalls the editable package when the root version changes, not only when this file does
    cache_files = {key.get("file") for key in project["tool"]["uv"]["cache-keys"]}
    assert {"pyproject.toml", "../../pyproject.toml"} <= cache_files


@pytest.mark.parametrize("package", PACKAGES)
def test_every_package_declares_the_release_metadata(package):
    root = ROOT / "packages" / package
    project = _pyproject(package)["project"]
    assert project["name"] == package
    assert project["description"].strip(), f"{package}: empty description"
    assert project["readme"] == "README.md" and (root / "README.md").read_text().strip()
    assert project["license"] == LICENSE
    assert project["license-files"] == ["LICENSE"]
    assert (root / "LICENSE").read_bytes() == (ROOT / "LICENSE").read_bytes(), (
        f"packages/{package}/LICENSE differs from the root LICENSE: copy the root one"
    )
    assert project["requires-python"] == REQUIRES_PYTHON
    missing = REQUIRED_CLASSIFIERS - set(project["classifiers"])
    assert not missing, f"{package} lacks classifiers {sorted(missing)}"
    assert project["keywords"], f"{package}: no keywords"
    assert "urls" not in project, f"{package}: [project.urls] must name real pages only (there are none yet)"
    assert any(r.startswith("hatchling>=1.27") for r in _pyproject(package)["build-system"]["requires"]), (
        "license-files (PEP 639) needs hatchling >= 1.27"
    )


def test_litegen_pins_every_micro_package_and_registers_the_console_script():
    project = _pyproject("litegen")
    assert "dependencies" not in project["project"] and "dependencies" in project["project"]["dynamic"]
    hook = project["tool"]["hatch"]["metadata"]["hooks"]["custom"]
    assert sorted(hook["pinned"]) == sorted(MICRO)
    assert {r.split(">=")[0] for r in hook["requires"]} >= {"torch", "pyyaml", "tqdm"}
    assert project["project"]["scripts"] == {"litegen": "litegen.cli:main"}
    assert (ROOT / "packages" / "litegen" / "hatch_build.py").is_file()


def test_the_root_license_is_the_apache_2_0_text():
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License\n                           Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text
    assert "Copyright 2026 The LiteGen Authors" in text


def test_the_changelog_has_a_section_for_the_workspace_version():
    text = (ROOT / "CHANGELOG.md").read_text()
    heading = re.search(rf"^## \[?{re.escape(WORKSPACE_VERSION)}\]?(\s|$)", text, flags=re.MULTILINE)
    assert heading, f"CHANGELOG.md has no '## {WORKSPACE_VERSION}' section"
    body = text[heading.end() :].split("\n## ", 1)[0]
    assert body.count("\n- ") >= 5, f"the {WORKSPACE_VERSION} section lists almost nothing"


def _uv_build(package: str, out: Path) -> None:
    """`uv build` (sdist, then the wheel from it); skips only when the backend hatchling cannot be had."""
    command = [UV, "build", "--package", package, "--out-dir", str(out), "--quiet"]
    for attempt in (["--offline"], []):  # uv's cache first; then the network, when the cache lacks hatchling
        proc = subprocess.run(command + attempt, capture_output=True, text=True, cwd=ROOT, timeout=300)
        if proc.returncode == 0:
            return
        if "build-system.requires" not in proc.stderr:
            raise AssertionError(
                f"{' '.join(command)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
            )
    pytest.skip(f"the build backend (hatchling) is neither in uv's cache nor downloadable:\n{proc.stderr}")


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[Path, Path]:
    if UV is None:
        pytest.skip("uv is not on PATH")
    out = tmp_path_factory.mktemp("release")
    _uv_build(BUILT, out)
    stem = f"{BUILT.replace('-', '_')}-{WORKSPACE_VERSION}"
    wheel, sdist = out / f"{stem}-py3-none-any.whl", out / f"{stem}.tar.gz"
    assert wheel.is_file() and sdist.is_file(), (
        f"expected {wheel.name} and {sdist.name}, found {os.listdir(out)}"
    )
    return wheel, sdist


def _check_core_metadata(metadata: Message, where: str) -> None:
    project = _pyproject(BUILT)["project"]
    assert metadata["Name"] == BUILT, where
    assert metadata["Version"] == WORKSPACE_VERSION, where
    assert metadata["Summary"] == project["description"], where
    assert metadata["License-Expression"] == LICENSE, where
    assert metadata.get_all("License-File") == ["LICENSE"], where
    assert metadata["Requires-Python"] == REQUIRES_PYTHON, where
    assert set(metadata.get_all("Classifier")) == set(project["classifiers"]), where
    assert set(metadata["Keywords"].split(",")) == set(project["keywords"]), where
    assert metadata["Description-Content-Type"] == "text/markdown", where
    readme = (ROOT / "packages" / BUILT / "README.md").read_text()
    assert metadata.get_payload().strip() == readme.strip(), (
        f"{where}: the long description is not the README"
    )
    pins = sorted(r for r in metadata.get_all("Requires-Dist") if r.startswith("litegen"))
    assert pins == sorted(f"{name}=={WORKSPACE_VERSION}" for name in MICRO), where


def test_the_built_wheel_carries_the_metadata_license_and_types(built):
    wheel, _ = built
    dist_info = f"{BUILT.replace('-', '_')}-{WORKSPACE_VERSION}.dist-info"
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        metadata = archive.read(f"{dist_info}/METADATA").decode()
        _check_core_metadata(email.message_from_string(metadata), wheel.name)
        assert archive.read(f"{dist_info}/licenses/LICENSE") == (ROOT / "LICENSE").read_bytes()
        entry_points = archive.read(f"{dist_info}/entry_points.txt").decode()
    assert f"{BUILT.replace('-', '_')}/py.typed" in names, f"{wheel.name} lacks py.typed"
    assert "[console_scripts]\nlitegen = litegen.cli:main" in entry_points


def test_the_built_sdist_carries_the_metadata_and_license(built):
    _, sdist = built
    top = f"{BUILT.replace('-', '_')}-{WORKSPACE_VERSION}"
    with tarfile.open(sdist) as archive:
        names = set(archive.getnames())
        metadata = archive.extractfile(f"{top}/PKG-INFO").read().decode()
        _check_core_metadata(email.message_from_string(metadata), sdist.name)
        assert archive.extractfile(f"{top}/LICENSE").read() == (ROOT / "LICENSE").read_bytes()
    for part in ["pyproject.toml", "README.md", "hatch_build.py", f"src/{BUILT.replace('-', '_')}/py.typed"]:
        assert f"{top}/{part}" in names, f"{sdist.name} lacks {part}"
