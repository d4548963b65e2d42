"""`imagemill.demo` (folder `pipeline/demo/`): the demo model's world of drawn shapes and its trainer.
The demo job itself loads the trained pipeline like any other model; nothing here runs in its actors."""
