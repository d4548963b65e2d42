"""Storage and filesystem errors that the user fixes, turned from tracebacks into one-line errors.

Missing or refused credentials, an endpoint that does not answer, or an output path that names a file
reach the driver as botocore's or the OS's exceptions, 70 lines deep, and would exit 1, which means
"some shards failed, re-run": an orchestrator would retry a job that cannot work. Raised as an
ImagemillError instead, they end as one line and exit 2. The messages name the setting to change and
never a storage option's value (an endpoint URL may be one), so no exception text is quoted here
except the OS's file name and botocore's profile notice, which come from the environment.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from imagemill.core.errors import ImagemillError

CREDENTIALS_FIX = (
    "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, an AWS_PROFILE that exists, or key and secret in "
    "the section's storage_options"
)


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """The exception and those it was raised from or during (s3fs wraps botocore's)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def user_error(exc: BaseException) -> str | None:
    """The one-line message for an error the user can fix, or None for any other error."""
    import botocore.exceptions as boto

    for error in _chain(exc):
        if isinstance(error, boto.ProfileNotFound):
            return f"storage credentials: {error}; {CREDENTIALS_FIX}"
        if isinstance(error, boto.NoCredentialsError | boto.PartialCredentialsError):
            return f"no storage credentials found; {CREDENTIALS_FIX}"
        if isinstance(error, boto.EndpointConnectionError | boto.ConnectTimeoutError):
            return (
                "cannot reach the storage endpoint; check AWS_ENDPOINT_URL or the section's "
                "storage_options endpoint_url, and that the network reaches it"
            )
        if isinstance(error, PermissionError):
            return f"storage refused access; check the credentials: {CREDENTIALS_FIX}"
        if isinstance(error, FileExistsError | NotADirectoryError):
            return (
                f"{error.filename or 'a path'} is a file where a folder must be; output.path must name a "
                "folder (or a URL prefix), not a file"
            )
    return None


@contextmanager
def as_user_errors() -> Iterator[None]:
    """Raise the errors `user_error` knows as ImagemillError; let every other error through."""
    try:
        yield
    except ImagemillError:
        raise
    except Exception as exc:
        message = user_error(exc)
        if message is None:
            raise
        raise ImagemillError(message) from None
