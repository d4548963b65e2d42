"""The one exception type that reaches the user as a one-line message instead of a traceback, and the
one an actor raises for the driver to re-place its gang."""

from __future__ import annotations

import difflib
import typing
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pydantic import BaseModel, ValidationError


class ImagemillError(Exception):
    """A problem the user can fix: the message names the file, the column or the setting, and the fix."""

    @classmethod
    def invalid(
        cls,
        origin: str,
        exc: ValidationError,
        model: type[BaseModel] | None = None,
        sources: Mapping[str, str] | None = None,
    ) -> ImagemillError:
        """pydantic's problems with a file (a job spec, a recipe) as one line, each naming its key.
        pydantic's messages do not repeat the value, so no storage option is shown.

        With `model` (the class validated), a misspelled key says which key its section takes that is
        closest ("did you mean `format`?") instead of pydantic's "Extra inputs are not permitted";
        `sources` names where a dotted key came from when not from `origin` (`--set output.fromat`)."""
        problems = []
        for err in exc.errors():
            key = ".".join(str(p) for p in err["loc"]) or "(top level)"
            key = shown(key)  # a YAML key: one line
            if err["type"] == "extra_forbidden" and model is not None:
                given = next(
                    (s for k, s in (sources or {}).items() if k == key or k.startswith(f"{key}.")), ""
                )
                problems.append((f"unknown key `{key}`", given, _closest_key(model, err["loc"])))
            else:
                problems.append((f"{key}: {err['msg']}", "", ""))
        if len(problems) == 1 and problems[0][0].startswith("unknown key"):
            [(what, given, hint)] = problems
            return cls(f"{what} in {given or origin}{hint}")
        listed = "; ".join(f"{what}{f' ({given})' if given else ''}{hint}" for what, given, hint in problems)
        return cls(f"{origin} is invalid: {listed}")


class GangBroken(RuntimeError):
    """A member of a context-parallel gang died or fell out of step (imagemill.workers.gang): the
    leader's attempt fails with it, and the driver tears the whole gang down and places a new one."""


def _section_model(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model a field holds, through Optional, unions, lists and dicts; None when none."""
    from pydantic import BaseModel

    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if typing.get_origin(annotation) is typing.Annotated:
        return _section_model(typing.get_args(annotation)[0])
    for arg in typing.get_args(annotation):
        found = _section_model(arg)
        if found is not None:
            return found
    return None


def _closest_key(model: type[BaseModel], loc: tuple[int | str, ...]) -> str:
    """` — did you mean `x`?` for the section at loc[:-1], or the keys it takes when none is close."""
    section: type[BaseModel] | None = model
    for part in loc[:-1]:
        if isinstance(part, int) or section is None:  # a list index: the same model as its list's
            continue
        field = section.model_fields.get(part)
        section = _section_model(field.annotation) if field is not None else None
    if section is None:
        return ""
    names = list(section.model_fields)
    close = difflib.get_close_matches(str(loc[-1]), names, n=1, cutoff=0.6)
    if close:
        return f" — did you mean `{close[0]}`?"
    return f" — it takes {', '.join(f'`{n}`' for n in names)}"


def shown(value: object, limit: int | None = None) -> str:
    """A value from a file anyone could have written (a record's job name, a lease's host, a YAML key)
    as a message may name it: one line, control characters escaped (`\\n`), cut at `limit` with `…`."""
    text = "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in str(value))
    return text if limit is None or len(text) <= limit else text[:limit] + "…"


def one_line(exc: BaseException, limit: int = 120) -> str:
    """`Type: message` on one line, cut at `limit`: for a report line about a file anyone could have
    written, where a library's message may span lines (tarfile) or quote the file at length."""
    return " ".join(f"{type(exc).__name__}: {exc}".split())[:limit]
