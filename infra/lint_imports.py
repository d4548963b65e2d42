"""Run the import contracts of pyproject.toml ([tool.importlinter]) over imagemill as it installs.

imagemill is two folders (`pipeline/` → `imagemill`, `workers/` → `imagemill.workers`) and import-linter
reads a package from one, so this copies both into one `imagemill` tree in a temporary folder and runs
`lint-imports` there. `--tree DIR` stages DIR's pipeline/ and workers/ instead of this checkout's (the
test of the contracts plants a violating import in a copy).

    python infra/lint_imports.py            # exit 0 when every contract is kept, 1 when one is broken
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def stage(tree: Path, into: Path) -> None:
    """`tree`'s pipeline/ and workers/ as the package imagemill (with imagemill.workers) under `into`."""
    ignore = shutil.ignore_patterns("__pycache__")
    shutil.copytree(tree / "pipeline", into / "imagemill", ignore=ignore)
    shutil.copytree(tree / "workers", into / "imagemill" / "workers", ignore=ignore)


def lint(tree: Path = ROOT) -> subprocess.CompletedProcess[str]:
    with tempfile.TemporaryDirectory(prefix="imagemill-lint-") as staging:
        stage(tree, Path(staging))
        # The staged copy comes first on the path, before the editable install's finder.
        env = {**os.environ, "PYTHONPATH": staging}
        run_cli = "from importlinter.cli import lint_imports_command; lint_imports_command()"
        command = [sys.executable, "-c", run_cli, str(ROOT / "pyproject.toml"), "--no-cache", "--no-logo"]
        return subprocess.run(command, cwd=staging, env=env, capture_output=True, text=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tree", type=Path, default=ROOT, help="the checkout whose code is checked")
    result = lint(parser.parse_args().tree)
    sys.stdout.write(result.stdout)
    sys.stderr.write(result.stderr)
    return result.returncode


if __name__ == "__main__":
    sys.exit(main())
