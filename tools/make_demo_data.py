"""Regenerate ``oxigaf/demo_data``: configs and tensor manifests (names and shapes, no weights)
of the tiny random-weight model that ``oxigaf demo`` builds. Dev-only: needs diffusers and
transformers for the upsampler's shapes.

    python tools/make_demo_data.py tests/fixtures/imagedream_e2e/model
"""

import json
import shutil
import sys
from pathlib import Path

from oxigaf.checkpoints import load_state

OUT = Path(__file__).resolve().parents[1] / "oxigaf" / "demo_data"

UPSCALER_UNET = {
    "_class_name": "UNet2DConditionModel", "act_fn": "gelu", "attention_head_dim": 16,
    "block_out_channels": [32, 32, 64, 64], "conv_in_kernel": 1, "conv_out_kernel": 1,
    "cross_attention_dim": 32, "down_block_types": ["KDownBlock2D", "KCrossAttnDownBlock2D",
                                                    "KCrossAttnDownBlock2D", "KCrossAttnDownBlock2D"],
    "in_channels": 8, "layers_per_block": 1, "mid_block_type": None, "norm_num_groups": None, "out_channels": 5,
    "resnet_time_scale_shift": "scale_shift", "time_cond_proj_dim": 160, "time_embedding_type": "fourier",
    "timestep_post_act": "gelu", "flip_sin_to_cos": True, "sample_size": 64,
    "up_block_types": ["KCrossAttnUpBlock2D", "KCrossAttnUpBlock2D", "KCrossAttnUpBlock2D", "KUpBlock2D"],
}
UPSCALER_TEXT = {
    "architectures": ["CLIPTextModel"], "model_type": "clip_text_model", "vocab_size": 514, "hidden_size": 32,
    "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2, "max_position_embeddings": 77,
    "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5, "projection_dim": 32, "bos_token_id": 0,
    "eos_token_id": 2, "pad_token_id": 1,
}
UPSCALER_SCHEDULER = {
    "_class_name": "EulerDiscreteScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "beta_start": 0.00085, "interpolation_type": "log_linear", "num_train_timesteps": 1000,
    "prediction_type": "sample", "steps_offset": 1,
    "trained_betas": None,
}


def manifest(folder: Path) -> dict:
    return {k: list(v.shape) for k, v in sorted(load_state(folder).items())}


def main(model: Path) -> None:
    if OUT.exists():
        shutil.rmtree(OUT)
    dst = OUT / "imagedream"
    OUT.mkdir(parents=True)
    shutil.copy(model.parent / "input.png", OUT / "portrait.png")  # the fixture's public-domain NASA portrait
    shutil.copytree(model, dst, ignore=shutil.ignore_patterns("*.safetensors"))
    for comp in ("unet", "vae", "text_encoder", "image_encoder"):
        (dst / comp / "keys.json").write_text(json.dumps(manifest(model / comp)))

    import torch
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    up = OUT / "upscaler"
    for comp in ("unet", "text_encoder", "tokenizer", "scheduler"):
        (up / comp).mkdir(parents=True)
    with torch.device("meta"):
        unet = UNet2DConditionModel(**{k: v for k, v in UPSCALER_UNET.items() if not k.startswith("_")})
        text = CLIPTextModel(CLIPTextConfig(**{k: v for k, v in UPSCALER_TEXT.items() if k != "architectures"}))
    (up / "unet" / "config.json").write_text(json.dumps(UPSCALER_UNET, indent=2))
    (up / "unet" / "keys.json").write_text(json.dumps({k: list(v.shape) for k, v in unet.state_dict().items()}))
    shapes = {k.removeprefix("text_model."): list(v.shape) for k, v in text.state_dict().items()
              if not k.endswith("position_ids")}
    (up / "text_encoder" / "config.json").write_text(json.dumps(UPSCALER_TEXT, indent=2))
    (up / "text_encoder" / "keys.json").write_text(json.dumps(shapes))
    (up / "scheduler" / "scheduler_config.json").write_text(json.dumps(UPSCALER_SCHEDULER, indent=2))
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(model / "tokenizer" / name, up / "tokenizer" / name)
    tok_cfg = json.loads((model / "tokenizer" / "tokenizer_config.json").read_text())
    tok_cfg["pad_token"] = "<|endoftext|>"  # CLIP-L pads with end-of-text, SD 2.1's tokenizer with "!"
    (up / "tokenizer" / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2))
    (up / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionLatentUpscalePipeline", "scheduler": ["diffusers", "EulerDiscreteScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"]}, indent=2))
    print("wrote", OUT)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
