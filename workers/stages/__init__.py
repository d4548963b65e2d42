"""`imagemill.workers.stages` (folder `workers/stages/`): the model stages around the generator: prompt
expansion before it; after it, the post-generation stages (scoring, safety, features, ... and the
writer threads' encode) declared by contract.py and built from the spec, in the stage table's order, by
registry.py."""
