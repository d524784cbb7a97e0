"""Configuration: what a user sets (``DiffusionConfig``) and what a model folder says.

Model configs are frozen dataclasses read from the published ``config.json`` files: keys we
do not use are ignored, missing keys take the reference implementation's defaults, and a
missing required key or a value of the wrong kind is a ``ModelLoadError`` naming the file.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .checkpoints import load_state, read_json, strip_prefix
from .errors import ConfigError, ModelLoadError

DTYPES = ("float32", "float16", "bfloat16")
ATTENTION_MODES = ("auto", "sdpa", "chunked", "naive")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
GUIDANCE_RANGE = (1.0, 20.0)
UNET_NORM_GROUPS = 32  # GroupNorm groups of every UNet block (the reference's normalization())


def check_dtype(dtype: str, name: str = "dtype") -> str:
    if dtype not in DTYPES:
        raise ConfigError(f"{name} must be one of {', '.join(DTYPES)}; got {dtype!r}")
    return dtype


def check_attention(mode: str, name: str = "attention") -> str:
    if mode not in ATTENTION_MODES:
        raise ConfigError(f"{name} must be one of {', '.join(ATTENTION_MODES)}; got {mode!r}")
    return mode


def check_guidance(value: float, name: str = "guidance_scale") -> float:
    lo, hi = GUIDANCE_RANGE
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not (lo <= value <= hi):
        raise ConfigError(f"{name} must be a number in [{lo}, {hi}]; got {value!r}")
    return float(value)


def check_positive_int(value: int, name: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"{name} must be an integer >= 1; got {value!r}")
    return value


def check_load_options(dtype: str, attention: str, chunk_size: int) -> None:
    """The options every backend's model loader takes, checked before any file is read."""
    check_dtype(dtype)
    check_attention(attention)
    check_positive_int(chunk_size, "chunk_size")


def check_finite(value: float, name: str) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise ConfigError(f"{name} must be a finite number; got {value!r}")
    return float(value)


@dataclass(frozen=True)
class DiffusionConfig:
    """Generation settings. The first five fields are the seed crate's.

    - ``use_flash_attention``: with ``attention="auto"``, True picks the fused kernel where the
      backend has one and bounded-memory chunked attention elsewhere; False picks ``naive``.
    - ``attention``: ``auto`` | ``sdpa`` (fused) | ``chunked`` (query blocks, O(N·block) memory)
      | ``naive`` (materialised softmax(QKᵀ)V).
    - ``dtype``: compute dtype of the UNet and encoders; ``vae_dtype`` of the VAE (float32 by
      default: the SD VAE overflows in float16).
    - ``upsampler_steps``: Euler steps of the sd-x2 latent upsampler when one is used.
    - ``low_memory``: release the encoders after conditioning and the UNet before decoding,
      and the buffers the backend keeps for reuse with them.
    - ``vae_tile_size``: decode in tiles of this many pixels (0 = never tile).
    - ``compile``: compile the UNet's step (torch: ``torch.compile``, on CUDA with CUDA graphs,
      mode "reduce-overhead"; mlx: ``mx.compile``, which also fuses the guidance and the DDIM step
      into one graph). The first steps are slow while it compiles; same numbers to 1e-4.
    - ``prediction_type``: None takes the model's ``scheduler/scheduler_config.json``; set, it
      overrides what the scheduler predicts (``epsilon``, ``v_prediction``, ``sample``).
    - ``eta``: DDIM's η (0: deterministic DDIM; 1: DDPM-like fresh noise each step).
    - ``ip_weight``: ImageDream's identity strength, the scale of the UNet's image-prompt
      cross-attention (1.0: the published model).

    ``to_dict()`` / ``from_dict()`` turn it into plain JSON values and back (``oxigaf.json``).
    """

    num_views: int = 4
    num_inference_steps: int = 50
    guidance_scale: float = 5.0
    use_flash_attention: bool = True
    prediction_type: str | None = None
    dtype: str = "float32"
    vae_dtype: str = "float32"
    attention: str = "auto"
    attention_chunk_size: int = 1024
    elevation: float = 0.0
    seed: int = 0
    eta: float = 0.0
    ip_weight: float = 1.0
    upsampler_steps: int = 20
    low_memory: bool = False
    vae_tile_size: int = 0
    compile: bool = False

    def __post_init__(self):
        check_positive_int(self.num_views, "num_views")
        check_positive_int(self.num_inference_steps, "num_inference_steps")
        check_guidance(self.guidance_scale)
        if self.prediction_type is not None and self.prediction_type not in PREDICTION_TYPES:
            raise ConfigError(
                f"prediction_type must be None (the model's scheduler decides) or one of "
                f"{', '.join(PREDICTION_TYPES)}; got {self.prediction_type!r}"
            )
        check_dtype(self.dtype)
        check_dtype(self.vae_dtype, "vae_dtype")
        check_attention(self.attention)
        check_positive_int(self.attention_chunk_size, "attention_chunk_size")
        check_finite(self.elevation, "elevation")
        if not -90.0 < self.elevation < 90.0:
            raise ConfigError(f"elevation must lie strictly between -90 and 90 degrees; got {self.elevation!r}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0:
            raise ConfigError(f"seed must be a non-negative integer; got {self.seed!r}")
        if check_finite(self.eta, "eta") < 0:
            raise ConfigError(f"eta must be >= 0; got {self.eta!r}")
        check_finite(self.ip_weight, "ip_weight")
        check_positive_int(self.upsampler_steps, "upsampler_steps")
        if not isinstance(self.vae_tile_size, int) or self.vae_tile_size < 0 or self.vae_tile_size % 8:
            raise ConfigError(f"vae_tile_size must be 0 or a positive multiple of 8; got {self.vae_tile_size!r}")
        for name in ("use_flash_attention", "low_memory", "compile"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be True or False; got {getattr(self, name)!r}")
        for name in ("guidance_scale", "elevation", "eta", "ip_weight"):
            object.__setattr__(self, name, float(getattr(self, name)))  # 5 and 5.0 are one setting

    @property
    def attention_mode(self) -> str:
        """The attention mode asked for, with ``use_flash_attention`` applied to ``auto``."""
        if self.attention == "auto" and not self.use_flash_attention:
            return "naive"
        return self.attention

    def replace(self, **changes) -> DiffusionConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Every field as a plain JSON value; ``from_dict`` gives back an equal config."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DiffusionConfig:
        """The config ``to_dict`` wrote. A missing field takes its default; an unknown one is a
        ``ConfigError`` (a newer oxigaf's setting would otherwise be silently dropped)."""
        if not isinstance(data, dict):
            raise ConfigError(f"a DiffusionConfig must be a JSON object; got {type(data).__name__}")
        unknown = sorted(set(data) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ConfigError(f"unknown DiffusionConfig setting(s): {', '.join(map(str, unknown))}")
        return cls(**data)


# --------------------------------------------------------------------------- model configs


def _coerce(value: Any, default: Any, name: str, where: str) -> Any:
    """Check a config value against the kind of its default; lists become tuples."""
    if isinstance(value, list):
        value = tuple(value)
    if default is None or value is None:
        return value
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif isinstance(default, tuple):
        ok = isinstance(value, tuple)
    else:
        ok = isinstance(value, type(default))
    if not ok:
        raise ModelLoadError(f"{where}: {name} has the wrong type ({value!r})")
    return value


_REQUIRED = object()


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_sizes(cfg, names, low: int = 1) -> None:
    """Sizes a model is built from must be integers >= ``low`` (0 would divide by zero later)."""
    for name in names:
        value = getattr(cfg, name)
        if not (_is_int(value) and value >= low):
            raise ModelLoadError(f"{cfg.source or 'config'}: {name} must be an integer >= {low}; got {value!r}")


def _from_dict(cls, data: dict, where: str, aliases: dict[str, str] | None = None):
    aliases = aliases or {}
    values = {}
    for f in dataclasses.fields(cls):
        if f.name == "source":
            continue
        key = f.name if f.name in data else next((a for a, t in aliases.items() if t == f.name and a in data), None)
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else _REQUIRED
        )
        if key is None:
            if default is _REQUIRED:
                raise ModelLoadError(f"{where}: required key {f.name!r} is missing")
            continue
        hint = f.metadata.get("kind", default if default is not _REQUIRED else None)
        values[f.name] = _coerce(data[key], hint, f.name, where)
    return cls(**values, source=where)


class _ModelConfig:
    """Mixin: ``from_file`` / ``from_folder`` readers for a frozen model-config dataclass."""

    _aliases: dict[str, str] = {}
    _class_names: tuple[str, ...] = ()

    @classmethod
    def from_dict(cls, data: dict, where: str = "config"):
        name = data.get("_class_name") or (data.get("architectures") or [None])[0]
        if cls._class_names and name is not None and name not in cls._class_names:
            raise ModelLoadError(
                f"{where}: this is a {name!r} config, expected one of {', '.join(cls._class_names)}"
            )
        return _from_dict(cls, data, where, cls._aliases)

    @classmethod
    def from_file(cls, path: str | os.PathLike):
        return cls.from_dict(read_json(path, "config.json"), str(path))

    @classmethod
    def from_folder(cls, folder: str | os.PathLike):
        return cls.from_file(Path(folder) / "config.json")


@dataclass(frozen=True)
class UNetConfig(_ModelConfig):
    """``MultiViewUNetModel`` (MVDream / ImageDream), original LDM layout."""

    _class_names = ("MultiViewUNetModel",)

    in_channels: int = field(default=None, metadata={"kind": 0})
    model_channels: int = field(default=None, metadata={"kind": 0})
    out_channels: int = field(default=None, metadata={"kind": 0})
    num_res_blocks: int = field(default=None, metadata={"kind": 0})
    attention_resolutions: tuple = field(default=None, metadata={"kind": ()})
    channel_mult: tuple = (1, 2, 4, 8)
    num_heads: int = -1
    num_head_channels: int = -1
    context_dim: int = field(default=None, metadata={"kind": 0})
    camera_dim: int = field(default=None, metadata={"kind": 0})
    transformer_depth: int = 1
    ip_dim: int = 0
    ip_weight: float = 1.0
    image_size: int = 32
    source: str = ""

    def __post_init__(self):
        for name in ("in_channels", "model_channels", "out_channels", "num_res_blocks",
                     "attention_resolutions", "context_dim"):
            if getattr(self, name) is None:
                raise ModelLoadError(f"{self.source}: required key {name!r} is missing")
        if self.num_heads == -1 and self.num_head_channels == -1:
            raise ModelLoadError(f"{self.source}: set num_heads or num_head_channels")
        _check_sizes(self, ("in_channels", "model_channels", "out_channels", "num_res_blocks", "context_dim",
                            "transformer_depth", "image_size"))
        _check_sizes(self, ("ip_dim",), low=0)
        for name in ("num_heads", "num_head_channels"):
            value = getattr(self, name)
            if value != -1 and not (_is_int(value) and value >= 1):
                raise ModelLoadError(f"{self.source}: {name} must be -1 (unset) or >= 1; got {value!r}")
        for name in ("channel_mult", "attention_resolutions"):
            value = getattr(self, name)
            if not all(_is_int(v) and v >= 1 for v in value) or (name == "channel_mult" and not value):
                raise ModelLoadError(f"{self.source}: {name} must be a list of integers >= 1; got {list(value)!r}")

    def heads_for(self, channels: int) -> tuple[int, int]:
        """(heads, head_dim) of a transformer with this many channels, as the reference picks them."""
        if self.num_head_channels != -1:
            return channels // self.num_head_channels, self.num_head_channels
        return self.num_heads, channels // self.num_heads

    def check_geometry(self) -> None:
        """Refuse a config whose blocks cannot be built: every block width (``model_channels`` x
        each ``channel_mult``) must be a positive multiple of the ``UNET_NORM_GROUPS`` GroupNorm
        groups and split into whole attention heads. The one place this rule lives: the
        pipeline's preflight and both backends' UNet builders call it."""
        for mult in self.channel_mult:
            ch = mult * self.model_channels
            heads, head_dim = self.heads_for(ch) if ch > 0 else (0, 0)
            if ch <= 0 or ch % UNET_NORM_GROUPS or heads < 1 or heads * head_dim != ch:
                raise ModelLoadError(
                    f"{self.source or 'UNet config'}: a block of {ch} channels (model_channels "
                    f"{self.model_channels} x {mult}) cannot be built: it needs a positive multiple of "
                    f"{UNET_NORM_GROUPS} that splits into attention heads (num_heads {self.num_heads}, "
                    f"num_head_channels {self.num_head_channels})"
                )


@dataclass(frozen=True)
class VAEConfig(_ModelConfig):
    """diffusers ``AutoencoderKL``."""

    _class_names = ("AutoencoderKL",)

    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: tuple = (64,)
    layers_per_block: int = 1
    latent_channels: int = 4
    norm_num_groups: int = 32
    act_fn: str = "silu"
    scaling_factor: float = 0.18215
    shift_factor: float | None = None
    sample_size: int = 32
    down_block_types: tuple = ("DownEncoderBlock2D",)
    up_block_types: tuple = ("UpDecoderBlock2D",)
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True
    force_upcast: bool = True
    source: str = ""

    @property
    def downsampling_factor(self) -> int:
        """Pixels per latent cell: each encoder block but the last halves the resolution."""
        return 2 ** (len(self.block_out_channels) - 1)

    def check_geometry(self) -> None:
        """Refuse configs the backends do not build (rather than build something else): block
        types, activation, and every block width a multiple of ``norm_num_groups``."""
        where = self.source or "VAE config"
        n = len(self.block_out_channels)
        if n < 1:
            raise ModelLoadError(f"{where}: block_out_channels is empty")
        bad = [t for t in self.down_block_types if t != "DownEncoderBlock2D"]
        bad += [t for t in self.up_block_types if t != "UpDecoderBlock2D"]
        if bad:
            raise ModelLoadError(f"{where}: unsupported VAE block types {sorted(set(bad))} "
                                 "(only DownEncoderBlock2D / UpDecoderBlock2D)")
        if len(self.down_block_types) != n or len(self.up_block_types) != n:
            raise ModelLoadError(f"{where}: down/up_block_types must have one entry per block_out_channels ({n})")
        if self.act_fn not in ("silu", "swish"):
            raise ModelLoadError(f"{where}: unsupported act_fn {self.act_fn!r} (only silu)")
        if any(c % self.norm_num_groups for c in self.block_out_channels):
            raise ModelLoadError(f"{where}: block_out_channels must be divisible by norm_num_groups")


@dataclass(frozen=True)
class CLIPVisionConfig(_ModelConfig):
    """transformers ``CLIPVisionModel`` / ``CLIPVisionModelWithProjection``."""

    _class_names = ("CLIPVisionModel", "CLIPVisionModelWithProjection", "CLIPModel")

    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    image_size: int = 224
    patch_size: int = 32
    num_channels: int = 3
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    projection_dim: int = 512
    source: str = ""

    def __post_init__(self):
        _check_sizes(self, ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                            "image_size", "patch_size", "num_channels", "projection_dim"))

    @classmethod
    def from_dict(cls, data: dict, where: str = "config"):
        # A full CLIPModel config nests the vision tower's settings.
        if "vision_config" in data and isinstance(data["vision_config"], dict):
            data = {**data["vision_config"], "projection_dim": data.get("projection_dim", 512)}
        return super().from_dict(data, where)


@dataclass(frozen=True)
class CLIPTextConfig(_ModelConfig):
    """transformers ``CLIPTextModel`` / ``CLIPTextModelWithProjection``."""

    _class_names = ("CLIPTextModel", "CLIPTextModelWithProjection", "CLIPModel")

    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    projection_dim: int = 512
    bos_token_id: int = 49406
    eos_token_id: int = 49407
    pad_token_id: int = 1
    source: str = ""

    def __post_init__(self):
        _check_sizes(self, ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                            "num_attention_heads", "max_position_embeddings", "projection_dim"))

    @classmethod
    def from_dict(cls, data: dict, where: str = "config"):
        if "text_config" in data and isinstance(data["text_config"], dict):
            data = {**data["text_config"], "projection_dim": data.get("projection_dim", 512)}
        return super().from_dict(data, where)


@dataclass(frozen=True)
class UpsamplerUNetConfig(_ModelConfig):
    """diffusers ``UNet2DConditionModel`` with K-blocks (sd-x2-latent-upscaler)."""

    _class_names = ("UNet2DConditionModel",)
    _aliases = {"timestep_act_2": "timestep_post_act"}

    in_channels: int = 4
    out_channels: int = 4
    block_out_channels: tuple = (320, 640, 1280, 1280)
    layers_per_block: int = 2
    attention_head_dim: int = 8
    cross_attention_dim: int = 1280
    down_block_types: tuple = ()
    up_block_types: tuple = ()
    mid_block_type: str | None = None
    conv_in_kernel: int = 3
    conv_out_kernel: int = 3
    time_embedding_type: str = "positional"
    time_cond_proj_dim: int | None = None
    timestep_post_act: str | None = None
    act_fn: str = "silu"
    flip_sin_to_cos: bool = True
    norm_num_groups: int | None = None
    resnet_time_scale_shift: str = "default"
    sample_size: int = 64
    norm_eps: float = 1e-5
    time_embedding_dim: int | None = None
    source: str = ""


@dataclass(frozen=True)
class CLIPTower:
    """What tells the two CLIP towers' files apart (the backends add the model class): the config
    class, the tower prefix of the ``...WithProjection`` layout and the projection's weight name,
    which stands beside the prefix, never under it."""

    config: type
    prefix: str
    projection: str

    def read_state(self, folder: str | os.PathLike) -> dict:
        """The tower's tensors in the bare layout: the prefix is dropped when *every* tower key has
        it (the projection is set aside first). A file mixing both spellings keeps its prefixed
        keys, and the strict check names them."""
        state = dict(load_state(folder))
        proj = state.pop(self.projection, None)
        state = strip_prefix(state, self.prefix)
        if proj is not None:
            state[self.projection] = proj
        return state


IMAGE_TOWER = CLIPTower(CLIPVisionConfig, "vision_model.", "visual_projection.weight")
TEXT_TOWER = CLIPTower(CLIPTextConfig, "text_model.", "text_projection.weight")
