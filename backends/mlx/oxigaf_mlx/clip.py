"""CLIP image and text encoders (transformers' ``CLIPVisionModel`` / ``CLIPTextModel``) in MLX.

The module tree mirrors the un-prefixed transformers layout (``embeddings``, ``pre_layrnorm``
(sic), ``encoder.layers.N``, ``post_layernorm`` / ``final_layer_norm``), so the safetensors names
are the parameter names. Published files carry the tower under ``vision_model.`` /
``text_model.`` (the ``...WithProjection`` classes) or bare (the plain classes); both load, and
the projection (``visual_projection`` / ``text_projection``, outside the tower prefix) is
built only when the file has it.

Images arrive NCHW and are turned NHWC for the patch convolution (its weight is transposed
once by ``common.load_weights``); flattening the NHWC patch grid row by row gives
transformers' token order. LayerNorms run in float32 whatever the compute dtype.
"""

from __future__ import annotations

import os

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from oxigaf.config import IMAGE_TOWER, TEXT_TOWER, CLIPTextConfig, CLIPTower, CLIPVisionConfig, check_load_options
from oxigaf.errors import InputError, ModelLoadError

from .common import attention, load_model, nchw_to_nhwc, norm32, resolve_attention


def _quick_gelu(x: mx.array) -> mx.array:
    return x * mx.sigmoid(1.702 * x)


ACTIVATIONS = {"gelu": nn.gelu, "quick_gelu": _quick_gelu}  # nn.gelu is the exact (erf) form


def _check_geometry(config, where: str) -> None:
    if config.hidden_act not in ACTIVATIONS:
        raise ModelLoadError(
            f"{where}: hidden_act {config.hidden_act!r} is not supported (use one of {', '.join(ACTIVATIONS)})"
        )
    if config.hidden_size % config.num_attention_heads:
        raise ModelLoadError(
            f"{where}: hidden_size {config.hidden_size} is not a multiple of "
            f"num_attention_heads {config.num_attention_heads}"
        )


# --------------------------------------------------------------------------- shared blocks


class CLIPAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.q_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def __call__(self, x, mask, mode: str, chunk_size: int):
        b, n, c = x.shape

        def split(t):
            return t.reshape(b, n, self.heads, c // self.heads).transpose(0, 2, 1, 3)

        out = attention(split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x)),
                        mode, mask=mask, chunk_size=chunk_size)
        return self.out_proj(out.transpose(0, 2, 1, 3).reshape(b, n, c))


class CLIPMLP(nn.Module):
    def __init__(self, dim: int, inner: int, act: str):
        super().__init__()
        self.act = ACTIVATIONS[act]
        self.fc1 = nn.Linear(dim, inner)
        self.fc2 = nn.Linear(inner, dim)

    def __call__(self, x):
        return self.fc2(self.act(self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
    def __init__(self, config):
        super().__init__()
        dim, eps = config.hidden_size, config.layer_norm_eps
        self.self_attn = CLIPAttention(dim, config.num_attention_heads)
        self.layer_norm1 = nn.LayerNorm(dim, eps=eps)
        self.mlp = CLIPMLP(dim, config.intermediate_size, config.hidden_act)
        self.layer_norm2 = nn.LayerNorm(dim, eps=eps)

    def __call__(self, x, mask, mode: str, chunk_size: int):
        x = x + self.self_attn(norm32(self.layer_norm1, x), mask, mode, chunk_size)
        return x + self.mlp(norm32(self.layer_norm2, x))


class CLIPEncoder(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.layers = [CLIPEncoderLayer(config) for _ in range(config.num_hidden_layers)]

    def __call__(self, x, mask, mode: str, chunk_size: int) -> list[mx.array]:
        """Every layer's input and the last output: ``[x, layer1(x), …, layerN(…)]``."""
        states = [x]
        for layer in self.layers:
            x = layer(x, mask, mode, chunk_size)
            states.append(x)
        return states


# --------------------------------------------------------------------------- vision


class CLIPVisionEmbeddings(nn.Module):
    def __init__(self, config: CLIPVisionConfig):
        super().__init__()
        dim, patch = config.hidden_size, config.patch_size
        self.class_embedding = mx.zeros((dim,))
        self.patch_embedding = nn.Conv2d(config.num_channels, dim, patch, stride=patch, bias=False)
        self.position_embedding = nn.Embedding((config.image_size // patch) ** 2 + 1, dim)

    def __call__(self, pixel_values_nhwc):
        patches = self.patch_embedding(pixel_values_nhwc)
        b, _, _, dim = patches.shape
        patches = patches.reshape(b, -1, dim)
        cls = mx.broadcast_to(self.class_embedding.astype(patches.dtype), (b, 1, dim))
        return mx.concatenate([cls, patches], axis=1) + self.position_embedding.weight


class CLIPImageEncoder(nn.Module):
    """``enc(pixel_values NCHW, output_hidden_states=True) -> dict``.

    ``hidden_states[0]`` is ``pre_layrnorm(embeddings)``, ``[i]`` the output of layer i;
    ``last_hidden_state`` is the last layer's output (no post_layernorm); ``pooler_output``
    is ``post_layernorm`` of the class token; ``image_embeds`` its projection, when the
    checkpoint has one.
    """

    def __init__(self, config: CLIPVisionConfig, projection: bool):
        super().__init__()
        self.config = config
        dim, eps = config.hidden_size, config.layer_norm_eps
        self.embeddings = CLIPVisionEmbeddings(config)
        self.pre_layrnorm = nn.LayerNorm(dim, eps=eps)
        self.encoder = CLIPEncoder(config)
        self.post_layernorm = nn.LayerNorm(dim, eps=eps)
        if projection:
            self.visual_projection = nn.Linear(dim, config.projection_dim, bias=False)
        self.has_projection = projection
        self.attention = "sdpa"
        self.chunk_size = 1024

    def __call__(self, pixel_values, output_hidden_states: bool = True, attention: str | None = None) -> dict:
        cfg = self.config
        shape = (cfg.num_channels, cfg.image_size, cfg.image_size)
        if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != shape:
            raise InputError(f"pixel_values must have shape (B, {', '.join(map(str, shape))}); "
                             f"got {tuple(pixel_values.shape)}")
        mode = resolve_attention(attention or self.attention)
        dtype = self.embeddings.patch_embedding.weight.dtype
        x = self.embeddings(nchw_to_nhwc(pixel_values.astype(dtype)))
        states = self.encoder(norm32(self.pre_layrnorm, x), None, mode, self.chunk_size)
        last = states[-1]
        pooled = norm32(self.post_layernorm, last[:, 0])
        out = {"last_hidden_state": last, "pooler_output": pooled,
               "hidden_states": tuple(states) if output_hidden_states else None}
        if self.has_projection:
            out["image_embeds"] = self.visual_projection(pooled)
        return out


# --------------------------------------------------------------------------- text


class CLIPTextEmbeddings(nn.Module):
    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position_embedding = nn.Embedding(config.max_position_embeddings, config.hidden_size)

    def __call__(self, input_ids):
        return self.token_embedding(input_ids) + self.position_embedding.weight[: input_ids.shape[1]]


class CLIPTextEncoder(nn.Module):
    """``enc(input_ids (B, L) int) -> dict``.

    ``last_hidden_state`` is after ``final_layer_norm``; ``hidden_states`` are
    ``[embeddings, layer1, …, layerN]``, all before it; ``pooler_output`` is the final state
    at the EOS position (transformers' rule: with the legacy ``eos_token_id == 2`` the
    position of the largest id, else the first position holding ``eos_token_id``);
    ``text_embeds`` its projection, when the checkpoint has one.
    """

    def __init__(self, config: CLIPTextConfig, projection: bool):
        super().__init__()
        self.config = config
        dim = config.hidden_size
        self.embeddings = CLIPTextEmbeddings(config)
        self.encoder = CLIPEncoder(config)
        self.final_layer_norm = nn.LayerNorm(dim, eps=config.layer_norm_eps)
        if projection:
            self.text_projection = nn.Linear(dim, config.projection_dim, bias=False)
        self.has_projection = projection
        self.attention = "sdpa"
        self.chunk_size = 1024

    def _check_ids(self, input_ids) -> mx.array:
        cfg = self.config
        ids = input_ids if isinstance(input_ids, mx.array) else mx.array(np.asarray(input_ids))
        if ids.ndim != 2 or not (1 <= ids.shape[1] <= cfg.max_position_embeddings):
            raise InputError(f"input_ids must have shape (B, L) with 1 <= L <= {cfg.max_position_embeddings}; "
                             f"got {tuple(ids.shape)}")
        if not mx.issubdtype(ids.dtype, mx.integer):
            raise InputError(f"input_ids must be integers; got {ids.dtype}")
        # An out-of-range id would read past the embedding table silently in MLX.
        lo, hi = int(ids.min().item()), int(ids.max().item())
        if lo < 0 or hi >= cfg.vocab_size:
            raise InputError(f"input_ids must lie in [0, {cfg.vocab_size}); got values from {lo} to {hi}")
        return ids.astype(mx.int32)

    def eos_positions(self, ids: mx.array) -> mx.array:
        """Index of the pooled token per row; the first one where several qualify."""
        if self.config.eos_token_id == 2:
            hit = ids == ids.max(axis=-1, keepdims=True)
        else:
            hit = ids == self.config.eos_token_id
        n = ids.shape[1]
        first = mx.where(hit, mx.arange(n, dtype=mx.int32), n).min(axis=-1)
        # A row without the EOS id pools position 0, as transformers' argmax over all-False does.
        return mx.where(first == n, 0, first)

    def __call__(self, input_ids, output_hidden_states: bool = True, attention: str | None = None) -> dict:
        ids = self._check_ids(input_ids)
        mode = resolve_attention(attention or self.attention)
        dtype = self.embeddings.token_embedding.weight.dtype
        n = ids.shape[1]
        # The diagonal is always open, so -inf never makes a whole row of the softmax empty.
        mask = mx.triu(mx.full((n, n), float("-inf"), dtype=dtype), k=1)
        states = self.encoder(self.embeddings(ids), mask, mode, self.chunk_size)
        last = norm32(self.final_layer_norm, states[-1])
        pos = self.eos_positions(ids)
        pooled = mx.take_along_axis(last, pos[:, None, None], axis=1)[:, 0]
        out = {"last_hidden_state": last, "pooler_output": pooled,
               "hidden_states": tuple(states) if output_hidden_states else None}
        if self.has_projection:
            out["text_embeds"] = self.text_projection(pooled)
        return out


# --------------------------------------------------------------------------- loading


def load_tower(tower: CLIPTower, model: type, folder: str | os.PathLike, *, dtype: str = "float32",
               attention: str = "sdpa", chunk_size: int = 1024):
    """Build ``model`` (this backend's encoder class for ``tower``) from ``folder/config.json`` and
    load its weights strictly: the one loader of both towers.

    Files with and without the tower's prefix load; the projection is optional (built only
    when the file has it).
    """
    check_load_options(dtype, attention, chunk_size)
    config = tower.config.from_folder(folder)
    _check_geometry(config, str(folder))
    state = tower.read_state(folder)
    return load_model(lambda: model(config, projection=tower.projection in state), state, str(folder),
                      dtype=dtype, attention=attention, chunk_size=chunk_size)


def load_image_encoder(folder: str | os.PathLike, *, dtype: str = "float32",
                       attention: str = "sdpa", chunk_size: int = 1024) -> CLIPImageEncoder:
    """``load_tower`` of the vision tower: ``vision_model.`` prefix and ``visual_projection`` optional."""
    return load_tower(IMAGE_TOWER, CLIPImageEncoder, folder, dtype=dtype, attention=attention, chunk_size=chunk_size)


def load_text_encoder(folder: str | os.PathLike, *, dtype: str = "float32",
                      attention: str = "sdpa", chunk_size: int = 1024) -> CLIPTextEncoder:
    """``load_tower`` of the text tower: ``text_model.`` prefix and ``text_projection`` optional."""
    return load_tower(TEXT_TOWER, CLIPTextEncoder, folder, dtype=dtype, attention=attention, chunk_size=chunk_size)
