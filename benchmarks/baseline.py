"""The reference cost model for one multi-view UNet step: diffusers' SD 2.1-base UNet.

The published ImageDream UNet is the SD 2.1-base UNet plus a camera embedding, an image-prompt
resampler and extra image-prompt keys/values in every cross-attention; its self-attention joins
the tokens of all F frames of a batch item (``(b·f, l, c) -> (b, f·l, c)``). No implementation
of the reference model itself runs here (it needs xformers), so the stand-in is diffusers'
``UNet2DConditionModel`` with the SD 2.1-base config and an attention processor that joins the
frames in ``attn1`` and otherwise does what diffusers' default processor does (SDPA). It does
less work than the real model (no resampler, no image-prompt attention, no camera MLP), so
matching it is a conservative bar.
"""

from __future__ import annotations

import torch

SD21_BASE = dict(
    sample_size=32,
    in_channels=4,
    out_channels=4,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    cross_attention_dim=1024,
    attention_head_dim=[5, 10, 20, 20],  # diffusers' name for the head count in SD 2.x configs
    use_linear_projection=True,
    act_fn="silu",
    norm_num_groups=32,
    norm_eps=1e-5,
    flip_sin_to_cos=True,
    freq_shift=0,
)


# The demo model's shape (oxigaf/demo_data/imagedream/unet): the same block pattern at 64 channels,
# 32-wide heads (diffusers' head counts 2, 2, 2, 4) and a 64-wide context.
DEMO = {**SD21_BASE, "block_out_channels": (64, 64, 64, 128), "attention_head_dim": [2, 2, 2, 4],
        "cross_attention_dim": 64}
CONFIGS = {"imagedream": SD21_BASE, "demo": DEMO}


class JoinedFramesProcessor:
    """diffusers' SDPA processor, with self-attention over the tokens of all frames of an item."""

    def __init__(self, num_frames: int):
        from diffusers.models.attention_processor import AttnProcessor2_0

        self.num_frames = num_frames
        self.inner = AttnProcessor2_0()

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kw):
        if encoder_hidden_states is not None or self.num_frames == 1:
            return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        bf, n, c = hidden_states.shape
        joined = hidden_states.reshape(bf // self.num_frames, self.num_frames * n, c)
        return self.inner(attn, joined, None, attention_mask, temb).reshape(bf, n, c)


def build(dtype: torch.dtype, device: torch.device | str, num_frames: int, seed: int = 0,
          config: str = "imagedream"):
    """The SD 2.1-base UNet (``config`` "demo": at the demo model's shape) in ``dtype`` with
    diffusers' own random init, in eval mode."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**CONFIGS[config])
    unet.set_attn_processor(JoinedFramesProcessor(num_frames))
    return unet.to(device=device, dtype=dtype).eval().requires_grad_(False)


def call(unet, x, t, context):
    return unet(x, t, encoder_hidden_states=context, return_dict=False)[0]
