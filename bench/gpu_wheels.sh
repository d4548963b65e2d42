#!/usr/bin/env bash
# Download, here, the cp312 manylinux wheels that the lent GPU machine lacks, into bench/.wheels/
# (ignored by git; the device tool carries it). That machine has torch, transformers, accelerate, peft,
# safetensors, pyarrow, fsspec, pillow, pyyaml, tqdm, pandas and torchvision, and can fetch nothing.
# bench/gpu.sh installs these there with `pip install --no-index`.
#
#     bash bench/gpu_wheels.sh
set -euo pipefail
cd "$(dirname "$0")"
rm -rf .wheels && mkdir .wheels
# The versions this project's own environment runs; --no-deps: each needed dependency is named here.
# diffusers needs importlib_metadata (+ lazy-importer); pydantic needs its core, annotated-types and
# typing-inspection; torchao is model.quantization's optional extra (bench/quantization.py); spandrel
# (and its einops) loads the `upscale:` stage's network (bench/gpu_stages.py's super-resolution).
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .wheels \
    diffusers==0.42.1 importlib_metadata==10.2.0 lazy-importer==0.1.0 \
    pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
    torchao==0.18.0 spandrel==0.4.2 einops==0.8.2
# transformers as this project runs it, installed there only when the machine's lacks an API imagemill
# uses (CLIPImageProcessorPil, of the 5.2x releases); kept apart so that one version of each installs.
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    -d .wheels/fallback transformers==5.24.0
ls -la .wheels .wheels/fallback
du -sh .wheels
