"""Storage options' values (credentials, endpoints) and the compile cache's signing key hidden from
everything the driver prints.

The spec never shows them (`JobSpec.redacted`), and imagemill's own messages never name them; but a
storage library may put one in an error (botocore: "Invalid endpoint: <endpoint_url>") or a retry
log line. While a job runs under `hiding`, every log line and the error that ends it, traceback
included, has those values replaced by REDACTED.
"""

from __future__ import annotations

import logging
import traceback
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from imagemill.core.errors import ImagemillError

if TYPE_CHECKING:  # the CLI imports this module before it needs the spec's (pydantic's) import time
    from imagemill.core.spec import JobSpec

REDACTED = "<redacted>"
MIN_LENGTH = 4  # shorter values (true, 1, us) would blank out ordinary words; no secret is this short


class Unexpected(Exception):
    """An error imagemill did not foresee; its text is the traceback with the values hidden."""


def storage_option_values(spec: JobSpec) -> list[str]:
    """Every storage option's value in the spec, nested ones included, as text: each field marked a
    storage option (imagemill.core.spec.markers), in whatever section declares it."""
    from imagemill.core.spec.markers import STORAGE_OPTION, marked

    return values_in([options for _, options in marked(spec, STORAGE_OPTION)])


def job_secrets(spec: JobSpec) -> list[str]:
    """What a job's driver hides: its storage options' values and, with a compile cache, the key
    that signs it (imagemill.core.compile_cache_key), which the actors' runtime_env carries."""
    from imagemill.core.compile_cache_key import key_values  # with the spec's import time, as JobSpec

    return storage_option_values(spec) + (key_values() if spec.speed.compile_cache else [])


def values_in(options: Any) -> list[str]:
    """The values in storage options (a dict of them, or a list of such dicts), nested ones included."""
    values: list[str] = []
    _collect(options, values)
    return values


def _collect(value: Any, into: list[str]) -> None:
    if isinstance(value, dict):
        for item in value.values():
            _collect(item, into)
    elif isinstance(value, list | tuple):
        for item in value:
            _collect(item, into)
    elif value is not None and len(text := str(value)) >= MIN_LENGTH:
        into.append(text)


def redact(text: str, values: Iterable[str]) -> str:
    for value in sorted(values, key=len, reverse=True):  # longest first: one may contain another
        text = text.replace(value, REDACTED)
    return text


@contextmanager
def hiding(values: list[str]) -> Iterator[None]:
    """Hide `values` from every log record made meanwhile and from the error raised.

    Records are redacted where they are made (the record factory), not by a handler's filter: the
    progress bar swaps the console handlers for its own while a job runs."""
    if not values:
        yield
        return
    make_record = logging.getLogRecordFactory()

    def make_hidden_record(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = make_record(*args, **kwargs)
        try:
            message = record.getMessage()
        except Exception:  # a malformed call: logging reports it when the record is emitted
            return record
        hidden = redact(message, values)
        if hidden != message:
            record.msg, record.args = hidden, None
        return record

    logging.setLogRecordFactory(make_hidden_record)
    try:
        yield
    except ImagemillError as exc:
        raise ImagemillError(redact(str(exc), values)) from None
    except Exception as exc:
        shown = redact("".join(traceback.format_exception(exc)), values)
        raise Unexpected(shown.rstrip("\n")) from None
    finally:
        logging.setLogRecordFactory(make_record)
