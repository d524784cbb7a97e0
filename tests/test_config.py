"""DiffusionConfig validation and the model-config readers on the published configs."""

import json
import math

import pytest

from oxigaf.config import (
    CLIPTextConfig,
    CLIPVisionConfig,
    DiffusionConfig,
    UNetConfig,
    UpsamplerUNetConfig,
    VAEConfig,
)
from oxigaf.errors import ConfigError, ModelLoadError

from conftest import CHECKPOINTS


def test_defaults_are_valid_and_carry_the_seed_fields():
    cfg = DiffusionConfig()
    assert (cfg.num_views, cfg.num_inference_steps, cfg.use_flash_attention) == (4, 50, True)
    assert 1.0 <= cfg.guidance_scale <= 20.0


def test_prediction_type_defaults_to_none_so_the_scheduler_decides():
    assert DiffusionConfig().prediction_type is None
    for kind in ("epsilon", "v_prediction", "sample"):
        assert DiffusionConfig(prediction_type=kind).prediction_type == kind


def test_to_dict_from_dict_round_trips_through_json():
    import dataclasses

    changed = DiffusionConfig(num_views=3, num_inference_steps=7, guidance_scale=2.5, use_flash_attention=False,
                              prediction_type="v_prediction", dtype="bfloat16", vae_dtype="float16",
                              attention="chunked", attention_chunk_size=64, elevation=-12.25, seed=123456789,
                              eta=0.3, ip_weight=0.7, upsampler_steps=3, low_memory=True, vae_tile_size=64,
                              compile=True)
    # every field differs from the default: the round trip below covers them all
    default = DiffusionConfig()
    assert [f.name for f in dataclasses.fields(DiffusionConfig)
            if getattr(changed, f.name) == getattr(default, f.name)] == []
    for cfg in (default, changed):
        data = json.loads(json.dumps(cfg.to_dict()))
        assert set(data) == {f.name for f in dataclasses.fields(DiffusionConfig)}
        back = DiffusionConfig.from_dict(data)
        assert back == cfg and back.to_dict() == cfg.to_dict()
    # a number written as an integer is the same setting as its float
    assert DiffusionConfig(guidance_scale=5, elevation=10).to_dict() == DiffusionConfig(
        guidance_scale=5.0, elevation=10.0).to_dict()
    assert DiffusionConfig.from_dict({"num_views": 2}) == DiffusionConfig(num_views=2)


def test_from_dict_refuses_unknown_settings_and_bad_values():
    with pytest.raises(ConfigError, match="warp_speed"):
        DiffusionConfig.from_dict({"num_views": 2, "warp_speed": 9})
    with pytest.raises(ConfigError, match="JSON object"):
        DiffusionConfig.from_dict([1, 2])
    with pytest.raises(ConfigError, match="ip_weight"):
        DiffusionConfig.from_dict({"ip_weight": "strong"})
    with pytest.raises(ConfigError, match="low_memory"):
        DiffusionConfig.from_dict({"low_memory": "yes"})


@pytest.mark.parametrize("field,value", [
    ("guidance_scale", 0.5), ("guidance_scale", 20.5), ("guidance_scale", math.nan), ("guidance_scale", "7"),
    ("num_views", 0), ("num_views", 2.0), ("num_inference_steps", 0), ("num_inference_steps", -3),
    ("dtype", "float8"), ("vae_dtype", "int8"), ("attention", "flash"), ("prediction_type", "x0"),
    ("elevation", math.inf), ("elevation", 90.0), ("seed", -1), ("eta", -0.1), ("upsampler_steps", 0),
    ("vae_tile_size", 100), ("attention_chunk_size", 0), ("ip_weight", math.inf), ("eta", "0"), ("prediction_type", ""),
    ("use_flash_attention", 1), ("low_memory", None), ("compile", "yes"),
])
def test_bad_values_name_the_field(field, value):
    with pytest.raises(ConfigError) as err:
        DiffusionConfig(**{field: value})
    assert field in str(err.value)


def test_guidance_bounds_inclusive():
    assert DiffusionConfig(guidance_scale=1.0).guidance_scale == 1.0
    assert DiffusionConfig(guidance_scale=20).guidance_scale == 20.0


def test_use_flash_attention_false_means_naive_under_auto():
    assert DiffusionConfig(use_flash_attention=False).attention_mode == "naive"
    assert DiffusionConfig(use_flash_attention=True).attention_mode == "auto"
    assert DiffusionConfig(use_flash_attention=False, attention="chunked").attention_mode == "chunked"


def test_frozen():
    import dataclasses

    with pytest.raises(dataclasses.FrozenInstanceError):
        DiffusionConfig().num_views = 8
    assert DiffusionConfig().replace(num_views=8).num_views == 8


def test_real_configs_read():
    u = UNetConfig.from_folder(CHECKPOINTS / "imagedream-unet")
    assert (u.model_channels, u.channel_mult, u.ip_dim) == (320, (1, 2, 4, 4), 16)
    assert (u.context_dim, u.camera_dim) == (1024, 16)
    assert u.heads_for(1280) == (20, 64)
    assert UNetConfig.from_folder(CHECKPOINTS / "mvdream-unet").ip_dim == 0
    v = VAEConfig.from_folder(CHECKPOINTS / "sd21-vae")
    assert (v.block_out_channels, v.layers_per_block, v.scaling_factor) == ((128, 256, 512, 512), 2, 0.18215)
    cv = CLIPVisionConfig.from_folder(CHECKPOINTS / "clip-vit-h14-vision")
    assert (cv.hidden_size, cv.num_hidden_layers, cv.patch_size, cv.hidden_act) == (1280, 32, 14, "gelu")
    ct = CLIPTextConfig.from_folder(CHECKPOINTS / "sd21-text-encoder")
    assert (ct.num_hidden_layers, ct.eos_token_id) == (23, 2)
    assert CLIPTextConfig.from_folder(CHECKPOINTS / "clip-vit-l14-text").hidden_act == "quick_gelu"
    k = UpsamplerUNetConfig.from_folder(CHECKPOINTS / "sd-x2-latent-upscaler-unet")
    assert (k.time_cond_proj_dim, k.timestep_post_act, k.in_channels, k.out_channels) == (896, "gelu", 8, 5)


def test_old_upsampler_key_spelling(tmp_path):
    data = json.loads((CHECKPOINTS / "sd-x2-latent-upscaler-unet" / "config.json").read_text())
    data["timestep_act_2"] = data.pop("timestep_post_act")
    (tmp_path / "config.json").write_text(json.dumps(data))
    assert UpsamplerUNetConfig.from_folder(tmp_path).timestep_post_act == "gelu"


def test_config_errors_name_the_file_and_key(tmp_path):
    with pytest.raises(ModelLoadError, match="config.json not found"):
        UNetConfig.from_folder(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="not valid JSON"):
        UNetConfig.from_folder(tmp_path)
    data = json.loads((CHECKPOINTS / "imagedream-unet" / "config.json").read_text())
    del data["model_channels"]
    (tmp_path / "config.json").write_text(json.dumps(data))
    with pytest.raises(ModelLoadError, match="model_channels"):
        UNetConfig.from_folder(tmp_path)
    data["model_channels"] = "wide"
    (tmp_path / "config.json").write_text(json.dumps(data))
    with pytest.raises(ModelLoadError, match="model_channels"):
        UNetConfig.from_folder(tmp_path)


def test_wrong_model_type_is_refused():
    with pytest.raises(ModelLoadError, match="AutoencoderKL"):
        UNetConfig.from_folder(CHECKPOINTS / "sd21-vae")


def _unet(**kw):
    base = dict(in_channels=4, model_channels=64, out_channels=4, num_res_blocks=1, attention_resolutions=[1],
                channel_mult=[1, 2], num_head_channels=32, context_dim=32, source="unet/config.json")
    return UNetConfig(**{**base, **kw})


def test_unet_geometry_accepts_the_published_configs():
    for name in ("imagedream-unet", "mvdream-unet"):
        UNetConfig.from_folder(CHECKPOINTS / name).check_geometry()
    _unet().check_geometry()


@pytest.mark.parametrize("kw,width", [
    (dict(model_channels=48), "48"),  # not a multiple of the 32 GroupNorm groups
    (dict(model_channels=96, num_head_channels=64), "96"),  # a multiple of 32, but not of 64-wide heads
    (dict(num_head_channels=-1, num_heads=3), "64"),  # 64 channels do not split into 3 heads
])
def test_unet_geometry_refuses_blocks_that_cannot_be_built(kw, width):
    with pytest.raises(ModelLoadError) as err:
        _unet(**kw).check_geometry()
    msg = str(err.value)
    assert "unet/config.json" in msg and "attention heads" in msg and f"a block of {width} channels" in msg


def test_vae_geometry_names_norm_num_groups():
    VAEConfig.from_folder(CHECKPOINTS / "sd21-vae").check_geometry()
    with pytest.raises(ModelLoadError, match="norm_num_groups"):
        VAEConfig(block_out_channels=(96,), norm_num_groups=64, source="vae/config.json").check_geometry()
