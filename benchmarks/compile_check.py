"""Graph breaks and host syncs of the compiled DDP training step that ``train.py`` runs by default on CUDA.

Builds the training model as ``train.py`` does (``OctSamModel.from_base``: LoRA on ``qkv``, decoder and class
prompts trained, fast attention ``auto``), wraps it in DDP with the loop's settings (one process: gloo on the CPU,
NCCL on a GPU; ``find_unused_parameters=False``, ``static_graph=True``, ``gradient_as_bucket_view=True``), and

1. runs ``torch._dynamo.explain`` on the DDP module's forward: graphs, graph breaks and their reasons (0 breaks
   and 1 graph is the goal: a break splits the step and adds a host round trip);
2. on CUDA, compiles the DDP module (``torch.compile``, inductor, as the loop does), runs warm-up steps, then one
   forward + backward + optimizer step under ``torch.cuda.set_sync_debug_mode("warn")``: every device-to-host sync
   in the steady step is reported (the goal is 0; the loop itself syncs once per epoch, after its first step).

    python benchmarks/compile_check.py --model tiny                       # CPU, seconds (bias attention)
    TRITON_INTERPRET=1 python benchmarks/compile_check.py --model tiny --attention triton   # CPU, Triton op
    python benchmarks/compile_check.py --model vit-base --batch-size 16   # H100/H200: the real step

Prints a markdown report (also to ``--out``). A check, not a test: the exit status is 0 even with breaks.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.common import log  # noqa: E402


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def build(args, folder: Path, device: torch.device):
    from transformers import SamConfig, SamModel

    from octsam.adapter import OctSamConfig
    from octsam.models.fast_attention import enable_fast_attention
    from octsam.models.sam import OctSamModel, save_random_base

    if args.model == "tiny":
        base = save_random_base(folder / "base")
    elif args.model == "vit-base":
        torch.manual_seed(0)
        SamModel(SamConfig()).save_pretrained(folder / "base")
        base = str(folder / "base")
    else:
        base = args.model
    model = OctSamModel.from_base(
        OctSamConfig(labels=["background", "a", "b", "c"], base_model=base, lora_dropout=0.1)
    )
    enable_fast_attention(model, mode=args.attention)
    return model.to(device).train()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="tiny", help="tiny, vit-base or a SamModel folder")
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--attention", default="auto", help="fast-attention mode (auto: what train.py uses)")
    p.add_argument("--steps", type=int, default=3, help="compiled warm-up steps before the sync check (CUDA)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    cuda = device.type == "cuda"
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    torch.distributed.init_process_group("nccl" if cuda else "gloo", rank=0, world_size=1)
    lines = []
    try:
        with tempfile.TemporaryDirectory(prefix="octsam-compile-") as tmp:
            model = build(args, Path(tmp), device)
        from torch.nn.parallel import DistributedDataParallel as DDP

        ddp = DDP(
            model,
            device_ids=[device.index or 0] if cuda else None,
            find_unused_parameters=False,
            static_graph=True,
            gradient_as_bucket_view=True,
        )
        size = model.config.image_size
        pixels = torch.randn(args.batch_size, 3, size, size, device=device)
        amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        lines.append(
            f"Compiled DDP training step, {args.model} at {size}, batch {args.batch_size}, attention "
            f"{args.attention}, {device.type} ({torch.cuda.get_device_name(device) if cuda else 'CPU'}), torch "
            f"{torch.__version__}; trainable {trainable:,} parameters = {4 * trainable / 1e6:.1f} MB of fp32 "
            "gradients all-reduced per step (one 25 MB DDP bucket when below 25 MB)."
        )
        log("torch._dynamo.explain on the DDP forward")
        torch._dynamo.reset()
        with amp:
            explanation = torch._dynamo.explain(ddp)(pixels)
        lines += [
            "",
            f"`torch._dynamo.explain`: {explanation.graph_count} graph(s), {explanation.graph_break_count} graph "
            f"break(s), {explanation.op_count} ops.",
        ]
        for reason in explanation.break_reasons:
            where = reason.user_stack[-1] if reason.user_stack else ""
            lines.append(f"- break: {reason.reason} at {where}")
        if cuda:
            log(f"compiling the DDP module (inductor) and {args.steps} warm-up steps")
            torch._dynamo.reset()
            compiled = torch.compile(ddp)
            optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, fused=True)

            def step():
                with amp:
                    logits, _ = compiled(pixels)
                loss = logits.float().square().mean()
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)

            t0 = time.perf_counter()
            step()
            torch.cuda.synchronize()
            compile_s = time.perf_counter() - t0
            for _ in range(args.steps):
                step()
            torch.cuda.synchronize()
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")
                try:
                    step()
                finally:
                    torch.cuda.set_sync_debug_mode("default")
            torch.cuda.synchronize()
            syncs = [str(w.message).splitlines()[0] for w in caught if "synchroniz" in str(w.message).lower()]
            lines += [
                "",
                f"Compiled step (inductor): first step {compile_s:.1f} s (compilation); steady step under "
                f"`set_sync_debug_mode('warn')`: {len(syncs)} device-to-host sync(s).",
            ]
            lines += [f"- sync: {s}" for s in sorted(set(syncs))]
    finally:
        torch.distributed.destroy_process_group()
    text = "\n".join(lines) + "\n"
    print("\n" + text)
    if args.out:
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    warnings.filterwarnings("ignore", category=FutureWarning)
    sys.exit(main())
