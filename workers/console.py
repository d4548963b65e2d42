"""What the model libraries may print from an actor: errors only.

Actor output lands in the driver's console, which shows the job's progress. So: no loading bars, no
notices about optional image processors the pipelines never use, no truncation warnings (truncation is
flagged per row in the metadata instead), and nothing from importing torchao, which diffusers and
transformers do at load whenever it is installed: its notes on CUDA kernels a CPU build cannot load
and torch's deprecation notes on how it registers its enums say nothing about the job.
"""

from __future__ import annotations

import logging

QUIET_LOGGERS = ("torchao", "torch.utils._pytree")


def quiet_model_libraries() -> None:
    # Imported here, not at the top, so that the driver never pays for importing them.
    import diffusers
    import transformers

    for library in (diffusers, transformers):
        library.utils.logging.disable_progress_bar()
        library.utils.logging.set_verbosity_error()
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
