"""The house rules a reviewer would otherwise check by hand: every package folder ships in the wheel, and
imports point one way. The map is pyproject.toml's import-linter contracts, run by infra/lint_imports.py
(in CI through this file); these tests show the contracts hold on the code and fail on a planted import."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "infra"))
from lint_imports import lint  # noqa: E402

FOLDERS = {"imagemill": ROOT / "pipeline", "imagemill.workers": ROOT / "workers"}
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def package_folders() -> dict[str, Path]:
    """Every folder holding an __init__.py under pipeline/ and workers/, by the package it installs as."""
    found = {}
    for package, folder in FOLDERS.items():
        for init in folder.rglob("__init__.py"):
            relative = init.parent.relative_to(folder)
            found[".".join([package, *relative.parts])] = init.parent
    return found


def test_every_package_folder_is_in_the_wheel():
    listed = set(PYPROJECT["tool"]["setuptools"]["packages"])
    missing = sorted(set(package_folders()) - listed)
    assert not missing, f"add these packages to [tool.setuptools] packages in pyproject.toml: {missing}"


def test_every_driver_room_is_in_the_import_map():
    """A new room under pipeline/ must be placed in the layers contract (or be a builder), so the map in
    pyproject.toml (and ARCHITECTURE.md's, which names the same rooms) cannot fall behind the tree."""
    layers = next(c for c in PYPROJECT["tool"]["importlinter"]["contracts"] if c["type"] == "layers")
    placed = {name.strip() for layer in layers["layers"] for name in layer.split("|")}
    rooms = {p.name for p in (ROOT / "pipeline").iterdir() if (p / "__init__.py").exists()}
    assert rooms - {"testing", "demo"} | {"workers"} == placed
    architecture = (ROOT / "docs" / "ARCHITECTURE.md").read_text()
    assert [room for room in sorted(rooms) if f"`pipeline/{room}/`" not in architecture] == []


def test_the_import_contracts_hold():
    result = lint()
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


@pytest.mark.parametrize(
    ("module", "line", "contract"),
    [
        ("workers/stages/planted.py", "from imagemill.output.claim import claim_output", "Rooms import downwards"),
        ("pipeline/core/planted.py", "import imagemill.planning.shards", "Rooms import downwards"),
        ("pipeline/execution/planted.py", "from imagemill.workers.worker import ShardWorker", "actor shells"),
        ("pipeline/reporting/planted.py", "def f():\n    import imagemill.testing", "test and demo builders"),
        ("workers/planted.py", "import tqdm", "never import tqdm"),
    ],
)
def test_a_planted_violating_import_breaks_a_contract(tmp_path, module, line, contract):
    for folder in ("pipeline", "workers"):
        shutil.copytree(ROOT / folder, tmp_path / folder, ignore=shutil.ignore_patterns("__pycache__"))
    (tmp_path / module).write_text(line + "\n")
    result = lint(tmp_path)
    assert result.returncode == 1
    broken = [line for line in result.stdout.splitlines() if " BROKEN" in line]
    assert len(broken) == 1 and contract in broken[0], result.stdout


def actor_modules() -> list[str]:
    folder = FOLDERS["imagemill.workers"]
    return sorted(
        ".".join(["imagemill.workers", *path.relative_to(folder).with_suffix("").parts]).removesuffix(
            ".__init__"
        )
        for path in folder.rglob("*.py")
    )


def test_importing_actor_code_loads_no_driver_module():
    """What an actor process really loads (the contracts read imports; this runs them): importing its
    runtime loads only the shared rooms (the lazy `imagemill` package keeps `imagemill.run` from dragging
    in the runner and Ray's client)."""
    every = ", ".join(repr(m) for m in actor_modules())
    script = (
        "import importlib, sys\n"
        f"for name in [{every}]:\n"
        "    importlib.import_module(name)\n"
        "print(' '.join(sorted(m for m in sys.modules if m.startswith('imagemill'))))\n"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True
    ).stdout.split()
    assert "imagemill.workers.worker" in loaded
    rooms = {m.split(".")[1] for m in loaded if m.count(".") >= 1}
    assert rooms <= {"workers", "core", "provenance"}, f"actor code loaded driver or builder rooms: {rooms}"
