#!/usr/bin/env bash
# The GPU measurements in one command, within a time budget, on a machine with one CUDA GPU and no Ray
# (bench/gpu_wheels.sh downloads, here, the wheels it installs there):
# - the device-busy matrix (issue #27 acceptance 3): the shard worker in-process vs the bare loop, JPEG,
#   compile off and on (reduce-overhead: CUDA graphs), 3 rounds taking turns, for an SD-1.5-shaped model
#   at 512²/20 steps, a few-step one at 512²/4 and an SDXL-shaped one at 1024²/20 (bench/worker_loop.py);
#   then the emulated accelerator's table at the rates the bare loops reached (bench/device_busy.py);
# - issue #25's stages on the device: super-resolution 1024² → 4096² (spandrel, tiles, a Compact-shaped
#   network) and SD-1.5-shaped inpainting, stage seconds (bench/gpu_stages.py).
#
#     bash bench/gpu.sh              # on the GPU machine; then copy $OUT/BENCHMARKS.md over BENCHMARKS.md
#     bash bench/gpu.sh --dry-run    # here, on the CPU: every step end to end, tiny models, a few rows
#     ONLY="busy sd15|gpu stages" bash bench/gpu.sh     # only the steps named
#     ONLY="speed options" bash bench/gpu.sh            # an extra step (below): run only when named
#
# The budget: BUDGET seconds (510: 8.5 of a lent machine's 10 minutes) for the whole script, wheels
# included; each step runs under `timeout` for at most its limit, never past the budget, and the limits
# plus SETUP add up to no more than BUDGET (checked before anything runs). Rows are sized by arithmetic
# from the one H200 run in BENCHMARKS.md (SD-1.5-shaped bare loop, 512²/20 steps: 7.33 images/s),
# taking an H100 at 0.85 of it: 6.2/s, 1.35x that compiled (the H200's speed-options row); SDXL-shaped
# at 1024²/20 about 1/8 of it (0.8/s); few-step at 4 steps without guidance 4 UNet passes instead of 40
# plus the decode (25/s). Each busy step is one process (worker_loop.py --process one): 10 s to start,
# the model built (random weights: SD-1.5-shaped 20 s, once, SDXL-shaped 40 s), the two workers loaded
# (2 s each, SDXL 5) and one of them compiled (cold: 45 s, SDXL 70), the bare loops run on the workers'
# pipelines, every variant warmed up by one batch, then 3 rounds of the 4 variants:
#   busy sd15     32 rows (2 batches):  10 + 20 + 4 + 45 + 10 + 3 x (2 x 5.2 + 2 x 3.8)  = 143 s (limit 145)
#   busy fewstep  64 rows (4 batches):  10 + 4 + 45 + 3 + 3 x (2 x 2.6 + 2 x 1.9)        =  89 s (limit 90)
#   busy sdxl      4 rows (1 batch):    10 + 40 + 10 + 70 + 17 + 3 x (2 x 5 + 2 x 3.7)   = 199 s (limit 200)
#   busy emulated: CPU only, 3 rates x JPEG x 2 s of device time                                (limit 20)
#   gpu stages: 16 x 1024² → 4096² SR, 32 inpainted 512² rows, each after a warm-up shard        (limit 40)
# plus SETUP (wheels, torch's first import): 15 s. These are estimates: a step past its limit is cut,
# and as worker_loop.py writes its section after every round, the rounds that fit come back, counted.
# SDXL's one batch per run charges the worker's per-shard costs (read, commit) to fewer images than a
# steady state would: its busy share is a lower bound.
# Each step's figures go into $OUT/BENCHMARKS.md (a copy of this tree's) as soon as it writes them, and
# its output into $OUT/gpu.log, so a run stopped at its time limit still returns what it measured. A
# failing step is reported and the next one runs.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$(mktemp -d)}
PYTHON=${PYTHON:-python3}
BUDGET=${BUDGET:-510} SETUP=15
# the budgeted steps, in order, with their limits in seconds on the device
STEPS=("busy sd15:145" "busy fewstep:90" "busy sdxl:200" "busy emulated:20" "gpu stages:40")
BUSY="--formats jpeg --repeats 3 --compile both --process one"
if [ "${1:-}" = "--dry-run" ]; then
    PROFILE=cpu SLOWER=${SLOWER:-4}  # limits x4: a shared CPU
    BUSY="$BUSY --compile-backend eager --compile-mode default"  # inductor: minutes on a CPU
    BUSY_ROWS=(16 16 8) EMULATED="--formats jpeg --device-seconds 1"
    ROWS=8 WORKER_ROWS=16 QUANT_ROWS=16 IMAGES=2 SHARE_ROWS=16
else
    PROFILE=gpu SLOWER=1
    BUSY="$BUSY --compile-mode reduce-overhead"
    BUSY_ROWS=(32 64 4) EMULATED="--formats jpeg --device-seconds 2"
    ROWS=64 WORKER_ROWS=128 QUANT_ROWS=32 IMAGES=16 SHARE_ROWS=512
fi
planned=$SETUP
for entry in "${STEPS[@]}"; do planned=$((planned + ${entry##*:})); done
if [ $planned -gt "$BUDGET" ]; then
    echo "the steps' limits and SETUP add up to $planned s, over the budget of $BUDGET s: lower them"
    exit 1
fi
limit() { # limit NAME: a budgeted step's limit in seconds
    local entry
    for entry in "${STEPS[@]}"; do [ "${entry%%:*}" = "$1" ] && echo "${entry##*:}"; done
}
# the GPU machine lacks these: install the wheels (spandrel looked up, not imported: it needs torchvision)
if ! $PYTHON -c "import importlib.util as u, sys; sys.exit(not all(map(u.find_spec, sys.argv[1:])))" \
    diffusers pydantic spandrel einops; then
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
MODELS=${MODELS:-$OUT/models}  # the benches' built models, shared by the steps
cp BENCHMARKS.md "$BENCHMARKS_FILE"
LOG=$OUT/gpu.log
SUMMARY=()

run_step() {  # run_step NAME SECONDS COMMAND...: one step under a time limit, logged, how it ended noted
    local name=$1 seconds=$2 started=$SECONDS
    shift 2
    echo "=== $name (limit $seconds s): $*" | tee -a "$LOG"
    timeout "$seconds" "$@" >>"$LOG" 2>&1
    local rc=$?
    SUMMARY+=("$name: exit $rc, $((SECONDS - started)) s of $seconds")
    echo "--- $name: exit $rc, $((SECONDS - started)) s" | tee -a "$LOG"
}

step() {  # step NAME COMMAND...: a budgeted step, at most its limit and never past the budget
    local name=$1 left=$(((BUDGET * SLOWER) - SECONDS)) seconds
    shift
    if [ -n "${ONLY:-}" ] && ! [[ "$name" =~ ^($ONLY)$ ]]; then return; fi  # ONLY="a|b": these steps
    seconds=$(($(limit "$name") * SLOWER))
    [ $seconds -gt $left ] && seconds=$left
    if [ $seconds -lt 5 ]; then
        SUMMARY+=("$name: not run, the budget is spent")
        return
    fi
    run_step "$name" $seconds "$@"
}

extra() {  # extra NAME SECONDS COMMAND...: a step outside the budget, run only when ONLY names it
    local name=$1 seconds=$(($2 * SLOWER))
    shift 2
    if [ -z "${ONLY:-}" ] || ! [[ "$name" =~ ^($ONLY)$ ]]; then return; fi
    run_step "$name" $seconds "$@"
}

$PYTHON -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), \
torch.cuda.get_device_name() if torch.cuda.is_available() else '')" | tee -a "$LOG"
cd bench
bare_rates() {  # the bare loops' images/s in $BENCHMARKS_FILE's busy sections, as device_busy.py's rates
    $PYTHON - "$BENCHMARKS_FILE" "$PROFILE" <<'EOF'
import re, sys
text, profile = open(sys.argv[1]).read(), sys.argv[2]
rates = []
for suffix, size in (("", 512), ("-sdxl", 1024), ("-fewstep", 512)):
    section = re.search(rf"^## Shard worker in-process vs bare loop, {profile}{suffix} profile, compile.*?(?=^## |\Z)",
                        text, re.M | re.S)
    bare = section and re.search(r"^\| bare \| ([\d.]+) \|", section.group(0), re.M)
    if bare:
        rates.append(f"{size}:{max(1, round(float(bare.group(1))))}")
print(",".join(rates) or "512:7")
EOF
}
# the device-busy matrix: images/s ÷ the bare loop's (compiled alike) is the device's busy share
step "busy sd15" $PYTHON worker_loop.py --profile $PROFILE --rows ${BUSY_ROWS[0]} --models "$MODELS" $BUSY
step "busy fewstep" $PYTHON worker_loop.py --profile $PROFILE-fewstep --rows ${BUSY_ROWS[1]} --models "$MODELS" $BUSY
step "busy sdxl" $PYTHON worker_loop.py --profile $PROFILE-sdxl --rows ${BUSY_ROWS[2]} --models "$MODELS" $BUSY
step "busy emulated" $PYTHON device_busy.py --in-process --no-s3 --rates "$(bare_rates)" $EMULATED
step "gpu stages" $PYTHON gpu_stages.py --profile $PROFILE --models "$MODELS"
# Outside the budget (ONLY="..." names them): the GPU JPEG test, the encode ceiling, each speed option,
# step caching, quantisation, model.offload (issue #26) and actors sharing one GPU (1/n: 1, 2 and 4).
extra "gpu jpeg test" 100 bash -c "cd .. && $PYTHON -m pytest -x -q -p no:cacheprovider tests/test_device_jpeg.py"
extra "encode ceiling" 90 $PYTHON encode_ceiling.py --images $IMAGES
extra "worker vs bare" 200 $PYTHON worker_loop.py --profile $PROFILE --rows $WORKER_ROWS --repeats 1
extra "speed options" 180 $PYTHON speed_options.py --profile $PROFILE --rows $ROWS --repeats 1
extra "step caching" 120 $PYTHON step_cache.py --profile $PROFILE --rows $ROWS --repeats 1
extra "quantisation" 100 $PYTHON quantization.py --profile $PROFILE --rows $QUANT_ROWS --repeats 1
extra "offload" 200 $PYTHON offload.py --profile $PROFILE --rows $IMAGES
extra "fractional gpus" 240 $PYTHON fractional_gpu.py --profile $PROFILE --rows $SHARE_ROWS --repeats 1
echo "=== summary ($SECONDS s of a budget of $((BUDGET * SLOWER)) s)"
printf '%s\n' "${SUMMARY[@]}"
grep -E "^\| |^## " "$BENCHMARKS_FILE" | grep -A12 -E "^## .*(, $PROFILE(-sdxl|-fewstep)? profile, compile|on the device|emulated)" | head -80
