"""Training and inference throughput of SAM + LoRA: transformers' default attention against octsam's fast path.

Every variant runs in the same process on the same device with the same random weights and inputs, and the result
is ONE markdown table (printed last, and written to ``--out``):

- training step: SamModel (image encoder + prompt encoder + mask decoder) forward and backward, LoRA on ``qkv``
  (base frozen), mask decoder trained (PEFT ``modules_to_save``), AdamW (fused on CUDA), bf16 autocast on CUDA and
  fp32 on the CPU, one box prompt per image, BCE on the low-resolution mask plus MSE on the IoU score;
- inference: the LoRA merged with ``merge_and_unload``, ``torch.inference_mode``, one box per image;
- achieved TFLOP/s: *model* FLOPs (counted once with ``torch.utils.flop_counter.FlopCounterMode`` on transformers'
  path, attention through the math backend so that every product is counted, bias and padding not) divided by each
  variant's time. The fast path does more arithmetic than that (its q.k product is wider); it is not credited.

Variants: ``default`` (transformers' SDPA attention), ``fast`` (``octsam.models.fast_attention`` in ``--fast-mode``),
``fast:MODE`` (that mode, e.g. ``fast:fold_flash``), ``+compile`` on any (``torch.compile`` of the whole model, compile
time excluded: it happens in the warm-up steps).

Examples::

    python benchmarks/throughput.py --model tiny --device cpu                     # smoke test, seconds
    python benchmarks/throughput.py --model vit-base --batch-size 16              # H100/H200: the issue-6 table
    python benchmarks/throughput.py --model vit-base --device cpu --what infer --batch-size 1 --steps 2 --warmup 1
    python benchmarks/throughput.py --check-exact --layer-bench --variants none   # GPU exactness + attention kernels
    python benchmarks/throughput.py --dataloader synthetic --workers 0,1,2 --variants none   # data loader alone
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import math
import os
import sys
import time
import traceback
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as ``python benchmarks/throughput.py`` from anywhere
    sys.path.insert(0, str(REPO))

from benchmarks.common import cpu_name, log  # noqa: E402
from octsam.models import triton_attention  # noqa: E402
from octsam.models.fast_attention import MODES, disable_fast_attention, enable_fast_attention  # noqa: E402

GIB = 1024**3


# --------------------------------------------------------------------------------------------------- model and data


def sam_config(model: str, image_size: int | None):
    """``tiny``: the team's test config; ``vit-base``: ``SamConfig()`` defaults, which are SAM ViT-B; anything else:
    the ``SamConfig`` of that folder or Hub id (another base, e.g. LiteMedSAM), with random weights."""
    from transformers import SamConfig, SamMaskDecoderConfig, SamPromptEncoderConfig, SamVisionConfig

    if model == "tiny":
        size = image_size or 24
        vision = SamVisionConfig(
            hidden_size=36,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=size,
            patch_size=2,
            output_channels=32,
            global_attn_indexes=[1],
            window_size=4,
            mlp_dim=72,
            num_pos_feats=16,
            initializer_range=0.02,
        )
        prompt = SamPromptEncoderConfig(hidden_size=32, image_size=size, patch_size=2, mask_input_channels=8)
        decoder = SamMaskDecoderConfig(hidden_size=32, mlp_dim=64, num_attention_heads=4, iou_head_hidden_dim=32)
    elif model == "vit-base":
        size = image_size or 1024
        # initializer_range: transformers' default 1e-10 gives near-zero weights; speed does not care,
        # but the exactness check does.
        vision = SamVisionConfig(image_size=size, initializer_range=0.02)
        prompt = SamPromptEncoderConfig(image_size=size)
        decoder = SamMaskDecoderConfig()
    else:  # another base (e.g. LiteMedSAM once it lands): its config, random weights
        try:
            config = SamConfig.from_pretrained(model)
        except Exception as err:  # noqa: BLE001 - any loading problem is a usage error here
            raise SystemExit(f"--model {model!r}: not tiny, vit-base or a SamModel folder/Hub id ({err})") from err
        if image_size:
            config.vision_config.image_size = config.prompt_encoder_config.image_size = image_size
        config.vision_config.initializer_range = 0.02
        config._attn_implementation = "sdpa"
        config.vision_config._attn_implementation = "sdpa"
        return config
    config = SamConfig(vision_config=vision, prompt_encoder_config=prompt, mask_decoder_config=decoder)
    config._attn_implementation = "sdpa"
    config.vision_config._attn_implementation = "sdpa"
    return config


def build_sam(config, device: torch.device, seed: int = 0):
    """A random SamModel on ``device`` with non-zero relative-position tables (random SAM has zeros there)."""
    from transformers import SamModel

    torch.manual_seed(seed)
    with torch.device(device):
        model = SamModel(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "rel_pos" in name:
                param.normal_(0, 0.1)
    return model


def add_lora(model, rank: int, dropout: float = 0.0):
    """LoRA r on the image encoder's ``qkv``, the mask decoder fully trained, everything else frozen."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=rank, lora_alpha=rank, lora_dropout=dropout, target_modules=["qkv"], modules_to_save=["mask_decoder"]
    )
    return get_peft_model(model, config)


def make_batch(config, batch_size: int, device: torch.device, seed: int = 0) -> dict[str, torch.Tensor]:
    size = config.vision_config.image_size
    low_res = 4 * config.prompt_encoder_config.image_embedding_size
    gen = torch.Generator().manual_seed(seed)
    corners = torch.rand(batch_size, 1, 2, 2, generator=gen) * size
    boxes = torch.cat([corners.amin(2), corners.amax(2)], dim=-1)  # (B, 1, 4) x1 y1 x2 y2
    return {
        "pixel_values": torch.randn(batch_size, 3, size, size, generator=gen).to(device),
        "input_boxes": boxes.to(device),
        "target": (torch.rand(batch_size, 1, 1, low_res, low_res, generator=gen) > 0.5).float().to(device),
        "iou_target": torch.rand(batch_size, 1, 1, generator=gen).to(device),
    }


def autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def loss_of(model, batch, amp) -> torch.Tensor:
    with amp:
        out = model(pixel_values=batch["pixel_values"], input_boxes=batch["input_boxes"], multimask_output=False)
    masks, iou = out.pred_masks.float(), out.iou_scores.float()
    return F.binary_cross_entropy_with_logits(masks, batch["target"]) + F.mse_loss(iou, batch["iou_target"])


def infer(model, batch, amp):
    with amp:
        out = model(pixel_values=batch["pixel_values"], input_boxes=batch["input_boxes"], multimask_output=False)
    return out.pred_masks


# --------------------------------------------------------------------------------------------------- measurement


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, warmup: int, steps: int, device: torch.device) -> tuple[float, float]:
    """(wall, process CPU) seconds per call of ``fn`` over ``steps`` calls after ``warmup`` calls, the device
    synchronised around. Process CPU time is the fairer CPU figure on a machine that other work shares."""
    for i in range(warmup):
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        log(f"    warm-up {i + 1}/{warmup}: {time.perf_counter() - t0:.2f} s")
    synchronize(device)
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(steps):
        fn()
    synchronize(device)
    return (time.perf_counter() - t0) / steps, (time.process_time() - c0) / steps


#: Kernel-name patterns -> category, first match wins (CUDA kernel names of cuBLAS/CUTLASS, FlashAttention,
#: cuDNN, octsam's Triton attention, inductor's Triton kernels and aten's elementwise/copy kernels). Attention comes
#: first (the memory-efficient kernel is ``fmha_cutlass*``); cuBLAS's Hopper kernels are ``nvjet_*`` (no "gemm" in the
#: name), CUTLASS ones ``cutlass*``, inductor's product templates ``triton_tem_fused_mm_*``: all matrix products
#: (``tests/test_fast_attention.py`` pins these names).
_KERNEL_CATEGORIES = (
    (
        "attention",
        (
            "flash",
            "fmha",
            "attention",
            "cudnn_generated",
            "sdpa",
            "scaled_dot_product",
            "_fwd_kernel",  # octsam.models.triton_attention
            "_bwd_dkdv_kernel",
            "_bwd_dq_kernel",
        ),
    ),
    (
        "matrix products",
        ("nvjet", "cutlass", "gemm", "gemv", "xmma", "cublas", "matmul", "addmm", "bmm", "aten::mm", "_mm_", "conv"),
    ),
    ("copies / cat / layout", ("copy", "cat", "memcpy", "memset", "transpose", "permute", "fill")),
    ("optimizer", ("adam", "foreach", "multi_tensor")),
    ("normalisation / softmax", ("layer_norm", "layernorm", "softmax", "norm")),
    ("fused elementwise (triton)", ("triton_",)),
    ("elementwise", ("elementwise", "vectorized", "gelu", "add", "mul", "reduce")),
)


def kernel_category(name: str) -> str:
    """The profile category of a kernel (or CPU op) name: first pattern that matches, else ``other``."""
    low = name.lower()
    return next((c for c, pats in _KERNEL_CATEGORIES if any(p in low for p in pats)), "other")


def profile(fn, device: torch.device, steps: int = 2, top: int = 25) -> str:
    """Device time per call of ``fn`` by kernel (top ``top``) and by category, from ``torch.profiler``."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    synchronize(device)
    with torch_profile(activities=activities) as prof:
        for _ in range(steps):
            fn()
        synchronize(device)
    kernels = []
    for event in prof.key_averages():
        if device.type == "cuda":
            t = getattr(event, "self_device_time_total", None) or getattr(event, "self_cuda_time_total", 0)
            if event.device_type.name != "CUDA":
                continue
        else:
            t = event.self_cpu_time_total
            if not event.key.startswith("aten::"):
                continue
        if t > 0:
            kernels.append((event.key, t / 1e3 / steps, event.count // steps))
    kernels.sort(key=lambda k: -k[1])
    total = sum(k[1] for k in kernels) or 1.0
    categories: dict[str, float] = {}
    for name, ms, _ in kernels:
        cat = kernel_category(name)
        categories[cat] = categories.get(cat, 0.0) + ms
    lines = ["| category | ms per step | share |", "| --- | ---: | ---: |"]
    lines += [f"| {c} | {ms:.1f} | {ms / total:.0%} |" for c, ms in sorted(categories.items(), key=lambda c: -c[1])]
    lines += ["", "| kernel | calls per step | ms per step | share |", "| --- | ---: | ---: | ---: |"]
    for name, ms, calls in kernels[:top]:
        short = name if len(name) <= 90 else name[:87] + "..."
        lines.append(f"| `{short.replace('|', '/')}` | {calls} | {ms:.2f} | {ms / total:.1%} |")
    return "\n".join(lines)


def count_flops(fn) -> int:
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def model_flops(args, config, device: torch.device, amp) -> tuple[float, float]:
    """FLOPs per image of one training step and of one inference forward, on transformers' path at batch 1."""
    model = add_lora(build_sam(config, device), args.lora_rank, args.lora_dropout)
    batch = make_batch(config, 1, device)
    train = inference = math.nan
    if args.what in ("train", "both"):
        train = count_flops(lambda: loss_of(model, batch, amp).backward())
    merged = model.merge_and_unload().eval()
    if args.what in ("infer", "both"):
        with torch.inference_mode():
            inference = count_flops(lambda: infer(merged, batch, amp))
    return float(train), float(inference)


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / GIB if device.type == "cuda" else None


def run_variant(args, variant: str, config, device: torch.device, amp, row: dict, update) -> None:
    """Train, then infer with one variant, filling ``row`` (seconds per step/batch, peak memory) and calling
    ``update()`` after each part, so that a run stopped by a timeout keeps what it measured."""
    try:
        _run_variant(args, variant, config, device, amp, row, update)
    finally:
        free_memory(device)  # the model and its compiled graphs went out of scope with the call


def _run_variant(args, variant: str, config, device: torch.device, amp, row: dict, update) -> None:
    fast = variant.startswith("fast")
    compiled = variant.endswith("+compile")
    mode = variant.split("+")[0].partition(":")[2] or args.fast_mode
    torch._dynamo.reset()
    free_memory(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    model = add_lora(build_sam(config, device), args.lora_rank, args.lora_dropout)
    if fast:
        row["attention_modules"] = enable_fast_attention(model, mode=mode)
    batch = make_batch(config, args.batch_size, device)
    if args.what in ("train", "both"):
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-4, fused=device.type == "cuda")
        step_model = torch.compile(model, dynamic=False) if compiled else model

        def step():
            optimizer.zero_grad(set_to_none=True)
            loss = loss_of(step_model, batch, amp)
            loss.backward()
            optimizer.step()
            if "first_loss" not in row:  # one sync, in the first warm-up step only
                row["first_loss"] = loss.item()

        log(f"  {variant}: training, batch {args.batch_size}")
        row["step_s"], row["step_cpu_s"] = timed(step, args.warmup, args.steps, device)
        row["train_peak_gib"] = peak_gib(device)
        update()
        if variant in args.profile:
            log(f"  {variant}: profiling 2 training steps")
            row["profile"] = f"Profile of one `{variant}` training step (batch {args.batch_size}):\n\n" + profile(
                step, device
            )
        optimizer.state.clear()
        for p in params:
            p.grad = None
    merged = model.merge_and_unload().eval()  # keeps the fast attention classes
    if args.what in ("infer", "both"):
        free_memory(device)
        # On the CPU inductor freezes the weights for inference (constant folding, oneDNN pre-packing), as
        # octsam.segmenter.Segmenter.compile_encoder does.
        options = {"freezing": True} if device.type == "cpu" else None
        infer_model = torch.compile(merged, dynamic=False, options=options) if compiled else merged
        log(f"  {variant}: inference (LoRA merged), batch {args.batch_size}")
        with torch.inference_mode():
            row["infer_s"], row["infer_cpu_s"] = timed(
                lambda: infer(infer_model, batch, amp), args.warmup, args.steps, device
            )
        update()


def fmt(value, spec: str) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def table(rows: list[dict], args, flops: tuple[float, float] | None) -> str:
    base = next((r for r in rows if r["variant"] == "default" and "error" not in r), None)
    cpu = args.device.type == "cpu"
    cols = [
        "variant",
        "train img/s",
        "step ms",
        "peak GiB",
        "infer img/s",
        "infer ms/img",
        "train TFLOP/s",
        "infer TFLOP/s",
        "train x default",
        "infer x default",
    ]
    if cpu:  # process CPU time: robust to other load on a shared machine
        cols += ["step CPU-s", "infer CPU-s/img", "infer CPU-s x default"]
    lines = ["| " + " | ".join(cols) + " |", "| --- |" + " ---: |" * (len(cols) - 1)]
    bs = args.batch_size
    for r in rows:
        step, inf = r.get("step_s"), r.get("infer_s")
        if "error" in r and not (step or inf):
            lines.append(f"| {r['variant']} | failed: {r['error'][:100]} |" + " |" * (len(cols) - 2))
            continue
        train_tf = flops[0] * bs / step / 1e12 if flops and step and not math.isnan(flops[0]) else None
        infer_tf = flops[1] * bs / inf / 1e12 if flops and inf and not math.isnan(flops[1]) else None
        rt = base["step_s"] / step if base and step and base.get("step_s") else None
        ri = base["infer_s"] / inf if base and inf and base.get("infer_s") else None
        cells = [
            r["variant"] + (" (partly failed)" if "error" in r else ""),
            fmt(bs / step if step else None, ".3g"),
            fmt(step and step * 1e3, ".0f"),
            fmt(r.get("train_peak_gib"), ".1f"),
            fmt(bs / inf if inf else None, ".3g"),
            fmt(inf and inf * 1e3 / bs, ".1f"),
            fmt(train_tf, ".3g"),
            fmt(infer_tf, ".3g"),
            fmt(rt, ".2f"),
            fmt(ri, ".2f"),
        ]
        if cpu:
            icpu, bcpu = r.get("infer_cpu_s"), base and base.get("infer_cpu_s")
            cells += [
                fmt(r.get("step_cpu_s"), ".3g"),
                fmt(icpu and icpu / bs, ".3g"),
                fmt(bcpu / icpu if bcpu and icpu else None, ".2f"),
            ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def describe(args, device: torch.device, config, flops) -> str:
    import peft
    import transformers

    v = config.vision_config
    if device.type == "cuda":
        hw = f"{torch.cuda.get_device_name(device)}, CUDA {torch.version.cuda}"
    else:
        hw = f"CPU {cpu_name()}, {os.cpu_count()} logical CPUs, {torch.get_num_threads()} torch threads"
    dtype = "bf16 autocast" if args.amp == "bf16" else "fp32"
    lines = [
        f"{args.model} (hidden {v.hidden_size}, {v.num_hidden_layers} layers, image {v.image_size}), "
        f"batch {args.batch_size}, {dtype}, LoRA r{args.lora_rank} on qkv (dropout {args.lora_dropout:g}) + decoder trained, "
        f"{args.warmup} warm-up + {args.steps} timed steps, fast mode {args.fast_mode}",
        f"{hw}; torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}",
    ]
    if device.type == "cpu" and hasattr(os, "getloadavg"):
        lines.append(f"1-minute load average at the end: {os.getloadavg()[0]:.1f} (other processes share these CPUs)")
    if flops:
        parts = [f"{what} {value / 1e9:.4g} G" for what, value in zip(("training step", "inference"), flops)]
        counted = ", ".join(part for part, value in zip(parts, flops) if not math.isnan(value))
        lines.append(f"model FLOPs per image: {counted} (FlopCounterMode, transformers' path, math attention)")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------- extra checks


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def exactness(args, config, device: torch.device) -> str:
    """Image-encoder outputs and gradients (input, qkv weights, rel-pos tables) of the fast path against
    transformers' fp32 (no TF32) result, in fp32 and bf16 autocast; the bf16 default is the yardstick for bf16."""
    torch._dynamo.reset()
    batch = max(1, min(args.batch_size, 2))
    model = build_sam(config, device)
    encoder = model.vision_encoder
    gen = torch.Generator().manual_seed(5)
    size = config.vision_config.image_size
    x = torch.randn(batch, 3, size, size, generator=gen).to(device)
    watch = [p for n, p in encoder.named_parameters() if "qkv.weight" in n or "rel_pos" in n]
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False

    def run(dtype, grad=True):
        xi = x.clone().requires_grad_(grad)
        with autocast(device, dtype), torch.set_grad_enabled(grad):
            out = encoder(xi).last_hidden_state.float()
        w = torch.randn(out.shape, generator=torch.Generator().manual_seed(6)).to(device)
        grads = torch.autograd.grad((out * w).sum(), [xi, *watch])
        return out.detach(), torch.cat([g.flatten().float() for g in grads])

    try:
        ref = run(None)
        rows = ["| path | dtype | output rel. err | gradient rel. err |", "| --- | --- | ---: | ---: |"]
        cases = [("default", None, None), ("fast auto", "auto", None), ("fast fold", "fold", None)]
        if device.type == "cuda" or args.amp == "bf16":
            cases += [("default", None, torch.bfloat16), ("fast auto", "auto", torch.bfloat16)]
            cases += [("fast fold", "fold", torch.bfloat16), ("fast bias", "bias", torch.bfloat16)]
        if device.type == "cuda":
            cases += [("fast triton", "triton", None), ("fast triton", "triton", torch.bfloat16)]
        for name, mode, dtype in cases:
            disable_fast_attention(model)
            if mode:
                enable_fast_attention(model, mode=mode)
            try:
                out, grad = run(dtype)
                rows.append(
                    f"| {name} | {'bf16' if dtype else 'fp32'} | {rel_err(out, ref[0]):.2e} | {rel_err(grad, ref[1]):.2e} |"
                )
            except Exception as exc:  # one failing path keeps the others' rows
                log(traceback.format_exc())
                rows.append(f"| {name} | {'bf16' if dtype else 'fp32'} | failed: {exc!s:.80} | |")
            log("    " + rows[-1])
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    return (
        f"Exactness against transformers' fp32 image encoder (batch {batch}, image {size}, random rel-pos tables):\n\n"
        + "\n".join(rows)
    )


def layer_bench(args, config, device: torch.device, amp) -> str:
    """One global and one windowed ViT layer at the benchmark batch, per attention path and SDPA backend:
    forward + backward (training) and forward alone without gradients (inference)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from transformers.models.sam.modeling_sam import SamVisionLayer

    torch._dynamo.reset()
    v = config.vision_config
    grid = v.image_size // v.patch_size
    # (name, fast-attention mode, SDPA backend, Triton launch configuration)
    cases = [
        ("default", None, None, None),
        ("bias", "bias", None, None),
        ("fold", "fold", None, None),
        ("fold_flash", "fold_flash", None, None),
    ]
    if device.type == "cuda":
        cases += [
            ("fold (efficient)", "fold", SDPBackend.EFFICIENT_ATTENTION, None),
            ("fold (cudnn)", "fold", SDPBackend.CUDNN_ATTENTION, None),
            ("fold_flash (cudnn)", "fold_flash", SDPBackend.CUDNN_ATTENTION, None),
            ("triton", "triton", None, None),
        ]
        # other launch configurations of the Triton kernel: (query rows, warps, forward stages, backward stages)
        configs = ((128, 8, 3, 1), (64, 8, 3, 1), (64, 4, 3, 2))
        cases += [(f"triton {cfg}", "triton", None, cfg) for cfg in configs]
    rows = [
        "| layer | path | fwd+bwd ms | peak GiB | fwd ms (no grad) |",
        "| --- | --- | ---: | ---: | ---: |",
    ]
    for window in (0, v.window_size):
        label = "global" if window == 0 else f"window {window}"
        torch.manual_seed(0)
        with torch.device(device):
            layer = SamVisionLayer(v, window_size=window)
        x = torch.randn(args.batch_size, grid, grid, v.hidden_size, device=device)
        for name, mode, backend, launch in cases:
            disable_fast_attention(layer)
            if mode:
                enable_fast_attention(layer, mode=mode)
            if launch and window:
                continue  # windowed layers do not run the kernel

            def kernel(backend=backend):  # sdpa_kernel is a one-shot context manager: a fresh one per call
                return sdpa_kernel(backend) if backend is not None else contextlib.nullcontext()

            def step(kernel=kernel, layer=layer, x=x):
                xi = x.detach().requires_grad_(True)
                with kernel(), amp:
                    out = layer(xi)
                out.float().sum().backward()

            def forward(kernel=kernel, layer=layer, x=x):
                with torch.no_grad(), kernel(), amp:
                    layer(x)

            cells = []
            saved_launch = dict(triton_attention.LAUNCH)
            if launch:
                triton_attention.LAUNCH.update(zip(("block_m", "num_warps", "fwd_stages", "bwd_stages"), launch))
            try:
                for fn, warm in ((step, 2), (forward, 3)):
                    try:
                        free_memory(device)
                        if device.type == "cuda":
                            torch.cuda.reset_peak_memory_stats(device)
                        ms = timed(fn, warm, args.layer_steps, device)[0] * 1e3
                        cells += [f"{ms:.1f}"] + ([fmt(peak_gib(device), ".2f")] if fn is step else [])
                    except Exception as exc:  # a backend that refuses these shapes
                        cells += [f"failed: {exc!s:.60}"] + ([""] if fn is step else [])
            finally:
                triton_attention.LAUNCH.update(saved_launch)
            rows.append(f"| {label} | {name} | " + " | ".join(cells) + " |")
            log("    " + rows[-1])
        del layer, x
        free_memory(device)
    return f"One ViT layer, batch {args.batch_size}, grid {grid}x{grid}:\n\n" + "\n".join(rows)


class _PngSplit:
    """A list of (image PNG, mask PNG) bytes that decodes on access, as a ``datasets`` Image column does."""

    def __init__(self, pairs: list[tuple[bytes, bytes]]):
        self.pairs = pairs

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> dict:
        import io

        from PIL import Image

        image, mask = self.pairs[index]
        return {"image": Image.open(io.BytesIO(image)), "mask": Image.open(io.BytesIO(mask))}


def fake_bscan(rng, height: int = 496, width: int = 768):
    """A speckled, layered 768 x 496 B-scan and a fluid-like blob mask; its PNG (~290 KB) decodes a little slower
    than a real Duke DME one (~205 KB), so loader figures err low. Needs only numpy, OpenCV and PIL."""
    import cv2
    import numpy as np

    y = np.arange(height, dtype=np.float32)[:, None]
    x = np.arange(width, dtype=np.float32)[None, :]
    top = height * 0.3 + 20 * np.sin(x / width * 3 + rng.uniform(0, 6))
    refl = np.full((height, width), 0.1, np.float32)
    for offset, thickness, level in [(0, 40, 0.5), (40, 60, 0.3), (100, 15, 0.9), (115, 80, 0.4)]:
        refl += level * ((y >= top + offset) & (y < top + offset + thickness))
    image = cv2.GaussianBlur(255 * refl * rng.gamma(2.0, 0.5, (height, width)).astype(np.float32), (3, 3), 0.6)
    mask = ((y - top - 70) ** 2 / 400 + (x - width / 2) ** 2 / 4000 < 1).astype(np.uint8)
    return np.clip(image, 0, 255).astype(np.uint8), mask


def dataloader_bench(args) -> str:
    """Images/s of the training data pipeline alone: PNG decode, augmentation (flip, rotation, brightness/contrast
    at native size), resize to the input size, uint8 collate, pinned memory on CUDA machines."""
    import io

    import numpy as np
    from PIL import Image
    from torch.utils.data import DataLoader

    from octsam.data.augment import AugmentConfig
    from octsam.data.samples import SegmentationSamples, collate

    def png(array) -> bytes:
        buf = io.BytesIO()
        Image.fromarray(array).save(buf, format="PNG")
        return buf.getvalue()

    source = args.dataloader
    if source == "synthetic":
        rng = np.random.default_rng(0)
        split = _PngSplit([tuple(png(a) for a in fake_bscan(rng)) for _ in range(32)])
        what = "32 synthetic 768x496 PNG B-scans"
    elif (Path(source) / "images").is_dir():
        files = sorted((Path(source) / "images").glob("*.png"))
        split = _PngSplit([(f.read_bytes(), (Path(source) / "masks" / f.name).read_bytes()) for f in files])
        what = f"{len(split)} PNG B-scans from {source}"
    else:
        from octsam.data.dataset import load_oct_dataset

        split = load_oct_dataset(source)[0]["train"]
        what = f"train split of {source} ({len(split)} scans)"
    samples = SegmentationSamples(split, args.loader_size, 2, AugmentConfig(), None, seed=0)
    rows = ["| workers | images/s | ms per image per worker |", "| ---: | ---: | ---: |"]
    n_images = max(args.loader_images, 2 * args.batch_size)
    for workers in [int(w) for w in args.workers.split(",")]:
        sampler_epochs = math.ceil(n_images / len(samples)) + 2
        indices = [e * len(samples) + i for e in range(sampler_epochs) for i in range(len(samples))]
        loader = DataLoader(
            samples,
            batch_size=args.batch_size,
            sampler=indices,
            collate_fn=collate,
            num_workers=workers,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=False,
            prefetch_factor=4 if workers else None,
        )
        it = iter(loader)
        next(it)  # worker start-up and the first batch are not counted
        seen, t0 = 0, time.perf_counter()
        while seen < n_images:
            seen += next(it)["pixels"].shape[0]
        dt = time.perf_counter() - t0
        del it, loader
        rows.append(f"| {workers} | {seen / dt:.1f} | {dt / seen * 1e3 * max(workers, 1):.1f} |")
        log("    " + rows[-1])
    return f"Data loader alone ({what}, augmentation on, resized to {args.loader_size}, uint8):\n\n" + "\n".join(rows)


# --------------------------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--model",
        default="tiny",
        help="tiny, vit-base, or another base: a SamModel folder or Hub id (its config, random weights)",
    )
    p.add_argument("--image-size", type=int, default=None, help="default: 24 (tiny), 1024 (vit-base)")
    p.add_argument("--batch-size", type=int, default=None, help="default: 16 on CUDA, 2 on the CPU")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default: 10 on CUDA, 3 on the CPU)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default: 3 on CUDA, 1 on the CPU)")
    p.add_argument(
        "--variants",
        default=None,
        help="comma list of default, fast, default+compile, fast+compile; 'none' skips the table\n"
        "(default: default,fast,fast+compile on CUDA; default,fast on the CPU, where inductor takes minutes)",
    )
    p.add_argument("--compile", action="store_true", help="add the +compile twin of every variant")
    p.add_argument("--what", choices=["train", "infer", "both"], default="both")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    p.add_argument("--amp", choices=["auto", "bf16", "fp32"], default="auto", help="auto: bf16 on CUDA, fp32 on CPU")
    p.add_argument(
        "--fast-mode",
        default="auto",
        choices=MODES,
        help="octsam.models.fast_attention mode of the plain 'fast' variants",
    )
    p.add_argument("--lora-rank", type=int, default=16)
    p.add_argument(
        "--lora-dropout",
        type=float,
        default=0.0,
        help="LoRA dropout (0: PEFT's default and version 1's tables; train.py's AMD/DME/MH configs use 0.1)",
    )
    p.add_argument(
        "--profile",
        default="",
        help="comma-separated variants whose training step is profiled after timing (device time by kernel)",
    )
    p.add_argument("--no-flops", action="store_true", help="skip the FLOP count")
    p.add_argument("--check-exact", action="store_true", help="fast vs transformers, fp32 and bf16, first")
    p.add_argument("--layer-bench", action="store_true", help="one global and one windowed layer per kernel")
    p.add_argument("--layer-steps", type=int, default=10)
    p.add_argument(
        "--dataloader",
        default=None,
        help="benchmark the data loader on 'synthetic', a folder with "
        "images/ and masks/ PNGs, or a saved octsam dataset",
    )
    p.add_argument("--workers", default="0,1,2", help="data-loader worker counts to try")
    p.add_argument("--loader-images", type=int, default=256, help="images to time per worker count")
    p.add_argument("--loader-size", type=int, default=1024, help="input size the data loader resizes to")
    p.add_argument("--out", default=None, help="also write the markdown report here")
    args = p.parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    args.device = torch.device(args.device)
    cuda = args.device.type == "cuda"
    args.batch_size = args.batch_size or (16 if cuda else 2)
    args.steps = args.steps or (10 if cuda else 3)
    args.warmup = args.warmup if args.warmup is not None else (3 if cuda else 1)
    args.amp = ("bf16" if cuda else "fp32") if args.amp == "auto" else args.amp
    args.variants = args.variants or ("default,fast,fast+compile" if cuda else "default,fast")
    variants = [] if args.variants == "none" else [v.strip() for v in args.variants.split(",") if v.strip()]
    if args.compile:
        variants += [f"{v}+compile" for v in variants if not v.endswith("+compile")]
    for v in variants:
        base, _, mode = v.split("+")[0].partition(":")
        if (
            base not in ("default", "fast")
            or (mode and (base != "fast" or mode not in MODES))
            or v.count("+") > 1
            or ("+" in v and not v.endswith("+compile"))
        ):
            p.error(
                f"--variants: unknown variant {v!r} (default, fast, fast:MODE with MODE one of {', '.join(MODES)}, "
                "each optionally +compile)"
            )
    args.variants = variants
    args.profile = [v.strip() for v in args.profile.split(",") if v.strip()]
    for v in args.profile:
        if v not in variants:
            p.error(f"--profile: {v!r} is not one of the variants run ({', '.join(variants) or 'none'})")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = args.device
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    amp = autocast(device, torch.bfloat16 if args.amp == "bf16" else None)
    config = sam_config(args.model, args.image_size)
    args.image_size = config.vision_config.image_size
    extras: list[str] = []  # exactness, layer bench, data loader: each a markdown section
    rows: list[dict] = []
    flops = None
    out = Path(args.out) if args.out else None

    def emit(final: bool = False) -> None:
        """Write the report so far (a timeout keeps what was measured); print it at the end."""
        sections = [table(rows, args, flops), describe(args, device, config, flops)] if rows else []
        text = "\n\n".join(sections + extras) + "\n"
        if out:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(text)
        if final:
            print("\n" + text, flush=True)

    def section(title: str, fn) -> None:
        log(title)
        try:
            extras.append(fn())
        except Exception:
            log(traceback.format_exc())
            extras.append(f"{title} failed:\n\n```\n{traceback.format_exc()[-2000:]}```")
        emit()

    log(f"device {device}, model {args.model}, image {args.image_size}, batch {args.batch_size}, amp {args.amp}")
    if args.check_exact:
        section("exactness check", lambda: exactness(args, config, device))
    if args.variants and not args.no_flops:
        log("counting model FLOPs (batch 1, transformers' path)")
        try:
            flops = model_flops(args, config, device, amp)
        except Exception:
            log("FLOP count failed:\n" + traceback.format_exc())
    for variant in args.variants:
        log(f"variant {variant}")
        t0 = time.perf_counter()
        row = {"variant": variant}
        rows.append(row)
        try:
            run_variant(args, variant, config, device, amp, row, emit)
        except Exception as exc:
            log(traceback.format_exc())
            row["error"] = f"{type(exc).__name__}: {exc}".replace("|", "/").replace("\n", " ")
        if "profile" in row:
            extras.append(row.pop("profile"))
        log(f"  {variant}: done in {time.perf_counter() - t0:.0f} s: {row}")
        emit()
    if args.layer_bench:
        section("layer bench", lambda: layer_bench(args, config, device, amp))
    if args.dataloader:
        section("data loader bench", lambda: dataloader_bench(args))
    emit(final=True)
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # no network check on import
    warnings.filterwarnings("ignore", category=FutureWarning)  # peft calls transformers' deprecated names
    sys.exit(main())
