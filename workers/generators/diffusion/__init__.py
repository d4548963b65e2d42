"""`imagemill.workers.generators.diffusion` (folder `workers/generators/diffusion/`): the diffusers
generator and its diffusers-only options (families, speed, quantization, LoRA)."""
