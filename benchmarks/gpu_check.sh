#!/usr/bin/env bash
# Issue 6 GPU check, one prepared run (H100 or H200): SAM ViT-B at 1024, batch 16, bf16, LoRA r16 on qkv.
#   1. the throughput table: transformers' default attention, octsam's fast attention (auto: the fold), fast +
#      torch.compile, the fused Triton kernel (mode triton) plain and compiled (training and merged inference,
#      peak memory, model TFLOP/s), then a profile of one compiled training step of the fold and of the Triton
#      kernel (device time by kernel category and the top kernels)           -> $OUT/gpu_throughput.md
#   1b. merged inference with FlexAttention (mode flex: the bias added per score at head dim 64), plain and
#      compiled, beside the default                                          -> $OUT/gpu_flex.md
#   2. exactness of the fast path on the GPU (fp32 and bf16, flex included) and one global / one windowed layer
#      per attention kernel (flash, memory-efficient, cuDNN, flex)           -> $OUT/gpu_checks.md
#   3. the data loader alone with 4, 8, 16 workers (needs albumentations)   -> $OUT/gpu_loader.md
# Logs: $OUT/log_*.txt; versions and card: $OUT/gpu_info.txt (this writes 9 files).
# Wall time: about 6-8 minutes on an H200 (the compile variants take most); each part has its own timeout, so the
# whole script ends within ~10 minutes even if a part hangs, and a part cut short keeps the rows it finished.
#
# Run from the repository root:  bash benchmarks/gpu_check.sh   (PARTS="table checks" ... runs a subset)
# Optional wheels in .whl/ (see benchmarks/RESULTS.md, "Running the GPU check"): the "core" group (transformers, peft,
# regex: the versions the CPU tests ran) and the "data" group (albumentations and its needs, for part 3) are each
# installed to /tmp/site_<group> and used only if they import; otherwise the machine's own packages are used.
set -u
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 NO_ALBUMENTATIONS_UPDATE=1
OUT=${OUT:-$PWD/gpu_out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
REPO=$PWD
export PYTHONPATH=$REPO
T_TABLE=${T_TABLE:-300}
T_FLEX=${T_FLEX:-140}
T_CHECKS=${T_CHECKS:-100}
T_LOADER=${T_LOADER:-30}
# CPU dry run of this script: MODEL=tiny IMAGE=24 BATCH=2 VARIANTS=default,fast FLEX_VARIANTS=default,fast:flex PROFILE=fast \
#   LOADER_WORKERS=0,1 LOADER_IMAGES=32 \
#   PYTHON=.venv/bin/python OUT=/tmp/o bash benchmarks/gpu_check.sh
MODEL=${MODEL:-vit-base}
IMAGE=${IMAGE:-1024}
BATCH=${BATCH:-16}
VARIANTS=${VARIANTS:-default,fast,fast+compile,fast:triton,fast:triton+compile}
FLEX_VARIANTS=${FLEX_VARIANTS:-default,fast:flex,fast:flex+compile}
PROFILE=${PROFILE:-fast+compile,fast:triton+compile}
PARTS=${PARTS:-table flex checks loader}  # a subset runs only those parts
want() { [[ " $PARTS " == *" $1 "* ]]; }
LOADER_WORKERS=${LOADER_WORKERS:-4,8,16}
LOADER_IMAGES=${LOADER_IMAGES:-1024}

# Carried wheels, two independent groups: each is used only if it installs and imports.
install_group() {  # name, import check, wheel globs...
    local name=$1 check=$2
    shift 2
    local wheels=()
    for w in "$@"; do [ -e "$w" ] && wheels+=("$w"); done
    [ ${#wheels[@]} -eq 0 ] && return
    echo "== installing $name wheels: ${wheels[*]##*/}"
    if $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "/tmp/site_$name" \
        "${wheels[@]}" && PYTHONPATH="/tmp/site_$name:$PYTHONPATH" $PY -c "$check"; then
        export PYTHONPATH="/tmp/site_$name:$PYTHONPATH"
    else
        echo "!! $name wheels did not install or import; using the machine's packages"
    fi
}
install_group core "import transformers, peft" .whl/transformers-*.whl .whl/peft-*.whl .whl/regex-*.whl
install_group data "import albumentations" .whl/albumentations-*.whl .whl/albucore-*.whl .whl/pydantic-*.whl \
    .whl/pydantic_core-*.whl .whl/annotated_types-*.whl .whl/typing_inspection-*.whl .whl/typing_extensions-*.whl \
    .whl/stringzilla-*.whl .whl/simsimd-*.whl

{
    date -u
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm,temperature.gpu --format=csv
    nproc
    $PY - <<'EOF'
import torch, transformers, peft
cuda = torch.cuda.is_available()
print("torch", torch.__version__, "cuda", torch.version.cuda, "device", torch.cuda.get_device_name(0) if cuda else "cpu")
print("transformers", transformers.__version__, transformers.__file__)
print("peft", peft.__version__)
EOF
} 2>&1 | tee "$OUT/gpu_info.txt"

if want table; then
echo "== 1/3 throughput table (timeout ${T_TABLE}s)"
timeout -k 10 "$T_TABLE" $PY benchmarks/throughput.py --model "$MODEL" --image-size "$IMAGE" --batch-size "$BATCH" \
    --variants "$VARIANTS" --warmup 3 --steps 10 --profile "$PROFILE" --out "$OUT/gpu_throughput.md" \
    2>&1 | tee "$OUT/log_throughput.txt"
echo "== table exit status ${PIPESTATUS[0]}"
fi

if want flex; then
echo "== 1b/3 inference with FlexAttention (timeout ${T_FLEX}s)"
timeout -k 10 "$T_FLEX" $PY benchmarks/throughput.py --model "$MODEL" --image-size "$IMAGE" --batch-size "$BATCH" \
    --variants "$FLEX_VARIANTS" --what infer --warmup 3 --steps 10 --out "$OUT/gpu_flex.md" \
    2>&1 | tee "$OUT/log_flex.txt"
echo "== flex exit status ${PIPESTATUS[0]}"
fi

if want checks; then
echo "== 2/3 exactness and attention kernels (timeout ${T_CHECKS}s)"
timeout -k 10 "$T_CHECKS" $PY benchmarks/throughput.py --model "$MODEL" --image-size "$IMAGE" --batch-size "$BATCH" \
    --variants none --check-exact --layer-bench --layer-steps 10 --out "$OUT/gpu_checks.md" \
    2>&1 | tee "$OUT/log_checks.txt"
echo "== checks exit status ${PIPESTATUS[0]}"
fi

if want loader; then
echo "== 3/3 data loader alone, workers $LOADER_WORKERS (timeout ${T_LOADER}s)"
if $PY -c "import albumentations" 2>/dev/null; then
    timeout -k 10 "$T_LOADER" $PY benchmarks/throughput.py --variants none --dataloader synthetic --workers "$LOADER_WORKERS" \
        --loader-images "$LOADER_IMAGES" --batch-size "$BATCH" --out "$OUT/gpu_loader.md" 2>&1 | tee "$OUT/log_loader.txt"
else
    echo "albumentations is not importable here: data-loader part skipped (carry the data wheels, see RESULTS.md)" \
        | tee "$OUT/gpu_loader.md"
fi
fi

echo
echo "================ $OUT/gpu_throughput.md"
cat "$OUT/gpu_throughput.md" 2>/dev/null || echo "(missing)"
echo
echo "================ $OUT/gpu_flex.md"
cat "$OUT/gpu_flex.md" 2>/dev/null || echo "(missing)"
echo
echo "================ $OUT/gpu_checks.md"
cat "$OUT/gpu_checks.md" 2>/dev/null || echo "(missing)"
echo
echo "================ $OUT/gpu_loader.md"
cat "$OUT/gpu_loader.md" 2>/dev/null || echo "(missing)"
