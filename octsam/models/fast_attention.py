"""Exact, faster attention for SAM's image encoder (transformers' ``SamVisionAttention``), switched in place.

SAM adds a decomposed relative-position bias to every attention score of its ViT:
``bias[(i, j), (a, b)] = q(i, j) . Rh[i - a] + q(i, j) . Rw[j - b]``. transformers materialises that bias as a
``(batch * heads, N, N)`` tensor (N = 4096 tokens in a global layer of ViT-B at 1024), which rules out
FlashAttention and costs 14 GiB per global layer at batch 16. The bias is a dot product, so it folds into the
attention's own dot product with extra dimensions::

    q' = [q, q . Rh[i - a] / scale for a in rows, q . Rw[j - b] / scale for b in columns, 0-padding]
    k' = [k, one_hot(row of key),                  one_hot(column of key),                0-padding]
    scale * (q' . k') = scale * (q . k) + bias

(the extra terms are divided by ``scale`` so that one ``scale`` applies to all; for power-of-two scales such as
ViT-B's 1/8 this is exact). ``F.scaled_dot_product_attention(q', k', v)`` then runs a flash or memory-efficient
kernel with no bias tensor at all. The head dimension grows from 64 to 64 + 64 + 64 = 192 in a global layer of
ViT-B at 1024 and to 64 + 14 + 14 -> 96 in a windowed one (padded to a multiple of 8).

Window partition, padding and un-partition are folded into the copies the fold makes anyway: the padded qkv
projection is read window by window straight into ``q'``/``k'``/``v'``, and the attention output is written
back to the image layout by the one copy that merges the heads.

The fold adds arithmetic (the q.k product is three times wider), which pays on a GPU, where the materialised
bias is the bottleneck, but not on a CPU, where matrix products are the bottleneck (benchmarks/RESULTS.md: 12.5 s instead of
10.5 s per B-scan). ``mode="auto"`` therefore, on CUDA, runs the fused Triton kernel
(``octsam.models.triton_attention``: the bias added per score tile at head dim 64) in the global layers it handles
and folds the others (windowed layers); elsewhere it adds the bias through SDPA's ``attn_mask`` exactly as
transformers does, without the window copies.

Parameter names, shapes and state-dict keys do not change (only the module classes are swapped), so PEFT LoRA
on ``qkv`` keeps wrapping the same ``nn.Linear`` and adapters load into either path. Switch before
``torch.compile`` and before wrapping in DDP.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.sam.modeling_sam import SamVisionAttention, SamVisionLayer

from octsam.errors import OctSamError
from octsam.models import ATTENTION_MODES

__all__ = ["MODES", "FastSamVisionAttention", "disable_fast_attention", "enable_fast_attention", "fast_attention_mode"]

#: ``auto``: on CUDA ``triton`` where a layer qualifies and otherwise ``fold_flash`` (fp16/bf16) or ``fold`` (fp32) -
#: the fastest exact combination measured on an H200 (benchmarks/RESULTS.md); ``bias`` elsewhere.
#: ``fold``: relative-position bias folded into q/k (value left at its own width: SDPA picks the
#: memory-efficient or cuDNN kernel). ``fold_flash``: same, with the value zero-padded to the q/k width so
#: that FlashAttention-2 qualifies (it needs equal head dims, at most 256). ``bias``: the bias is built as in
#: transformers and passed to SDPA as ``attn_mask``.
#: ``triton``: global layers whose grid width is a power of two (64 at 1024) run ``octsam.models.triton_attention``, a
#: fused kernel that adds the bias per score tile at the model's head dim, with its own backward (CUDA; Triton's
#: interpreter on the CPU); other layers fold (CUDA) or add the bias (elsewhere).
MODES = ATTENTION_MODES

_FLASH_MAX_HEAD_DIM = 256


def _round_up(value: int, multiple: int) -> int:
    return (value + multiple - 1) // multiple * multiple


def _rel_pos_table(rel_pos: torch.Tensor, size: int) -> torch.Tensor:
    """(size, size, dim) table ``R[i, a] = rel_pos[i - a + size - 1]``, as transformers' ``get_rel_pos``.

    transformers resizes the table with linear interpolation first; at the table's own length that is the
    identity (bit for bit), so it is skipped then.
    """
    length = 2 * size - 1
    if rel_pos.shape[0] != length:
        rel_pos = F.interpolate(rel_pos.reshape(1, rel_pos.shape[0], -1).transpose(1, 2), size=length, mode="linear")
        rel_pos = rel_pos.reshape(-1, length).permute(1, 0)
    coords = torch.arange(size, device=rel_pos.device)
    index = coords[:, None] - coords[None, :] + (size - 1)
    return rel_pos[index]


def _resolve_mode(mode: str, qkv: torch.Tensor) -> str:
    """``auto`` on CUDA is ``triton`` (the fastest exact path measured: forward checks per layer whether the kernel
    applies and folds otherwise); on other devices ``bias``."""
    if mode != "auto":
        return mode
    return "triton" if qkv.device.type == "cuda" else "bias"


def _fallback_mode(query: torch.Tensor) -> str:
    """Where the Triton kernel does not apply: the fold on CUDA (flash-padded in fp16/bf16), the bias elsewhere."""
    if query.device.type == "cuda":
        return "fold_flash" if query.dtype in (torch.float16, torch.bfloat16) else "fold"
    return "bias"


class FastSamVisionAttention(SamVisionAttention):
    """``SamVisionAttention`` with the relative-position bias folded into q/k (see the module docstring).

    Instances are never constructed: ``enable_fast_attention`` swaps the class of existing modules, so all
    parameters, buffers and hooks stay where they are.
    """

    _octsam_mode: str = "auto"

    def forward(  # type: ignore[override]
        self, hidden_states: torch.Tensor, output_attentions: bool | None = None, window_size: int | None = None
    ) -> tuple[torch.Tensor, None]:
        """Attention over ``hidden_states`` (batch, height, width, channels).

        ``window_size`` > 0: attention inside non-overlapping windows of that size (zero-padded at the bottom and
        right like transformers' ``window_partition``); the input and output are the whole unpartitioned image.
        ``window_size`` 0 or None: attention over the whole (height, width) grid, which is also what
        transformers' layer asks for when it has partitioned the windows itself. Attention weights are never
        returned (as in transformers' SDPA class).
        """
        batch, height, width, channels = hidden_states.shape
        heads = self.num_attention_heads
        head_dim = channels // heads
        window = window_size or 0
        if window > 0:
            pad_h, pad_w = -height % window, -width % window
            if pad_h or pad_w:
                hidden_states = F.pad(hidden_states, (0, 0, 0, pad_w, 0, pad_h))
            grid_h = grid_w = window
        else:
            pad_h = pad_w = 0
            grid_h, grid_w = height, width
        padded_h, padded_w = height + pad_h, width + pad_w
        n_h, n_w = padded_h // grid_h, padded_w // grid_w
        tokens = grid_h * grid_w
        groups = batch * n_h * n_w

        qkv = self.qkv(hidden_states)
        mode = _resolve_mode(self._octsam_mode, qkv)
        # (3, batch, n_h, n_w, heads, grid_h, grid_w, head_dim): windows as views of the projection, no copy yet.
        qkv = qkv.view(batch, n_h, grid_h, n_w, grid_w, 3, heads, head_dim).permute(5, 0, 1, 3, 6, 2, 4, 7)
        query, key, value = qkv.unbind(0)
        dropout = self.dropout if self.training else 0.0
        if mode == "triton":
            from octsam.models import triton_attention

            if dropout or not triton_attention.qualifies(query, grid_h, grid_w):
                mode = _fallback_mode(query)  # e.g. windowed layers: the kernel needs a power-of-two grid

        if mode == "bias" or not self.use_rel_pos:
            out = self._bias_attention(query, key, value, groups, tokens, dropout)
        elif mode in ("fold", "fold_flash"):
            out = self._folded_attention(query, key, value, groups, tokens, dropout, mode == "fold_flash")
        elif mode == "triton":
            out = self._triton_attention(query, key, value, groups, tokens)
        else:
            raise OctSamError(f"fast attention mode {mode!r} is unknown; use one of {', '.join(MODES)}")

        # (groups, heads, tokens, d) -> (batch, padded_h, padded_w, channels): one copy merges heads and windows.
        out = out.view(batch, n_h, n_w, heads, grid_h, grid_w, head_dim).permute(0, 1, 4, 2, 5, 3, 6)
        out = self.proj(out.reshape(batch, padded_h, padded_w, channels))
        if pad_h or pad_w:
            out = out[:, :height, :width]
        return out, None

    def _rel_terms(self, query: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        """``q . Rh`` (..., gh, gw, gh) and ``q . Rw`` (..., gh, gw, gw), each multiplied by ``scale``."""
        grid_h, grid_w = query.shape[-3], query.shape[-2]
        rel_h = _rel_pos_table(self.rel_pos_h, grid_h)
        rel_w = _rel_pos_table(self.rel_pos_w, grid_w)
        if scale != 1.0:
            rel_h, rel_w = rel_h * scale, rel_w * scale
        return (
            torch.einsum("...ijc,ikc->...ijk", query, rel_h),
            torch.einsum("...ijc,jkc->...ijk", query, rel_w),
        )

    def _bias_attention(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, groups: int, tokens: int, dropout: float
    ) -> torch.Tensor:
        heads = query.shape[3]
        bias = None
        if self.use_rel_pos:
            rel_h, rel_w = self._rel_terms(query, 1.0)
            bias = (rel_h[..., :, None] + rel_w[..., None, :]).reshape(groups, heads, tokens, tokens)
        query, key, value = (t.reshape(groups, heads, tokens, -1) for t in (query, key, value))
        return F.scaled_dot_product_attention(query, key, value, attn_mask=bias, dropout_p=dropout, scale=self.scale)

    def _folded_attention(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        groups: int,
        tokens: int,
        dropout: float,
        pad_value: bool,
    ) -> torch.Tensor:
        *lead, grid_h, grid_w, head_dim = query.shape
        folded_dim = head_dim + grid_h + grid_w
        padded_dim = _round_up(folded_dim, 8)
        pad_value = pad_value and padded_dim <= _FLASH_MAX_HEAD_DIM
        rel_h, rel_w = self._rel_terms(query, 1.0 / self.scale)

        shape = (*lead, grid_h, grid_w)
        zeros = query.new_zeros(()).expand(*shape, padded_dim - folded_dim)
        rows = torch.arange(grid_h, device=query.device)
        cols = torch.arange(grid_w, device=query.device)
        one_hot_h = (rows[:, None, None] == rows[None, None, :]).to(key.dtype).expand(*lead, grid_h, grid_w, grid_h)
        one_hot_w = (cols[None, :, None] == cols[None, None, :]).to(key.dtype).expand(*lead, grid_h, grid_w, grid_w)

        heads = lead[-1]
        query = torch.cat([query, rel_h.to(query.dtype), rel_w.to(query.dtype), zeros], dim=-1)
        key = torch.cat([key, one_hot_h, one_hot_w, zeros], dim=-1)
        if pad_value:
            value = torch.cat([value, zeros.new_zeros(()).expand(*shape, padded_dim - head_dim)], dim=-1)
        query = query.view(groups, heads, tokens, padded_dim)
        key = key.view(groups, heads, tokens, padded_dim)
        value = value.reshape(groups, heads, tokens, -1)
        out = F.scaled_dot_product_attention(query, key, value, dropout_p=dropout, scale=self.scale)
        return out[..., :head_dim] if pad_value else out

    def _flat_rel_terms(self, query: torch.Tensor, groups: int, tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``q . Rh`` (groups, heads, tokens, grid_h) and ``q . Rw`` (groups, heads, tokens, grid_w), unscaled: the
        bias terms a kernel adds to each score itself."""
        heads, grid_h, grid_w = query.shape[3], query.shape[-3], query.shape[-2]
        rel_h, rel_w = self._rel_terms(query, 1.0)
        return rel_h.reshape(groups, heads, tokens, grid_h), rel_w.reshape(groups, heads, tokens, grid_w)

    def _triton_attention(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, groups: int, tokens: int
    ) -> torch.Tensor:
        """The fused Triton kernel (``octsam.models.triton_attention``; ``forward`` checked that the layer qualifies)."""
        from octsam.models import triton_attention

        heads = query.shape[3]
        rel_h, rel_w = self._flat_rel_terms(query, groups, tokens)
        query, key, value = (t.reshape(groups, heads, tokens, -1) for t in (query, key, value))
        return triton_attention.relpos_attention(query, key, value, rel_h, rel_w, self.scale)


class FastSamVisionLayer(SamVisionLayer):
    """``SamVisionLayer`` that lets ``FastSamVisionAttention`` partition windows inside its own copies."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        residual = hidden_states
        hidden_states = self.layer_norm1(hidden_states)
        hidden_states, _ = self.attn(hidden_states, window_size=self.window_size)
        hidden_states = residual + hidden_states
        layernorm_output = self.layer_norm2(hidden_states)
        return hidden_states + self.mlp(layernorm_output)


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise OctSamError(f"enable_fast_attention(mode={mode!r}): unknown mode; use one of {', '.join(MODES)}")


def enable_fast_attention(model: nn.Module, mode: str = "auto") -> int:
    """Switch every SAM vision attention in ``model`` (also inside PEFT wrappers) to the exact fast path, in place.

    Returns the number of attention modules that use the fast path afterwards (0: no SAM image encoder found).
    Calling it again only changes ``mode``. Parameters and state-dict keys are unchanged.
    """
    _check_mode(mode)
    count = 0
    for module in model.modules():
        # Only transformers' own layer class is swapped (a subclass, e.g. one FSDP2 made, keeps its class and
        # partitions windows itself; the fast attention then runs on its windows as on a full grid).
        if type(module) is SamVisionLayer and isinstance(module.attn, SamVisionAttention):
            module._octsam_original_class = SamVisionLayer
            module.__class__ = FastSamVisionLayer
        if isinstance(module, SamVisionAttention):
            if type(module) is not FastSamVisionAttention:
                module._octsam_original_class = type(module)
                module.__class__ = FastSamVisionAttention
            module._octsam_mode = mode
            count += 1
    return count


def disable_fast_attention(model: nn.Module) -> int:
    """Restore transformers' own attention classes switched by ``enable_fast_attention``; returns how many."""
    count = 0
    for module in model.modules():
        original = module.__dict__.get("_octsam_original_class")
        if original is None:
            continue
        module.__class__ = original
        del module._octsam_original_class
        if "_octsam_mode" in module.__dict__:
            del module._octsam_mode
        if isinstance(module, SamVisionAttention):
            count += 1
    return count


def fast_attention_mode(model: nn.Module) -> str | None:
    """The mode of the first switched attention module in ``model``, or None when fast attention is off."""
    for module in model.modules():
        if isinstance(module, FastSamVisionAttention):
            return module._octsam_mode
    return None
