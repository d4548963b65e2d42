#!/usr/bin/env bash
# Every GPU profile in one command, on a machine with one CUDA GPU and no Ray (see bench/gpu_wheels.sh
# for the wheels it installs there): the GPU JPEG test, the shard worker in-process beside the bare
# loop (PNG, and JPEG through nvJPEG), each speed option, quantisation, and the encode ceiling; and the
# device-busy matrix (issue #27): worker vs bare, JPEG, compile off and on (reduce-overhead: CUDA graphs),
# 3 rounds alternating, for an SD-1.5-shaped model at 512²/20 steps, an SDXL-shaped one at 1024²/20 and a
# few-step one at 512²/4, then the emulated-accelerator table on this machine's cores (no Ray).
#
#     bash bench/gpu.sh              # on the GPU machine; then copy $OUT/BENCHMARKS.md over BENCHMARKS.md
#     bash bench/gpu.sh --dry-run    # here, on the CPU: the same steps with the tiny model, a few rows
#     ONLY="speed options|quantisation" bash bench/gpu.sh    # only the steps named
#     ONLY="busy.*" bash bench/gpu.sh                          # the device-busy matrix alone (~9 min)
#
# Each step's figures go into $OUT/BENCHMARKS.md (a copy of this tree's) as soon as it ends, and its
# output into $OUT/gpu.log, so a run stopped at its time limit still returns what it measured. A
# failing step is reported and the next one runs.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$(mktemp -d)}
PYTHON=${PYTHON:-python3}
if [ "${1:-}" = "--dry-run" ]; then
    PROFILE=cpu ROWS=8 WORKER_ROWS=16 QUANT_ROWS=16 IMAGES=2 SLOWER=10  # time limits x10: a shared CPU
    BUSY="--repeats 1 --compile both --compile-backend eager --compile-mode default"  # inductor: minutes here
    BUSY_ROWS=(16 8 16) EMULATED="--rates 512:30 --formats jpeg --device-seconds 2"
else
    PROFILE=gpu ROWS=64 WORKER_ROWS=128 QUANT_ROWS=32 IMAGES=16 SLOWER=1
    BUSY="--repeats 3 --compile both --compile-mode reduce-overhead"
    BUSY_ROWS=(64 16 128) EMULATED="--formats png,jpeg,webp --device-seconds 5"
fi
DEVICE=${PROFILE%%-*}  # gpu, or cpu for the dry run's tiny models
if ! $PYTHON -c "import diffusers, pydantic" 2>/dev/null; then  # the GPU machine: install the wheels
    SITE=/tmp/imagemill-site
    $PYTHON -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target $SITE bench/.wheels/*.whl \
        && $PYTHON -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir --target $SITE . \
        || { echo "installing the wheels failed"; exit 1; }
    export PYTHONPATH=$SITE
    if ! $PYTHON -c "from transformers import CLIPImageProcessorPil" 2>/dev/null; then
        $PYTHON -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target $SITE \
            bench/.wheels/fallback/*.whl || { echo "installing transformers failed"; exit 1; }
    fi
fi
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 BENCHMARKS_FILE=$OUT/BENCHMARKS.md
cp BENCHMARKS.md "$BENCHMARKS_FILE"
LOG=$OUT/gpu.log
SUMMARY=()

step() {  # step NAME SECONDS COMMAND...: run one step under a time limit, log it, note how it ended
    local name=$1 limit=$2 started=$SECONDS
    shift 2
    if [ -n "${ONLY:-}" ] && ! [[ "$name" =~ ^($ONLY)$ ]]; then return; fi  # ONLY="a|b": these steps
    echo "=== $name: $*" | tee -a "$LOG"
    timeout $((limit * SLOWER)) "$@" >>"$LOG" 2>&1
    local rc=$?
    SUMMARY+=("$name: exit $rc, $((SECONDS - started)) s")
    echo "--- $name: exit $rc, $((SECONDS - started)) s" | tee -a "$LOG"
}

$PYTHON -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), \
torch.cuda.get_device_name() if torch.cuda.is_available() else '')" | tee -a "$LOG"
step "gpu jpeg test" 100 $PYTHON -m pytest -x -q -p no:cacheprovider tests/test_device_jpeg.py
cd bench
step "encode ceiling" 90 $PYTHON encode_ceiling.py --images $IMAGES
step "worker vs bare" 200 $PYTHON worker_loop.py --profile $PROFILE --rows $WORKER_ROWS --repeats 1
step "speed options" 180 $PYTHON speed_options.py --profile $PROFILE --rows $ROWS --repeats 1
step "step caching" 120 $PYTHON step_cache.py --profile $PROFILE --rows $ROWS --repeats 1
step "quantisation" 100 $PYTHON quantization.py --profile $PROFILE --rows $QUANT_ROWS --repeats 1
# the device-busy matrix: images/s ÷ the bare loop's (compiled alike) is the device's busy share
step "busy sd15" 200 $PYTHON worker_loop.py --profile $DEVICE --rows ${BUSY_ROWS[0]} --formats jpeg $BUSY
step "busy sdxl" 220 $PYTHON worker_loop.py --profile $DEVICE-sdxl --rows ${BUSY_ROWS[1]} --formats jpeg $BUSY
step "busy fewstep" 120 $PYTHON worker_loop.py --profile $DEVICE-fewstep --rows ${BUSY_ROWS[2]} --formats jpeg $BUSY
step "busy emulated" 120 $PYTHON device_busy.py --in-process --no-s3 $EMULATED
offload() {  # model.offload's speed and memory, the model capped below what it needs (issue #26)
    step "offload" 200 $PYTHON offload.py --profile $PROFILE --rows $IMAGES
}
offload
# Actors sharing one GPU (workers.gpus_per_worker 1/n, issue #26): 1, 2 and 4 of a small model, images/s.
[ "$PROFILE" = gpu ] && SHARE_ROWS=512 || SHARE_ROWS=16
step "fractional gpus" 240 $PYTHON fractional_gpu.py --profile $PROFILE --rows $SHARE_ROWS --repeats 1
echo "=== summary"
printf '%s\n' "${SUMMARY[@]}"
grep -E "^\| |^## " "$BENCHMARKS_FILE" | grep -A30 -E "gpu profile|Encode ceiling" | head -60
