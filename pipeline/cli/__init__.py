"""The command line over the Python API: `imagemill run|submit|status|verify|prompts|make-tiny-model`,
submitting to a Ray cluster, console and one-line user errors, redaction of storage options.
"""
