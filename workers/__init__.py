"""`imagemill.workers` (folder `workers/`): the Ray actor's runtime. Actor code imports only the shared
contract from the driver side (spec, errors, storage, shards, output, records); tests/test_layout.py
holds it to that."""
