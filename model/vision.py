"""UMT-L video vision encoder, as VideoChat-Flash runs it (spec §1).

A plain pre-LN ViT over 4-frame clips: a tubelet-1 Conv3d patch embedding, a fixed (computed, not
loaded) sinusoidal positional table, ``built_layers`` blocks (23 of the 24 declared for UMT-L,
because ``mm_vision_select_layer = -2``), then a final LayerNorm with eps 1e-12.

Submodule names follow the official checkpoint keys under
``model.vision_tower.vision_tower.encoder.`` so the name map in ``weights.py`` stays a prefix swap.
Reads top to bottom: positional tables, attention, MLP, block, encoder.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

# ---------------------------------------------------------------------------------------------
# Configuration


@dataclass(frozen=True)
class VisionConfig:
    """Geometry of the UMT encoder. Real UMT-L: width 1024, 24 declared layers, 16 heads."""

    image_size: int = 448  # pixels, square
    patch_size: int = 16
    width: int = 1024
    declared_layers: int = 24
    select_layer: int = -2  # mm_vision_select_layer; blocks built = declared + select + 1
    num_heads: int = 16
    mlp_ratio: float = 4.0
    tubelet_size: int = 1
    num_frames: int = 4  # frames per clip (mm_local_num_frames)
    layernorm_eps: float = 1e-6
    final_layernorm_eps: float = 1e-12
    pretrain_grid: int = 14  # the positional table is defined on 4 x 14 x 14
    ckpt_num_frames: int = 4

    @property
    def built_layers(self) -> int:
        return self.declared_layers + self.select_layer + 1

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def tokens_per_frame(self) -> int:
        return self.grid * self.grid

    @property
    def tokens_per_clip(self) -> int:
        return self.num_frames * self.tokens_per_frame

    @property
    def head_dim(self) -> int:
        return self.width // self.num_heads

    @property
    def mlp_hidden(self) -> int:
        return int(self.width * self.mlp_ratio)


# ---------------------------------------------------------------------------------------------
# Positional tables (pure functions)


def sinusoid_table(n_positions: int, dim: int) -> np.ndarray:
    """The 1-D Transformer sinusoid, float64 [n_positions, dim].

    Angle ``n / 10000^(2·(j//2)/dim)``; even channels take sin, odd channels take cos.
    """
    positions = np.arange(n_positions, dtype=np.float64)[:, None]
    exponents = 2.0 * (np.arange(dim) // 2) / dim
    angles = positions / np.power(10000.0, exponents)[None, :]
    table = np.empty_like(angles)
    table[:, 0::2] = np.sin(angles[:, 0::2])
    table[:, 1::2] = np.cos(angles[:, 1::2])
    return table


def positional_table(
    dim: int, grid: int, n_frames: int, *, pretrain_grid: int = 14, ckpt_frames: int = 4
) -> torch.Tensor:
    """Positional table of ``n_frames`` frames of ``grid x grid`` patches: [1, n_frames·grid², dim].

    The base table is the sinusoid over ``ckpt_frames x pretrain_grid²`` flat positions (computed in
    float64, cast to float32). When ``grid`` differs from the pretraining grid each frame is resized
    with 2-D bicubic interpolation (align_corners=False), frames acting as the batch. The image
    table (``n_frames == 1``) uses the first frame's rows, so it equals frame 0 of the video table.
    Temporal interpolation (frame counts other than ``ckpt_frames``) is not implemented.
    """
    if n_frames not in (1, ckpt_frames):
        raise ValueError(f"positional table for {n_frames} frames needs temporal interpolation")
    n_base = n_frames * pretrain_grid * pretrain_grid
    table = torch.from_numpy(sinusoid_table(n_base, dim).astype(np.float32))  # [n_base, dim]
    if grid != pretrain_grid:
        frames = table.reshape(n_frames, pretrain_grid, pretrain_grid, dim).permute(0, 3, 1, 2)
        frames = F.interpolate(frames, size=(grid, grid), mode="bicubic", align_corners=False)
        table = frames.permute(0, 2, 3, 1).reshape(n_frames * grid * grid, dim)
    return table.unsqueeze(0)


# ---------------------------------------------------------------------------------------------
# Blocks


class Attention(nn.Module):
    """Non-causal multi-head self-attention with q and v biases only (the key bias is zero)."""

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.num_heads = config.num_heads
        self.qkv = nn.Linear(config.width, 3 * config.width, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(config.width))
        self.v_bias = nn.Parameter(torch.zeros(config.width))
        self.proj = nn.Linear(config.width, config.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape  # [B, N, C]
        bias = torch.cat((self.q_bias, torch.zeros_like(self.q_bias), self.v_bias))
        qkv = F.linear(x, self.qkv.weight, bias)  # [B, N, 3C]
        qkv = qkv.reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each [B, heads, N, head_dim]
        out = F.scaled_dot_product_attention(q, k, v)  # scale head_dim^-0.5
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):
    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(config.width, config.mlp_hidden)
        self.act = nn.GELU()  # exact (erf)
        self.fc2 = nn.Linear(config.mlp_hidden, config.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-LN transformer block without layer scale or drop-path."""

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(config.width, eps=config.layernorm_eps)
        self.attn = Attention(config)
        self.norm2 = nn.LayerNorm(config.width, eps=config.layernorm_eps)
        self.mlp = Mlp(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    """Conv3d with kernel = stride = (tubelet, patch, patch), with bias."""

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        kernel = (config.tubelet_size, config.patch_size, config.patch_size)
        self.proj = nn.Conv3d(3, config.width, kernel_size=kernel, stride=kernel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x)  # [B, C, T, h, w]
        return x.flatten(2).transpose(1, 2)  # [B, T·h·w, C], t-major, then row, then column


# ---------------------------------------------------------------------------------------------
# Encoder


class UMTVisionEncoder(nn.Module):
    """UMT-L as used by VideoChat-Flash: clips [B, T, 3, S, S] -> features [B, T·h·w, width].

    T is ``num_frames`` (a video clip) or 1 (a still image, which uses the image table). The
    positional tables are non-persistent buffers; ``reset_buffers`` recomputes them after the
    module was built on the meta device and materialised.
    """

    pos_embed: torch.Tensor
    img_pos_embed: torch.Tensor

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.config = config
        self.patch_embed = PatchEmbed(config)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.built_layers))
        self.vision_layernorm = nn.LayerNorm(config.width, eps=config.final_layernorm_eps)
        self.register_buffer("pos_embed", torch.empty(0), persistent=False)
        self.register_buffer("img_pos_embed", torch.empty(0), persistent=False)
        self.reset_buffers()

    def reset_buffers(self) -> None:
        """(Re)compute the positional tables on the module's device and dtype."""
        weight = self.patch_embed.proj.weight  # the tables follow the weights (meta included)
        device, dtype = weight.device, weight.dtype
        cfg = self.config
        kwargs = {"pretrain_grid": cfg.pretrain_grid, "ckpt_frames": cfg.ckpt_num_frames}
        video = positional_table(cfg.width, cfg.grid, cfg.num_frames, **kwargs)
        image = positional_table(cfg.width, cfg.grid, 1, **kwargs)
        self.pos_embed = video.to(device=device, dtype=dtype)  # [1, T·h·w, C]
        self.img_pos_embed = image.to(device=device, dtype=dtype)  # [1, h·w, C]

    def forward(self, clips: torch.Tensor) -> torch.Tensor:
        _, t, _, s, _ = clips.shape  # [B, T, 3, S, S]
        if s != self.config.image_size or t not in (1, self.config.num_frames):
            raise ValueError(
                f"expected [B, {self.config.num_frames} or 1, 3, {self.config.image_size}, "
                f"{self.config.image_size}], got {list(clips.shape)}"
            )
        x = self.patch_embed(clips.permute(0, 2, 1, 3, 4))  # [B, T·h·w, C]
        x = x + (self.img_pos_embed if t == 1 else self.pos_embed)
        for block in self.blocks:
            x = block(x)
        return self.vision_layernorm(x)  # [B, T·h·w, C]
