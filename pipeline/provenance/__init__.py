"""What an image file says about itself, shared by both sides: the actor writes parameters, watermark and
C2PA manifest; `imagemill verify` reads them back. Imports only `imagemill.core`.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from imagemill.core.errors import ImagemillError


def optional_library(module: str, setting: str) -> ModuleType:
    """`module` of the `provenance` extra, imported on first use; one line naming `setting` when the extra
    is not installed."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ImagemillError(f"{setting} needs pip install 'imagemill[provenance]' ({module})") from None
