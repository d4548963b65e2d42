"""What the driver's console shows: imagemill's own lines, not third-party chatter.

A job's stderr is often a log file or `kubectl logs`, read when something went wrong; lines that say
nothing about the job bury the ones that do. The storage clients log at INFO where they found
credentials and endpoints (every run, from every filesystem they open), and Ray notes on every start
of a local cluster that token authentication is on (a local cluster's default, nothing to act on).
Their warnings and errors still show. The actors' own output is quieted in
imagemill.workers.console and stays in Ray's logs (the driver does not echo it).
"""

from __future__ import annotations

import logging

# httpx/httpx2: huggingface_hub's client logs every request at INFO (the driver asks the hub whether a
# model id exists: imagemill.core.model_source).
INFO_ONLY_CHATTER = ("aiobotocore", "botocore", "s3fs", "fsspec", "httpx", "httpx2")
NOTICE_ONLY = ("ray._private.authentication.authentication_token_setup",)


def quiet_console() -> None:
    """Raise the level of the chattiest third-party loggers; imagemill's stay at INFO."""
    for name in INFO_ONLY_CHATTER:
        logging.getLogger(name).setLevel(logging.WARNING)
    for name in NOTICE_ONLY:
        logging.getLogger(name).setLevel(logging.ERROR)
