"""`imagemill.testing` (folder `pipeline/testing/`): tiny random-weight models that tests, benchmarks and
`imagemill make-tiny-model` build offline. Nothing here runs in a job's actors."""

# The diffusers pipeline families with a tiny builder (tiny_families.BUILDERS), in this order: the
# builders, `imagemill make-tiny-model --family` and the family tests all take the list from here.
# This module imports nothing, so the CLI can offer the choices without importing diffusers.
FAMILIES: tuple[str, ...] = ("sd", "sdxl", "sd3", "flux", "pixart", "sana")
