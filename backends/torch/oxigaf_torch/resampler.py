"""The IP-Adapter-Plus Perceiver resampler of the ImageDream UNet (its ``image_embed``): CLIP
hidden states -> ``num_queries`` context tokens. Its geometry is fixed by the reference
(``oxigaf.unet.RESAMPLER_*``)."""

from __future__ import annotations

import torch
from torch import nn

from .common import LayerNorm32, merge_heads, split_heads
from .common import attention as scaled_attention


class PerceiverAttention(nn.Module):
    def __init__(self, dim: int, dim_head: int, heads: int):
        super().__init__()
        inner = dim_head * heads
        self.heads = heads
        self.dim_head = dim_head
        self.norm1 = LayerNorm32(dim)
        self.norm2 = LayerNorm32(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, inner * 2, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, x: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        x = self.norm1(x)
        latents = self.norm2(latents)
        q = split_heads(self.to_q(latents), self.heads)
        k, v = self.to_kv(torch.cat([x, latents], dim=-2)).chunk(2, dim=-1)
        k, v = split_heads(k, self.heads), split_heads(v, self.heads)
        # q and k are each scaled by dim_head^-1/4 before the product, as the reference does to
        # keep float16 scores in range; the softmax itself runs in float32 (naive path). The
        # matrix is tiny (queries × (257 + queries)), so no other attention mode is worth it.
        s = self.dim_head ** -0.25
        out = scaled_attention(q * s, k * s, v, "naive", scale=1.0)
        return self.to_out(merge_heads(out))


class Resampler(nn.Module):
    """IP-Adapter-Plus Perceiver resampler: CLIP hidden states -> ``num_queries`` context tokens."""

    def __init__(self, dim: int, depth: int, dim_head: int, heads: int, num_queries: int, embedding_dim: int,
                 output_dim: int, ff_mult: int):
        super().__init__()
        self.latents = nn.Parameter(torch.empty(1, num_queries, dim))
        self.proj_in = nn.Linear(embedding_dim, dim)
        self.proj_out = nn.Linear(dim, output_dim)
        self.norm_out = LayerNorm32(output_dim)
        self.layers = nn.ModuleList(
            nn.ModuleList([
                PerceiverAttention(dim, dim_head, heads),
                nn.Sequential(LayerNorm32(dim), nn.Linear(dim, dim * ff_mult, bias=False), nn.GELU(),
                              nn.Linear(dim * ff_mult, dim, bias=False)),
            ])
            for _ in range(depth)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        latents = self.latents.expand(x.shape[0], -1, -1)
        x = self.proj_in(x)
        for attn, ff in self.layers:
            latents = attn(x, latents) + latents
            latents = ff(latents) + latents
        return self.norm_out(self.proj_out(latents))
