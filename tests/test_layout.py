"""The house rules a reviewer would otherwise check by hand: every package folder ships in the wheel,
and imports point one way (actor code may use the shared contract, never the driver's machinery)."""

from __future__ import annotations

import ast
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FOLDERS = {"imagemill": ROOT / "pipeline", "imagemill.workers": ROOT / "workers"}

# What actor code (imagemill.workers.*) may import from the driver's package: the contract both sides
# share. The driver's runner, scheduler, CLI and the rest, the test/demo builders, and tqdm are not.
SHARED_CONTRACT = {
    "spec",
    "errors",
    "storage",
    "shards",
    "output",
    "records",
    "lease",
    "carry",
    "labels",
    "cost",
    "features",
    "inception_score",
}
DRIVER_ONLY = {"runner", "scheduler", "cli", "submit", "status", "report", "expanders", "contact_sheet"}
FORBIDDEN_IN_ACTORS = {"tqdm"}
# The registry of model kinds belongs to the contract too: the spec takes `model.kind` from it. It
# names its generators as strings and imports nothing heavy (tests/test_generator_registry.py).
REGISTRY = "imagemill.workers.generators.registry"


def package_folders() -> dict[str, Path]:
    """Every folder holding an __init__.py under pipeline/ and workers/, by the package it installs as."""
    found = {}
    for package, folder in FOLDERS.items():
        for init in folder.rglob("__init__.py"):
            relative = init.parent.relative_to(folder)
            found[".".join([package, *relative.parts])] = init.parent
    return found


def test_every_package_folder_is_in_the_wheel():
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    missing = sorted(set(package_folders()) - listed)
    assert not missing, f"add these packages to [tool.setuptools] packages in pyproject.toml: {missing}"


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every import a file runs (absolute imports; this project uses no others)."""
    tree = ast.parse(path.read_text(), str(path))
    typing_only = {  # imports under `if TYPE_CHECKING:` never run
        id(inner)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING"
        for inner in ast.walk(node)
    }
    found = []
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "imagemill":  # `from imagemill import scheduler` names a module
                found += [(node.lineno, f"imagemill.{alias.name}") for alias in node.names]
            else:
                found.append((node.lineno, node.module))
    return found


def import_violations(folder: Path) -> list[str]:
    """Imports in actor code (`folder`, the workers/ tree) that the import-direction rule forbids."""
    violations = []
    for path in sorted(folder.rglob("*.py")):
        for line, module in imported_modules(path):
            parts = module.split(".")
            where = f"{path.relative_to(folder.parent)}:{line} imports {module}"
            driver_side = parts[0] == "imagemill" and len(parts) > 1 and parts[1] != "workers"
            if parts[0] in FORBIDDEN_IN_ACTORS or (driver_side and parts[1] not in SHARED_CONTRACT):
                violations.append(where)
    return sorted(set(violations))


def test_actor_code_imports_only_the_shared_contract():
    violations = import_violations(FOLDERS["imagemill.workers"])
    assert not violations, (
        "actor code may import only "
        + ", ".join(sorted(SHARED_CONTRACT))
        + (f" from the driver side: {violations}")
    )


def test_the_shared_contract_does_not_import_the_driver():
    """The shared contract is imported by actors: it imports nothing of imagemill but itself."""
    paths = [FOLDERS["imagemill"] / f"{name}.py" for name in sorted(SHARED_CONTRACT)]
    for path in [*paths, FOLDERS["imagemill.workers"] / "generators" / "registry.py"]:
        bad = [
            module
            for _, module in imported_modules(path)
            if module.split(".")[0] in FORBIDDEN_IN_ACTORS
            or (
                module.startswith("imagemill.")
                and module.split(".")[1] not in SHARED_CONTRACT
                and module != REGISTRY
            )
        ]
        assert not bad, f"{path.name} is shared with actors but imports {bad}"


def test_the_rule_catches_a_violating_import(tmp_path):
    """The check itself: a file in actor code importing the runner, or tqdm, is reported."""
    actors = tmp_path / "workers"
    (actors / "generators").mkdir(parents=True)
    (actors / "generators" / "fine.py").write_text("from imagemill.spec import JobSpec\nimport torch\n")
    (actors / "generators" / "bad.py").write_text("from imagemill.runner import run\n")
    (actors / "bar.py").write_text("import tqdm\nfrom imagemill import scheduler\n")
    assert import_violations(actors) == [
        "workers/bar.py:1 imports tqdm",
        "workers/bar.py:2 imports imagemill.scheduler",
        "workers/generators/bad.py:1 imports imagemill.runner",
    ]


def actor_modules() -> list[str]:
    folder = FOLDERS["imagemill.workers"]
    return sorted(
        ".".join(["imagemill.workers", *path.relative_to(folder).with_suffix("").parts]).removesuffix(
            ".__init__"
        )
        for path in folder.rglob("*.py")
    )


def test_importing_actor_code_loads_no_driver_module():
    """What an actor process really loads: importing its runtime imports none of the driver's modules
    (the lazy `imagemill` package keeps `imagemill.run` from dragging in the runner and Ray's client)."""
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
    driver = sorted(
        m for m in loaded if m.split(".")[1:2] and m.split(".")[1] in DRIVER_ONLY | {"testing", "demo"}
    )
    assert not driver, f"importing actor code loaded driver or builder modules: {driver}"
