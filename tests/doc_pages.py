"""The README and the guides in docs/, read the way tests need them: a page's section, its fenced code
blocks as written, and every shell command they show. Tests that run a documented command take it
from here, so a command edited on its page is the command the test runs (or the test fails)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHELL_LANGUAGES = ("bash", "sh", "shell", "console")


def pages() -> list[Path]:
    """The README and every guide under docs/."""
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def page_text(name: str) -> str:
    """A page's text by its path from the repository root, e.g. `docs/augmentation.md`."""
    return (ROOT / name).read_text()


def section(name: str, title: str) -> str:
    """The section of page `name` headed `title`, up to the next heading of its level or above (lines
    in code blocks, such as `# comments`, are no headings)."""
    lines = page_text(name).splitlines(keepends=True)
    heading = re.compile(rf"(#+) {re.escape(title)}\n")
    first = next((i for i, line in enumerate(lines) if heading.fullmatch(line)), None)
    assert first is not None, f"{name} has no section {title!r}"
    level, fenced, body = len(heading.fullmatch(lines[first]).group(1)), False, []
    for line in lines[first + 1 :]:
        fenced ^= line.startswith("```")
        if not fenced and re.match(rf"#{{1,{level}}} ", line):
            break
        body.append(line)
    return "".join(body)


def blocks(text: str, language: str) -> list[str]:
    """The fenced code blocks of `language` in `text`, as written."""
    return re.findall(rf"^```{language}\n(.*?)^```", text, re.M | re.S)


def shell_commands(text: str) -> list[str]:
    """Every command in the shell blocks of `text`: one per line (a trailing backslash continues it),
    comment lines and blank lines left out, a `$ ` prompt taken off."""
    commands = []
    for language in SHELL_LANGUAGES:
        for block in blocks(text, language):
            for line in re.sub(r"\s*\\\n\s*", " ", block).splitlines():
                line = line.strip().removeprefix("$ ")
                if line and not line.startswith("#"):
                    commands.append(line)
    return commands


def documented_commands() -> dict[str, list[str]]:
    """Each page's shell commands, by the page's path from the repository root."""
    return {str(path.relative_to(ROOT)): shell_commands(path.read_text()) for path in pages()}


def command(name: str, pattern: str) -> list[str]:
    """The command on page `name` matching `pattern` from its start, split into words (it must be
    there, in a shell block, as written)."""
    found = [line for line in shell_commands(page_text(name)) if re.match(pattern, line)]
    assert len(found) == 1, f"{name} shows {len(found)} commands matching {pattern!r}, not one"
    return found[0].split()
