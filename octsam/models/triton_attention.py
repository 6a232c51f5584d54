"""Fused attention with SAM's decomposed relative-position bias added on the fly, in Triton (forward and backward).

SAM's global attention scores are ``s[i, j] = scale * q_i . k_j + rh[i, row(j)] + rw[i, col(j)]`` with
``rh = q . Rh`` and ``rw = q . Rw`` (``octsam.models.fast_attention``). The fold there makes the bias part of a wider dot
product (head dim 64 -> 192 at ViT-B 1024), which a flash kernel runs but at three times the q.k (and, padded, p.v)
work. This kernel keeps head dim 64 and adds the two bias terms to each score tile, FlashAttention-2 style:

- keys are tiled one grid row at a time (``BLOCK_N`` = grid width, e.g. 64), so a key tile has a single
  ``row(j)``: its ``rh`` term is one column ``rh[:, row]`` broadcast along the tile, its ``rw`` term the query
  block's whole ``rw`` tile, loaded once;
- backward without atomics: the program that owns a query block walks every key tile, so ``d rh[i, row]`` is the
  row sum of that tile's ``dS`` (written once) and ``d rw[i, :]`` is the sum of the ``dS`` tiles (kept in registers);
  a second kernel per key tile accumulates ``dK`` and ``dV``.

Only global layers whose grid width is a power of two between 16 and 128 qualify (64 at ViT-B/L/H 1024); windowed
layers (14 x 14 windows) keep the fold, whose overhead there is small. The ops are ``torch.library`` custom ops, so
``torch.compile`` and autograd treat them as one opaque kernel each. Without a GPU the kernels run under Triton's
interpreter (``TRITON_INTERPRET=1``, set before import), which is how CPU tests check them against transformers.
"""

from __future__ import annotations

import contextlib
import math

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton ships with CUDA builds of torch
    triton = None

__all__ = ["AVAILABLE", "qualifies", "relpos_attention"]

AVAILABLE = triton is not None
_LOG2E = 1.4426950408889634


def qualifies(query: torch.Tensor, grid_h: int, grid_w: int) -> bool:
    """Whether the kernel handles this layer: Triton present, a CUDA tensor (or the interpreter), grid width a power
    of two in [16, 128], head dim a power of two in [16, 128]."""
    import os

    if not AVAILABLE:
        return False
    if query.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return False
    head_dim = query.shape[-1]

    def pow2(x: int, lo: int, hi: int) -> bool:
        return lo <= x <= hi and x & (x - 1) == 0

    return (
        query.dtype in (torch.float16, torch.bfloat16, torch.float32)
        and pow2(grid_w, 16, 128)
        and pow2(head_dim, 16, 128)
        and grid_h >= 1
    )


if AVAILABLE:

    @triton.jit
    def _fwd_kernel(
        Q, K, V, RH, RW, OUT, LSE,
        sqz, sqh, sqn, skz, skh, skn, svz, svh, svn, soz, soh, son,
        srz, srh, srn, swz, swh, swn,
        H, N, GH, qk_scale,
        BLOCK_M: tl.constexpr, GW: tl.constexpr, D: tl.constexpr, PRECISION: tl.constexpr,
    ):  # fmt: skip
        start_m = tl.program_id(0)
        zh = tl.program_id(1).to(tl.int64)  # batch x head offsets pass 2**31 at large batches
        z = zh // H
        h = zh % H
        offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, GW)
        offs_d = tl.arange(0, D)
        mask_m = offs_m < N
        q = tl.load(Q + z * sqz + h * sqh + offs_m[:, None] * sqn + offs_d[None, :], mask=mask_m[:, None], other=0.0)
        rw = tl.load(RW + z * swz + h * swh + offs_m[:, None] * swn + offs_n[None, :], mask=mask_m[:, None], other=0.0)
        rw = rw.to(tl.float32) * 1.4426950408889634
        rh_ptrs = RH + z * srz + h * srh + offs_m * srn
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, D], tl.float32)
        for row in range(0, GH):
            keys = row * GW + offs_n
            k = tl.load(K + z * skz + h * skh + keys[:, None] * skn + offs_d[None, :])
            v = tl.load(V + z * svz + h * svh + keys[:, None] * svn + offs_d[None, :])
            rh = tl.load(rh_ptrs + row, mask=mask_m, other=0.0).to(tl.float32) * 1.4426950408889634
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale + rh[:, None] + rw  # log2 domain
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            m_i = m_new
        acc = acc / l_i[:, None]
        tl.store(
            OUT + z * soz + h * soh + offs_m[:, None] * son + offs_d[None, :],
            acc.to(OUT.dtype.element_ty),
            mask=mask_m[:, None],
        )
        tl.store(LSE + zh * N + offs_m, m_i + tl.log2(l_i), mask=mask_m)  # log2 of the softmax denominator

    @triton.jit
    def _bwd_dkdv_kernel(
        Q, K, V, RH, RW, DO, LSE, DELTA, DK, DV,
        sqz, sqh, sqn, skz, skh, skn, svz, svh, svn, sdz, sdh, sdn,
        srz, srh, srn, swz, swh, swn,
        H, N, sm_scale,
        BLOCK_M: tl.constexpr, GW: tl.constexpr, D: tl.constexpr, PRECISION: tl.constexpr,
    ):  # fmt: skip
        row = tl.program_id(0)  # one key tile = one grid row
        zh = tl.program_id(1).to(tl.int64)  # batch x head offsets pass 2**31 at large batches
        z = zh // H
        h = zh % H
        offs_n = tl.arange(0, GW)
        offs_d = tl.arange(0, D)
        keys = row * GW + offs_n
        k = tl.load(K + z * skz + h * skh + keys[:, None] * skn + offs_d[None, :])
        v = tl.load(V + z * svz + h * svh + keys[:, None] * svn + offs_d[None, :])
        dk = tl.zeros([GW, D], tl.float32)
        dv = tl.zeros([GW, D], tl.float32)
        qk_scale = sm_scale * 1.4426950408889634
        for start_m in range(0, N, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            mask_m = offs_m < N
            q = tl.load(
                Q + z * sqz + h * sqh + offs_m[:, None] * sqn + offs_d[None, :], mask=mask_m[:, None], other=0.0
            )
            do = tl.load(
                DO + z * sdz + h * sdh + offs_m[:, None] * sdn + offs_d[None, :], mask=mask_m[:, None], other=0.0
            )
            rh = tl.load(RH + z * srz + h * srh + offs_m * srn + row, mask=mask_m, other=0.0).to(tl.float32)
            rw = tl.load(
                RW + z * swz + h * swh + offs_m[:, None] * swn + offs_n[None, :], mask=mask_m[:, None], other=0.0
            )
            lse = tl.load(LSE + zh * N + offs_m, mask=mask_m, other=float("inf"))
            delta = tl.load(DELTA + zh * N + offs_m, mask=mask_m, other=0.0)
            s = (
                tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
                + (rh[:, None] + rw.to(tl.float32)) * 1.4426950408889634
            )
            p = tl.exp2(s - lse[:, None])  # (BLOCK_M, GW); rows past N give exp2(-inf) = 0
            dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PRECISION)
            dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
            ds = p * (dp - delta[:, None])
            dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PRECISION)
        tl.store(DK + zh * N * D + keys[:, None] * D + offs_d[None, :], (dk * sm_scale).to(DK.dtype.element_ty))
        tl.store(DV + zh * N * D + keys[:, None] * D + offs_d[None, :], dv.to(DV.dtype.element_ty))

    @triton.jit
    def _bwd_dq_kernel(
        Q, K, V, RH, RW, DO, LSE, DELTA, DQ, DRH, DRW,
        sqz, sqh, sqn, skz, skh, skn, svz, svh, svn, sdz, sdh, sdn,
        srz, srh, srn, swz, swh, swn,
        H, N, GH, sm_scale,
        BLOCK_M: tl.constexpr, GW: tl.constexpr, D: tl.constexpr, PRECISION: tl.constexpr,
    ):  # fmt: skip
        start_m = tl.program_id(0)
        zh = tl.program_id(1).to(tl.int64)  # batch x head offsets pass 2**31 at large batches
        z = zh // H
        h = zh % H
        offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, GW)
        offs_d = tl.arange(0, D)
        mask_m = offs_m < N
        q = tl.load(Q + z * sqz + h * sqh + offs_m[:, None] * sqn + offs_d[None, :], mask=mask_m[:, None], other=0.0)
        do = tl.load(DO + z * sdz + h * sdh + offs_m[:, None] * sdn + offs_d[None, :], mask=mask_m[:, None], other=0.0)
        rw = tl.load(RW + z * swz + h * swh + offs_m[:, None] * swn + offs_n[None, :], mask=mask_m[:, None], other=0.0)
        rw = rw.to(tl.float32) * 1.4426950408889634
        lse = tl.load(LSE + zh * N + offs_m, mask=mask_m, other=float("inf"))
        delta = tl.load(DELTA + zh * N + offs_m, mask=mask_m, other=0.0)
        rh_ptrs = RH + z * srz + h * srh + offs_m * srn
        qk_scale = sm_scale * 1.4426950408889634
        dq = tl.zeros([BLOCK_M, D], tl.float32)
        drw = tl.zeros([BLOCK_M, GW], tl.float32)
        for row in range(0, GH):
            keys = row * GW + offs_n
            k = tl.load(K + z * skz + h * skh + keys[:, None] * skn + offs_d[None, :])
            v = tl.load(V + z * svz + h * svh + keys[:, None] * svn + offs_d[None, :])
            rh = tl.load(rh_ptrs + row, mask=mask_m, other=0.0).to(tl.float32) * 1.4426950408889634
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale + rh[:, None] + rw
            p = tl.exp2(s - lse[:, None])
            dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
            ds = p * (dp - delta[:, None])
            dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
            tl.store(DRH + zh * N * GH + offs_m * GH + row, tl.sum(ds, 1).to(DRH.dtype.element_ty), mask=mask_m)
            drw += ds
        tl.store(DQ + zh * N * D + offs_m[:, None] * D + offs_d[None, :], (dq * sm_scale).to(DQ.dtype.element_ty),
                 mask=mask_m[:, None])  # fmt: skip
        tl.store(DRW + zh * N * GW + offs_m[:, None] * GW + offs_n[None, :], drw.to(DRW.dtype.element_ty),
                 mask=mask_m[:, None])  # fmt: skip


def _precision(q: torch.Tensor) -> str:
    """fp32 products in full precision unless TF32 is allowed (as torch's matmuls); bf16/fp16 are exact anyway."""
    return "tf32" if q.dtype != torch.float32 or torch.backends.cuda.matmul.allow_tf32 else "ieee"


#: Launch configuration on CUDA (not tuned yet: ``benchmarks/throughput.py --layer-bench`` times a few others by
#: changing this dict). ``block_m``: query rows per program (the interpreter uses it too: fewer, larger NumPy
#: blocks are what makes it bearable there).
#: One backward pipeline stage: with two, ptxas reports its Hopper tensor-core (wgmma) instructions serialized in
#: both backward kernels (warning C7515, found compiling for sm_90a without a GPU).
LAUNCH = {"block_m": 64, "num_warps": 4, "fwd_stages": 3, "bwd_stages": 1}


def _block_m(device: torch.device) -> int:
    return LAUNCH["block_m"]


def _launch(device: torch.device, stages: str) -> dict:
    return {"num_warps": LAUNCH["num_warps"], "num_stages": LAUNCH[stages]} if device.type == "cuda" else {}


def _strides(t: torch.Tensor) -> tuple[int, int, int]:
    return t.stride(0), t.stride(1), t.stride(2)


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _device_guard(t: torch.Tensor):
    """Triton launches on the current CUDA device: make it the tensors' one."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


@torch.library.custom_op("octsam::relpos_attention_fwd", mutates_args=())
def _relpos_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rh: torch.Tensor, rw: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    q, k, v, rh, rw = (_last_dim_contiguous(t) for t in (q, k, v, rh, rw))
    z, h, n, d = q.shape
    gh, gw = rh.shape[-1], rw.shape[-1]
    out = torch.empty((z, h, n, d), device=q.device, dtype=q.dtype)
    lse = torch.empty((z, h, n), device=q.device, dtype=torch.float32)
    block_m = _block_m(q.device)
    grid = (triton.cdiv(n, block_m), z * h)
    with _device_guard(q):
        _fwd_kernel[grid](
            q, k, v, rh, rw, out, lse,
            *_strides(q), *_strides(k), *_strides(v), *_strides(out), *_strides(rh), *_strides(rw),
            h, n, gh, scale * _LOG2E,
            BLOCK_M=block_m, GW=gw, D=d, PRECISION=_precision(q),
            **_launch(q.device, "fwd_stages"),
        )  # fmt: skip
    return out, lse


@_relpos_fwd.register_fake
def _(q, k, v, rh, rw, scale):
    z, h, n, d = q.shape
    return q.new_empty((z, h, n, d)), q.new_empty((z, h, n), dtype=torch.float32)


@torch.library.custom_op("octsam::relpos_attention_bwd", mutates_args=())
def _relpos_bwd(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    rh: torch.Tensor,
    rw: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    q, k, v, rh, rw, grad_out = (_last_dim_contiguous(t) for t in (q, k, v, rh, rw, grad_out))
    lse = lse.contiguous()  # the kernels index it as (z * h, n)
    z, h, n, d = q.shape
    gh, gw = rh.shape[-1], rw.shape[-1]
    delta = (grad_out.float() * out.float()).sum(-1).contiguous()  # (z, h, n)
    dq = torch.empty((z, h, n, d), device=q.device, dtype=q.dtype)
    dk = torch.empty((z, h, n, d), device=q.device, dtype=k.dtype)
    dv = torch.empty((z, h, n, d), device=q.device, dtype=v.dtype)
    drh = torch.empty((z, h, n, gh), device=q.device, dtype=rh.dtype)
    drw = torch.empty((z, h, n, gw), device=q.device, dtype=rw.dtype)
    block_m = _block_m(q.device)
    launch = _launch(q.device, "bwd_stages")
    common = (*_strides(q), *_strides(k), *_strides(v), *_strides(grad_out), *_strides(rh), *_strides(rw))
    with _device_guard(q):
        _bwd_dkdv_kernel[(gh, z * h)](
            q, k, v, rh, rw, grad_out, lse, delta, dk, dv, *common, h, n, scale,
            BLOCK_M=block_m, GW=gw, D=d, PRECISION=_precision(q), **launch,
        )  # fmt: skip
        _bwd_dq_kernel[(triton.cdiv(n, block_m), z * h)](
            q, k, v, rh, rw, grad_out, lse, delta, dq, drh, drw, *common, h, n, gh, scale,
            BLOCK_M=block_m, GW=gw, D=d, PRECISION=_precision(q), **launch,
        )  # fmt: skip
    return dq, dk, dv, drh, drw


@_relpos_bwd.register_fake
def _(grad_out, q, k, v, rh, rw, out, lse, scale):
    return (
        torch.empty_like(q, memory_format=torch.contiguous_format),
        torch.empty_like(q, memory_format=torch.contiguous_format),
        torch.empty_like(q, memory_format=torch.contiguous_format),
        rh.new_empty(rh.shape),
        rw.new_empty(rw.shape),
    )


def _setup_context(ctx, inputs, output):
    q, k, v, rh, rw, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, rh, rw, out, lse)
    ctx.scale = scale


def _backward(ctx, grad_out, grad_lse):
    q, k, v, rh, rw, out, lse = ctx.saved_tensors
    dq, dk, dv, drh, drw = _relpos_bwd(grad_out, q, k, v, rh, rw, out, lse, ctx.scale)
    return dq, dk, dv, drh, drw, None


_relpos_fwd.register_autograd(_backward, setup_context=_setup_context)


def relpos_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, rel_h: torch.Tensor, rel_w: torch.Tensor, scale: float
) -> torch.Tensor:
    """``softmax(scale * q k^T + rel_h[..., row(key)] + rel_w[..., col(key)]) v`` for (Z, H, N, D) inputs with
    ``N = grid_h * grid_w`` row-major tokens, ``rel_h`` (Z, H, N, grid_h), ``rel_w`` (Z, H, N, grid_w)."""
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale}")
    z, h, n, _ = query.shape
    if not (
        query.dtype == key.dtype == value.dtype
        and query.shape == key.shape == value.shape
        and rel_h.shape[:3] == rel_w.shape[:3] == (z, h, n)
        and rel_h.shape[-1] * rel_w.shape[-1] == n
        and query.device == key.device == value.device == rel_h.device == rel_w.device
    ):  # a mismatch would read out of bounds on the GPU, which can poison the CUDA context
        raise ValueError(
            "relpos_attention: query, key and value must share dtype, shape and device, and rel_h (Z, H, N, grid_h) "
            f"and rel_w (Z, H, N, grid_w) need grid_h * grid_w == N; got {tuple(query.shape)}, "
            f"{tuple(key.shape)}, {tuple(value.shape)}, {tuple(rel_h.shape)}, {tuple(rel_w.shape)}"
        )
    return _relpos_fwd(query, key, value, rel_h, rel_w, float(scale))[0]
