"""The framework-neutral parts of the multi-view UNet that both backends share: the resampler's
fixed geometry and the checks of a call's inputs (on shapes, so they name the problem the same
way in either backend, before any work is done).
"""

from __future__ import annotations

from .errors import InputError

# The reference hard-codes the IP-Adapter-Plus resampler's geometry (only its query count,
# ``ip_dim``, and its width, ``context_dim``, come from the config).
RESAMPLER_DEPTH = 4
RESAMPLER_HEADS = 12
RESAMPLER_DIM_HEAD = 64
RESAMPLER_EMBEDDING_DIM = 1280  # CLIP ViT-H/14 hidden size
RESAMPLER_FF_MULT = 4

NO_IMAGE_PROMPT = "this UNet has no image-prompt path (ip_dim 0); pass ip=None and ip_img=None"


def check_frames(num_frames, n: int) -> None:
    """``num_frames``: a positive integer dividing the batch ``n``."""
    if not isinstance(num_frames, int) or isinstance(num_frames, bool) or num_frames < 1 or n % num_frames:
        raise InputError(f"num_frames must be a positive integer dividing the batch {n}; got {num_frames!r}")


def check_latents(shape: tuple, in_channels: int, levels: int) -> None:
    """``x``: (B·F, in_channels, h, w), h and w multiples of 2^(levels − 1)."""
    if len(shape) != 4 or shape[1] != in_channels:
        raise InputError(f"x must be (B·F, {in_channels}, h, w); got {tuple(shape)}")
    factor = 1 << (levels - 1)
    if shape[2] % factor or shape[3] % factor:
        raise InputError(f"latent height and width must be multiples of {factor}; got {shape[2]}x{shape[3]}")


def check_cache(made_for: tuple, call: tuple, conditioning: bool) -> None:
    """A call with ``cache=``: a cache made for this call's (batch, num_frames) (``made_for``;
    (None, None): not a cache), and no ``context``/``camera``/``ip`` beside it (``conditioning``)."""
    if conditioning:
        raise InputError("pass either cache= or context/camera/ip, not both")
    if tuple(made_for) != tuple(call):
        raise InputError(f"cache was prepared for (batch, num_frames) {tuple(made_for)}; this call has {tuple(call)}")


def check_camera(shape: tuple, n: int, camera_dim: int | None) -> None:
    """``camera``: (n, camera_dim), for a UNet that has a camera embedding."""
    if camera_dim is None:
        raise InputError("this UNet has no camera embedding; pass camera=None")
    if tuple(shape) != (n, camera_dim):
        raise InputError(f"camera must be ({n}, {camera_dim}); got {tuple(shape)}")


def check_image_prompt(shape: tuple | None, n: int, ip_dim: int) -> None:
    """``ip`` (``shape`` None: not given): CLIP hidden states (n, T, 1280), required by an
    ImageDream UNet (``ip_dim`` > 0) and refused by any other."""
    if ip_dim == 0:
        if shape is not None:
            raise InputError(NO_IMAGE_PROMPT)
        return
    if shape is None:
        raise InputError(f"ImageDream UNet needs ip (CLIP hidden states, (B·F, 257, {RESAMPLER_EMBEDDING_DIM}))")
    if len(shape) != 3 or shape[0] != n or shape[2] != RESAMPLER_EMBEDDING_DIM:
        raise InputError(f"ip must be ({n}, T, {RESAMPLER_EMBEDDING_DIM}); got {tuple(shape)}")


def check_reference(shape: tuple, x_shape: tuple, num_frames: int, ip_dim: int) -> None:
    """``ip_img``: (B, c ≤ C, h, w) reference latents for the (B·F, C, h, w) ``x``."""
    if ip_dim == 0:
        raise InputError(NO_IMAGE_PROMPT)
    n, c, h, w = x_shape
    batch = n // num_frames
    if len(shape) != 4 or shape[0] != batch or tuple(shape[2:]) != (h, w) or shape[1] > c:
        raise InputError(f"ip_img must be ({batch}, <= {c}, {h}, {w}); got {tuple(shape)}")
