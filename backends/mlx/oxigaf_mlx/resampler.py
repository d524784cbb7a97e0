"""The IP-Adapter-Plus Perceiver resampler of the ImageDream UNet (its ``image_embed``): CLIP
hidden states -> ``num_queries`` context tokens. Its geometry is fixed by the reference
(``oxigaf.unet.RESAMPLER_*``)."""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn

from .common import attention, merge_heads, norm32, split_heads


class PerceiverAttention(nn.Module):
    def __init__(self, dim: int, dim_head: int, heads: int):
        super().__init__()
        inner = dim_head * heads
        self.heads = heads
        self.dim_head = dim_head
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, inner * 2, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def __call__(self, x: mx.array, latents: mx.array, call) -> mx.array:
        x = norm32(self.norm1, x)
        latents = norm32(self.norm2, latents)
        q = split_heads(self.to_q(latents), self.heads)
        k, v = mx.split(self.to_kv(mx.concatenate([x, latents], axis=-2)), 2, axis=-1)
        # The reference scales q and k by dim_head^-1/4 each before the product (gentler on float16).
        s = 1.0 / math.sqrt(math.sqrt(self.dim_head))
        out = attention(q * s, split_heads(k, self.heads) * s, split_heads(v, self.heads), call.mode, scale=1.0,
                        chunk_size=call.chunk_size)
        return self.to_out(merge_heads(out))


class Resampler(nn.Module):
    """IP-Adapter-Plus Perceiver resampler: CLIP hidden states -> ``num_queries`` context tokens."""

    def __init__(self, dim: int, depth: int, dim_head: int, heads: int, num_queries: int, embedding_dim: int,
                 output_dim: int, ff_mult: int):
        super().__init__()
        self.latents = mx.zeros((1, num_queries, dim))
        self.proj_in = nn.Linear(embedding_dim, dim)
        self.proj_out = nn.Linear(dim, output_dim)
        self.norm_out = nn.LayerNorm(output_dim)
        self.layers = [
            [PerceiverAttention(dim, dim_head, heads),
             [nn.LayerNorm(dim), nn.Linear(dim, dim * ff_mult, bias=False), nn.GELU(),
              nn.Linear(dim * ff_mult, dim, bias=False)]]
            for _ in range(depth)
        ]

    def __call__(self, x: mx.array, call) -> mx.array:
        latents = mx.broadcast_to(self.latents, (x.shape[0], *self.latents.shape[1:]))
        x = self.proj_in(x)
        for attn, ff in self.layers:
            latents = attn(x, latents, call) + latents
            latents = ff[3](nn.gelu(ff[1](norm32(ff[0], latents)))) + latents
        return norm32(self.norm_out, self.proj_out(latents))
