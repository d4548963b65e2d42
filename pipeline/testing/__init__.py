"""`imagemill.testing` (folder `pipeline/testing/`): tiny random-weight models that tests, benchmarks and
`imagemill make-tiny-model` build offline. Nothing here runs in a job's actors."""
