"""octsam.models.triton_attention: the fused kernel with SAM's decomposed relative-position bias, forward and backward,
against plain PyTorch and against transformers' SAM layers (run by Triton's interpreter on the CPU; see conftest)."""

from __future__ import annotations

import os

import pytest
import torch
from conftest import random_rel_pos_sam, rel_err
from peft import LoraConfig, get_peft_model

pytest.importorskip("triton")

from octsam.models import triton_attention  # noqa: E402
from octsam.models.fast_attention import enable_fast_attention  # noqa: E402

TOL = 1e-5
pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
    reason="needs a CUDA GPU or TRITON_INTERPRET=1 before octsam.models.triton_attention is imported",
)


def reference(q, k, v, rh, rw, scale):
    z, h, n, _ = q.shape
    bias = (rh[..., :, None] + rw[..., None, :]).reshape(z, h, n, n)
    return torch.softmax(q @ k.transpose(-1, -2) * scale + bias, dim=-1) @ v


@pytest.mark.parametrize(("grid_h", "grid_w", "head_dim"), [(3, 16, 16), (5, 32, 32)])
def test_op_matches_pytorch_forward_and_backward(grid_h, grid_w, head_dim):
    gen = torch.Generator().manual_seed(grid_h)
    z, h, n = 2, 2, grid_h * grid_w

    def leaf(*shape):
        return torch.randn(*shape, generator=gen).requires_grad_(True)

    q, k, v = leaf(z, h, n, head_dim), leaf(z, h, n, head_dim), leaf(z, h, n, head_dim)
    rh, rw = leaf(z, h, n, grid_h), leaf(z, h, n, grid_w)
    scale = head_dim**-0.5
    ref = reference(q, k, v, rh, rw, scale)
    out = triton_attention.relpos_attention(q, k, v, rh, rw, scale)
    assert rel_err(out, ref) <= TOL
    grad = torch.randn(ref.shape, generator=gen)
    for g_new, g_ref in zip(
        torch.autograd.grad(out, (q, k, v, rh, rw), grad), torch.autograd.grad(ref, (q, k, v, rh, rw), grad)
    ):
        assert rel_err(g_new, g_ref) <= TOL


def test_op_half_precision_is_as_accurate_as_pytorch():
    """fp16 inputs (the casts of the bf16 path; Triton's interpreter cannot multiply bf16, so bf16 itself is
    checked on a GPU by benchmarks/throughput.py --check-exact): error against the fp32 result no larger than
    PyTorch's own fp16 attention's."""
    gen = torch.Generator().manual_seed(4)
    shapes = [(1, 2, 48, 16)] * 3 + [(1, 2, 48, 3), (1, 2, 48, 16)]
    exact = [torch.randn(*shape, generator=gen).requires_grad_(True) for shape in shapes]
    half = [t.detach().half().requires_grad_(True) for t in exact]
    ref = reference(*exact, 0.25)
    grad = torch.randn(ref.shape, generator=gen)
    ref_grads = torch.autograd.grad(ref, exact, grad)

    def errors(fn):
        out = fn(*half, 0.25)
        assert out.dtype == torch.float16
        grads = torch.autograd.grad(out, half, grad.half())
        return [rel_err(out.float(), ref)] + [rel_err(g.float(), r) for g, r in zip(grads, ref_grads)]

    kernel, pytorch = errors(triton_attention.relpos_attention), errors(reference)
    assert max(kernel) <= 2 * max(pytorch), (kernel, pytorch)


def test_op_takes_strided_views():
    """q/k/v as views of one fused qkv projection (what the SAM layer passes), no copies asked of the caller."""
    gen = torch.Generator().manual_seed(3)
    qkv = torch.randn(2, 16 * 2, 3, 2, 16, generator=gen)  # (batch, tokens, 3, heads, head_dim)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    assert not q.is_contiguous()
    rh, rw = torch.randn(2, 2, 32, 2, generator=gen), torch.randn(2, 2, 32, 16, generator=gen)
    out = triton_attention.relpos_attention(q, k, v, rh, rw, 0.25)
    assert rel_err(out, reference(q, k, v, rh, rw, 0.25)) <= TOL


def small_sam(seed: int = 0):
    """A SAM whose global layer qualifies (16 x 16 grid, head dim 16) and whose windowed layer does not (window 5
    pads the grid to 20 x 20), with random non-zero relative-position tables."""
    return random_rel_pos_sam(image=32, window_size=5, hidden=32, heads=2, mlp_dim=64, seed=seed)


def out_and_grads(encoder, pixels, weight):
    params = [p for p in encoder.parameters() if p.requires_grad]
    x = pixels.clone().requires_grad_(True)
    out = encoder(x).last_hidden_state
    return out.detach(), torch.autograd.grad((out * weight).sum(), [x, *params])


def count_kernel_calls(monkeypatch) -> list[int]:
    calls = [0]
    original = triton_attention.relpos_attention

    def spy(*args, **kwargs):
        calls[0] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(triton_attention, "relpos_attention", spy)
    return calls


@pytest.mark.parametrize("lora", [False, True], ids=["plain", "lora"])
def test_sam_encoder_matches_transformers(lora, monkeypatch):
    """Mode ``triton``: the global layer runs the kernel, the windowed one falls back; outputs and the gradients
    of the input and every trainable parameter (rel-pos tables, qkv or LoRA) match transformers."""
    model = small_sam()
    if lora:
        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["qkv"]))
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.normal_(0, 0.2)
    encoder = model.base_model.model.vision_encoder if lora else model.vision_encoder
    torch.manual_seed(1)
    pixels, weight = torch.randn(1, 3, 32, 32), torch.randn(1, 32, 16, 16)
    ref_out, ref_grads = out_and_grads(encoder, pixels, weight)
    calls = count_kernel_calls(monkeypatch)
    assert enable_fast_attention(model, mode="triton") == 2
    out, grads = out_and_grads(encoder, pixels, weight)
    assert calls[0] == 1, "the global layer (and only it) must run the Triton kernel"
    assert rel_err(out, ref_out) <= TOL
    for g_new, g_ref in zip(grads, ref_grads):
        assert g_ref.abs().sum() > 0
        assert rel_err(g_new, g_ref) <= TOL


def test_compiles_as_one_opaque_op():
    """torch.compile (Dynamo + AOTAutograd, fullgraph: a graph break fails) sees the kernel as a custom op with a
    fake implementation and a registered backward."""
    model = small_sam()
    enable_fast_attention(model, mode="triton")
    block = model.vision_encoder.layers[1]
    x = torch.randn(1, 16, 16, 32)
    torch._dynamo.reset()
    compiled = torch.compile(block, backend="aot_eager", fullgraph=True)
    results = []
    for fn in (block, compiled):
        xi = x.clone().requires_grad_(True)
        out = fn(xi)
        results.append((out.detach(), torch.autograd.grad(out.sum(), [xi, *block.parameters()])))
    assert rel_err(results[1][0], results[0][0]) <= TOL
    for a, b in zip(results[1][1], results[0][1]):
        assert rel_err(a, b) <= TOL


def test_mismatched_inputs_are_refused_before_any_kernel():
    q = torch.zeros(1, 2, 48, 16)
    with pytest.raises(ValueError, match="grid_h \\* grid_w"):
        triton_attention.relpos_attention(q, q, q, torch.zeros(1, 2, 48, 3), torch.zeros(1, 2, 48, 15), 0.25)
    with pytest.raises(ValueError, match="dtype, shape and device"):
        triton_attention.relpos_attention(q, q.half(), q, torch.zeros(1, 2, 48, 3), torch.zeros(1, 2, 48, 16), 0.25)


def test_qualifies():
    q = torch.zeros(1, 1, 4, 64)
    assert triton_attention.qualifies(q, 64, 64)
    assert not triton_attention.qualifies(q.double(), 64, 64)  # fp64 has no tensor-core dot
    assert not triton_attention.qualifies(q, 14, 14)  # windowed layers keep the fold
    assert not triton_attention.qualifies(torch.zeros(1, 1, 4, 80), 64, 64)  # ViT-H's head dim 80
