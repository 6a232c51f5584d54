#!/usr/bin/env bash
# Issue 6 GPU check, one prepared run (H100 or H200): SAM ViT-B at 1024, batch 16, bf16, LoRA r16 on qkv.
#   1. the throughput table: transformers' default attention, octsam's fast attention, fast + torch.compile
#      (training and merged inference, peak memory, model TFLOP/s)        -> $OUT/gpu_throughput.md
#   2. exactness of the fast path on the GPU (fp32 and bf16) and one global / one windowed layer per attention
#      kernel (flash, memory-efficient, cuDNN)                               -> $OUT/gpu_checks.md
# Logs: $OUT/log_throughput.txt, $OUT/log_checks.txt; versions and card: $OUT/gpu_info.txt.
# Wall time: about 4-6 minutes on an H200 (the compile variant takes most); each part has its own timeout, so the
# whole script ends within ~8 minutes even if a part hangs, and a part cut short keeps the rows it finished.
#
# Run from the repository root:  bash benchmarks/gpu_check.sh
# Optional wheels in .whl/ (transformers, peft, regex: the versions the CPU tests ran) are installed to /tmp/site
# first; without them, or if they do not import, the machine's own transformers/peft are used.
set -u
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
OUT=${OUT:-$PWD/gpu_out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
REPO=$PWD
export PYTHONPATH=$REPO
T_TABLE=${T_TABLE:-330}
T_CHECKS=${T_CHECKS:-120}
# CPU dry run of this script: MODEL=tiny IMAGE=24 BATCH=2 VARIANTS=default,fast PYTHON=.venv/bin/python OUT=/tmp/o
MODEL=${MODEL:-vit-base}
IMAGE=${IMAGE:-1024}
BATCH=${BATCH:-16}
VARIANTS=${VARIANTS:-default,fast,fast+compile}

if ls .whl/*.whl >/dev/null 2>&1; then
    echo "== installing $(ls .whl | tr '\n' ' ')"
    if $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && PYTHONPATH=/tmp/site:$REPO $PY -c "import transformers, peft" 2>/dev/null; then
        export PYTHONPATH=/tmp/site:$REPO
    else
        echo "!! carried wheels did not install or import; using the machine's packages"
    fi
fi

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

echo "== 1/2 throughput table (timeout ${T_TABLE}s)"
timeout -k 10 "$T_TABLE" $PY benchmarks/throughput.py --model "$MODEL" --image-size "$IMAGE" --batch-size "$BATCH" \
    --variants "$VARIANTS" --warmup 3 --steps 10 --out "$OUT/gpu_throughput.md" \
    2>&1 | tee "$OUT/log_throughput.txt"
echo "== table exit status ${PIPESTATUS[0]}"

echo "== 2/2 exactness and attention kernels (timeout ${T_CHECKS}s)"
timeout -k 10 "$T_CHECKS" $PY benchmarks/throughput.py --model "$MODEL" --image-size "$IMAGE" --batch-size "$BATCH" \
    --variants none --check-exact --layer-bench --layer-steps 10 --out "$OUT/gpu_checks.md" \
    2>&1 | tee "$OUT/log_checks.txt"
echo "== checks exit status ${PIPESTATUS[0]}"

echo
echo "================ $OUT/gpu_throughput.md"
cat "$OUT/gpu_throughput.md" 2>/dev/null || echo "(missing)"
echo
echo "================ $OUT/gpu_checks.md"
cat "$OUT/gpu_checks.md" 2>/dev/null || echo "(missing)"
