#!/usr/bin/env bash
# Issue 13 GPU check, one prepared run (H100 or H200): what a user gets by default, beside transformers' default.
#   1. the throughput table, ViT-B at 1024, batch 16, bf16, LoRA r16 on qkv: transformers' default, the fold
#      (fast:fold_flash, yesterday's default), and today's default (fast = auto: Triton in the global layers, the
#      fold in the windowed ones) compiled, with a profile of its training step by kernel category
#                                                                          -> $OUT/gpu_throughput.md
#   2. the real loop: train.py --config configs/amd.yaml (random ViT-B base, synthetic AMD dataset of 432
#      training B-scans at 768 x 496, 8 workers, LoRA dropout 0.1), 2 epochs, images/s per epoch from the loop's
#      own log and all_results.json                                        -> $OUT/gpu_loop.md
#   3. end-to-end inference.py on 2,000 synthetic 768 x 496 PNG B-scans: read / predict / write per B-scan,
#      B-scans/s in steady state, model load and compile apart             -> $OUT/gpu_e2e.md
#   4. graph breaks (torch._dynamo.explain) and device-to-host syncs of the compiled DDP training step
#                                                                          -> $OUT/gpu_compile.md
# Optional parts (not in the default PARTS; measured before): "checks" (exactness + layer bench), "loader".
# Logs: $OUT/log_*.txt; versions and card: $OUT/gpu_info.txt.
# Wall time: about 8-9 minutes on an H200; every part has its own timeout (sum 580 s), a part cut short keeps
# what it wrote. The random base, the dataset and the PNGs are made on the CPU while part 1 runs on the GPU.
#
# Run from the repository root:  bash benchmarks/gpu_check.sh      (PARTS="table e2e" ... runs a subset)
# CPU dry run (tiny model, seconds to minutes, compiles nothing on the CPU):
#   MODEL=tiny IMAGE=24 BATCH=2 VARIANTS=default,fast PROFILE=fast SCANS=8 PATIENTS=6 PER_PATIENT=2 SPLIT=0.67,0.17,0.16 \
#     LOOP_EXTRA="--num-workers 0 --per-device-train-batch-size 2 --effective-batch-size 2" COMPILE_BATCH=2 \
#     PYTHON=/path/to/.venv/bin/python OUT=/tmp/o bash benchmarks/gpu_check.sh
# Wheels in WHEELS=.whl/ (see benchmarks/RESULTS.md, "Running the GPU check"): the "core" group (transformers, peft,
# regex), the "hf" group (datasets and MONAI, which the GPU image lacks: the real loop needs them) and the "data" group
# (albumentations and its needs, for the real loop's augmentation and the loader part) are each installed to
# $SITE/site_<group> and used only if they import; otherwise the machine's own packages are used.
set -u
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 NO_ALBUMENTATIONS_UPDATE=1
OUT=${OUT:-$PWD/gpu_out}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
PY=${PYTHON:-python3}
REPO=$PWD
export PYTHONPATH=$REPO
WORK=${WORK:-/tmp/octsam_gpu_check}
mkdir -p "$WORK"
T_TABLE=${T_TABLE:-190}
T_LOOP=${T_LOOP:-160}
T_E2E=${T_E2E:-130}
T_COMPILE=${T_COMPILE:-100}
T_CHECKS=${T_CHECKS:-100}
T_LOADER=${T_LOADER:-30}
MODEL=${MODEL:-vit-base}
IMAGE=${IMAGE:-1024}
BATCH=${BATCH:-16}
VARIANTS=${VARIANTS:-default,fast:fold_flash,fast+compile}
PROFILE=${PROFILE:-fast+compile}
SCANS=${SCANS:-2000}
PATIENTS=${PATIENTS:-120}
PER_PATIENT=${PER_PATIENT:-4}
SPLIT=${SPLIT:-0.9,0.05,0.05}  # 108 / 6 / 6 patients: 432 training, 24 validation, 24 test B-scans
LOOP_CONFIG=${LOOP_CONFIG:-configs/amd.yaml}
LOOP_EPOCHS=${LOOP_EPOCHS:-2}
LOOP_EXTRA=${LOOP_EXTRA:-}
COMPILE_BATCH=${COMPILE_BATCH:-16}
PARTS=${PARTS:-table loop e2e compile}  # a subset runs only those parts
want() { [[ " $PARTS " == *" $1 "* ]]; }
LOADER_WORKERS=${LOADER_WORKERS:-4,8,16}
LOADER_IMAGES=${LOADER_IMAGES:-1024}

# Carried wheels (WHEELS, default .whl/), in independent groups: each is installed to $SITE/site_<group> and used only
# if it installs and imports. SITE defaults to /tmp; a folder in the repository (e.g. SITE=$PWD/.devsite, ignored)
# stays for the next call on a warm device machine (benchmarks/gpu_duke.sh reuses it).
WHEELS=${WHEELS:-.whl}
SITE=${SITE:-/tmp}
install_group() {  # name, import check, wheel globs...
    local name=$1 check=$2
    shift 2
    local wheels=()
    for w in "$@"; do [ -e "$w" ] && wheels+=("$w"); done
    [ ${#wheels[@]} -eq 0 ] && return
    echo "== installing $name wheels: ${wheels[*]##*/}"
    if $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE/site_$name" \
        "${wheels[@]}" && PYTHONPATH="$SITE/site_$name:$PYTHONPATH" $PY -c "$check"; then
        export PYTHONPATH="$SITE/site_$name:$PYTHONPATH"
    else
        echo "!! $name wheels did not install or import; using the machine's packages"
    fi
}
W=$WHEELS
install_group core "import transformers, peft" $W/transformers-*.whl $W/peft-*.whl $W/regex-*.whl
# the GPU image has neither datasets nor MONAI (dataset_builder and the loop need both)
install_group hf "import datasets, monai, natsort" $W/datasets-*.whl $W/dill-*.whl $W/multiprocess-*.whl \
    $W/monai-*.whl $W/natsort-*.whl
install_group data "import albumentations" $W/albumentations-*.whl $W/albucore-*.whl $W/pydantic-*.whl \
    $W/pydantic_core-*.whl $W/annotated_types-*.whl $W/typing_inspection-*.whl $W/typing_extensions-*.whl \
    $W/stringzilla-*.whl $W/simsimd-*.whl

{
    date -u
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm,temperature.gpu --format=csv 2>&1
    echo "CPUs: $(nproc); $(grep -m1 'model name' /proc/cpuinfo)"
    $PY - <<'EOF'
import torch, transformers, peft
cuda = torch.cuda.is_available()
print("torch", torch.__version__, "cuda", torch.version.cuda, "device", torch.cuda.get_device_name(0) if cuda else "cpu")
print("transformers", transformers.__version__, transformers.__file__)
print("peft", peft.__version__)
for name in ("datasets", "pyarrow", "monai", "albumentations", "accelerate", "huggingface_hub"):
    try:
        module = __import__(name)
        print(name, module.__version__)
    except Exception as error:
        print(name, "not importable:", type(error).__name__, error)
try:
    import triton
    print("triton", triton.__version__)
except ImportError:
    print("triton: not importable")
EOF
} 2>&1 | tee "$OUT/gpu_info.txt"

# CPU-side preparation in the background while part 1 uses the GPU: a random base of MODEL's architecture (the
# machine has no network) and the synthetic dataset of the real loop.
BASE=$WORK/base-$MODEL
DATA=$WORK/amd-synthetic-$PATIENTS-$PER_PATIENT
(
    if [ ! -f "$BASE/config.json" ]; then
        $PY - "$MODEL" "$BASE" <<'EOF'
import sys, torch
from transformers import SamConfig, SamModel
from octsam.models.sam import save_random_base
model, path = sys.argv[1:]
if model == "tiny":
    save_random_base(path)
else:
    torch.manual_seed(0)
    SamModel(SamConfig()).save_pretrained(path)
print("random base written to", path)
EOF
    fi
    if want loop && [ ! -f "$DATA/dataset_dict.json" ]; then
        $PY -m dataset_builder synthetic --disease amd --num-patients "$PATIENTS" --scans-per-patient "$PER_PATIENT" \
            --size 768x496 --split "$SPLIT" --seed 0 --output "$DATA" --overwrite
    fi
) > "$OUT/log_prepare.txt" 2>&1 &
PREP=$!

if want table; then
echo "== 1/4 throughput table (timeout ${T_TABLE}s)"
timeout -k 10 "$T_TABLE" $PY benchmarks/throughput.py --model "$MODEL" --image-size "$IMAGE" --batch-size "$BATCH" \
    --variants "$VARIANTS" --warmup "${WARMUP:-3}" --steps "${STEPS:-10}" --profile "$PROFILE" --out "$OUT/gpu_throughput.md" \
    2>&1 | tee "$OUT/log_throughput.txt"
echo "== table exit status ${PIPESTATUS[0]}"
fi

wait $PREP
echo "== preparation exit status $? (log_prepare.txt)"
tail -3 "$OUT/log_prepare.txt"

if want loop; then
echo "== 2/4 the real loop: train.py --config $LOOP_CONFIG, $LOOP_EPOCHS epochs (timeout ${T_LOOP}s)"
rm -rf "$WORK/loop_run"
if ! $PY -c "import albumentations" 2>/dev/null; then
    echo "!! albumentations is not importable (carry the data wheels): the loop runs with --no-augment" \
        | tee "$OUT/loop_note.txt"
    LOOP_EXTRA="$LOOP_EXTRA --no-augment"
fi
timeout -k 10 "$T_LOOP" $PY train.py --config "$LOOP_CONFIG" --dataset "$DATA" --base-model "$BASE" \
    --output-dir "$WORK/loop_run" --num-train-epochs "$LOOP_EPOCHS" --early-stopping-patience 0 \
    --evaluate-test false --report-to none --keep-checkpoints 0 $LOOP_EXTRA 2>&1 | tee "$OUT/log_loop.txt"
echo "== loop exit status ${PIPESTATUS[0]}"
$PY - "$WORK/loop_run" "$LOOP_CONFIG" "$OUT/log_loop.txt" "$LOOP_EXTRA" > "$OUT/gpu_loop.md" <<'EOF'
import json, sys
from pathlib import Path
run, config, log, extra = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3]), sys.argv[4]
lines = [f"The real loop, `train.py --config {config} {extra}` (random base, synthetic AMD dataset), from its own log:", ""]
states = sorted(run.glob("checkpoints/*/trainer_state.json"))
history = json.loads(states[-1].read_text())["history"] if states else []
lines += ["| epoch | training images/s | after the epoch's first step | train loss |", "| ---: | ---: | ---: | ---: |"]
for h in history:
    lines.append(f"| {h['epoch']} | {h['train_images_per_s']:.1f} | {h['train_images_per_s_after_first_step']:.1f} | {h['train_loss']:.4f} |")
results = run / "all_results.json"
if results.is_file():
    lines += ["", "all_results.json: " + json.dumps({k: v for k, v in json.loads(results.read_text()).items() if "images" in k or "compile" in k})]
lines += ["", "Log lines:", ""] + ["    " + l for l in log.read_text().splitlines() if "images/s" in l or "torch.compile" in l or "attention:" in l]
print("\n".join(lines))
EOF
cat "$OUT/gpu_loop.md"
fi

if want e2e; then
echo "== 3/4 end-to-end inference.py on $SCANS synthetic 768x496 PNG B-scans (timeout ${T_E2E}s)"
timeout -k 10 "$T_E2E" $PY benchmarks/end_to_end.py --base "$BASE" --scans "$SCANS" --out "$OUT/gpu_e2e.md" \
    2>&1 | tee "$OUT/log_e2e.txt"
echo "== e2e exit status ${PIPESTATUS[0]}"
fi

if want compile; then
echo "== 4/4 graph breaks and host syncs of the compiled DDP step (timeout ${T_COMPILE}s)"
timeout -k 10 "$T_COMPILE" $PY benchmarks/compile_check.py --model "$BASE" --batch-size "$COMPILE_BATCH" \
    --out "$OUT/gpu_compile.md" 2>&1 | tee "$OUT/log_compile.txt"
echo "== compile exit status ${PIPESTATUS[0]}"
fi

if want checks; then
echo "== (optional) exactness and attention kernels (timeout ${T_CHECKS}s)"
timeout -k 10 "$T_CHECKS" $PY benchmarks/throughput.py --model "$MODEL" --image-size "$IMAGE" --batch-size "$BATCH" \
    --variants none --check-exact --layer-bench --layer-steps 10 --out "$OUT/gpu_checks.md" \
    2>&1 | tee "$OUT/log_checks.txt"
echo "== checks exit status ${PIPESTATUS[0]}"
fi

if want loader; then
echo "== (optional) data loader alone, workers $LOADER_WORKERS (timeout ${T_LOADER}s)"
timeout -k 10 "$T_LOADER" $PY benchmarks/throughput.py --variants none --dataloader synthetic --workers "$LOADER_WORKERS" \
    --loader-images "$LOADER_IMAGES" --batch-size "$BATCH" --out "$OUT/gpu_loader.md" 2>&1 | tee "$OUT/log_loader.txt"
fi

for f in gpu_throughput gpu_loop gpu_e2e gpu_compile gpu_checks gpu_loader; do
    [ -f "$OUT/$f.md" ] || continue
    echo
    echo "================ $OUT/$f.md"
    cat "$OUT/$f.md"
done
