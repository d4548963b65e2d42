"""`imagemill.workers.stages` (folder `workers/stages/`): optional model stages around the generator
(prompt expansion before it, CLIP scoring after it)."""
