"""The one exception type that reaches the user as a one-line message instead of a traceback."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pydantic import ValidationError


class ImagemillError(Exception):
    """A problem the user can fix: the message names the file, the column or the setting, and the fix."""

    @classmethod
    def invalid(cls, origin: str, exc: ValidationError) -> ImagemillError:
        """pydantic's problems with a file (a job spec, a recipe) as one line, each naming its key.
        pydantic's messages do not repeat the value, so no storage option is shown."""
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '(top level)'}: {err['msg']}" for err in exc.errors()
        )
        return cls(f"{origin} is invalid: {problems}")


def one_line(exc: BaseException, limit: int = 120) -> str:
    """`Type: message` on one line, cut at `limit`: for a report line about a file anyone could have
    written, where a library's message may span lines (tarfile) or quote the file at length."""
    return " ".join(f"{type(exc).__name__}: {exc}".split())[:limit]
