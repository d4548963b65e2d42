"""`python -m imagemill.cli ...`: the same as the `imagemill` command (a submitted job's entrypoint)."""

import sys

from imagemill.cli.commands import main

sys.exit(main())
