"""The dependency rules of DESIGN.md: micro-packages never import each other or the facade."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[1]
MICRO = ["litegen_zero", "litegen_sp", "litegen_vae", "litegen_ema", "litegen_ckpt"]
LITEGEN_MODULES = set(MICRO) | {"litegen"}
ALLOWED_DEPENDENCIES = {"torch", "einops", "safetensors"}


def imported_top_level_names(path: Path) -> list[tuple[str, int]]:
    """Every top-level module name imported by a source file, with its line number."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name.split(".")[0], node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.module.split(".")[0], node.lineno))
        elif (
            isinstance(node, ast.Call)
            and getattr(node.func, "attr", getattr(node.func, "id", "")) in {"import_module", "__import__"}
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            found.append((node.args[0].value.split(".")[0], node.lineno))
    return found


@pytest.mark.parametrize("package", MICRO)
def test_micro_package_imports_no_other_litegen_package(package):
    src = ROOT / "packages" / package.replace("_", "-") / "src" / package
    files = sorted(src.rglob("*.py"))
    assert files, f"no sources under {src}"
    offending = [
        f"{path.relative_to(ROOT)}:{line} imports {name}"
        for path in files
        for name, line in imported_top_level_names(path)
        if name in LITEGEN_MODULES and name != package
    ]
    assert not offending, "\n".join(offending)


def _requirement_name(requirement: str) -> str:
    name = requirement
    for stop in "<>=!~[; ":
        name = name.split(stop)[0]
    return name.strip().lower().replace("_", "-")


@pytest.mark.parametrize("package", MICRO)
def test_micro_package_declares_only_allowed_dependencies(package):
    meta = tomllib.loads((ROOT / "packages" / package.replace("_", "-") / "pyproject.toml").read_text())
    deps = {_requirement_name(r) for r in meta["project"]["dependencies"]}
    assert deps <= ALLOWED_DEPENDENCIES, f"{package} depends on {sorted(deps - ALLOWED_DEPENDENCIES)}"


def test_the_checker_catches_a_forbidden_import(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text(
        "import os\nfrom litegen_sp.ulysses import x\nimport importlib\nimportlib.import_module('litegen')\n"
    )
    names = {n for n, _ in imported_top_level_names(bad)}
    assert {"litegen_sp", "litegen"} <= names


def test_every_package_has_the_required_layout():
    for package in [*MICRO, "litegen"]:
        root = ROOT / "packages" / package.replace("_", "-")
        for part in [
            "pyproject.toml",
            "README.md",
            f"src/{package}/__init__.py",
            f"src/{package}/py.typed",
            "tests",
        ]:
            assert (root / part).exists(), f"{root.name} lacks {part}"


def _raise_if_copies() -> dict[str, str]:
    """Each package's private ``raise_if`` (no cross-package import), as an AST dump, by file."""
    copies = {}
    for path in sorted((ROOT / "packages").glob("*/src/*/*.py")):
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.FunctionDef) and node.name == "raise_if":
                copies[str(path.relative_to(ROOT))] = ast.dump(node)
    return copies


def test_the_private_raise_if_copies_are_the_same_lines():
    copies = _raise_if_copies()
    assert len(copies) == 6, sorted(copies)
    assert len(set(copies.values())) == 1, sorted(copies)


def test_raise_if_formats_a_lazy_message_only_on_failure():
    from litegen_sp.ulysses import raise_if

    def message() -> str:
        calls.append(1)
        return "x=1; allowed: 2"

    calls: list[int] = []
    raise_if(False, ValueError, message)
    assert calls == []
    with pytest.raises(ValueError, match="^x=1; allowed: 2$"):
        raise_if(True, ValueError, message)
    with pytest.raises(TypeError, match="^plain$"):
        raise_if(True, TypeError, "plain")
