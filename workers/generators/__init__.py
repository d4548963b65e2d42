"""`imagemill.workers.generators` (folder `workers/generators/`): the image generators an actor runs."""
