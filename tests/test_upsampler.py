"""The sd-x2 latent upscaler: its K-UNet and the whole upsampling loop, both backends, against diffusers.

References are built here with small random configs of the published structure, every parameter
re-randomised (diffusers zero-initialises some layers) so no path is dead, saved as float16 in
diffusers' / transformers' folder layout and read back in float32 by the reference and by us.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

from safetensors.numpy import load_file, save_file  # noqa: E402

from oxigaf.checkpoints import manifest_shapes, write_random_checkpoint  # noqa: E402
from oxigaf.config import UpsamplerUNetConfig  # noqa: E402
from oxigaf.errors import InputError, ModelLoadError  # noqa: E402
from oxigaf.plugins import get_backend  # noqa: E402
from oxigaf.upsampler import BilinearUpsampler, LatentUpsampler, kunet_plan  # noqa: E402

from conftest import BACKENDS, CHECKPOINTS, FIXTURES, rel_l2  # noqa: E402

TOL = 1e-4
UNET_WEIGHTS = "diffusion_pytorch_model.safetensors"
TEXT_DIM = 32
UNET_CONFIG = dict(
    act_fn="gelu",
    attention_head_dim=16,
    block_out_channels=[32, 32, 64, 64],
    conv_in_kernel=1,
    conv_out_kernel=1,
    cross_attention_dim=TEXT_DIM,
    down_block_types=["KDownBlock2D", "KCrossAttnDownBlock2D", "KCrossAttnDownBlock2D", "KCrossAttnDownBlock2D"],
    up_block_types=["KCrossAttnUpBlock2D", "KCrossAttnUpBlock2D", "KCrossAttnUpBlock2D", "KUpBlock2D"],
    in_channels=8,
    out_channels=5,
    layers_per_block=2,
    mid_block_type=None,
    norm_num_groups=None,
    resnet_time_scale_shift="scale_shift",
    time_cond_proj_dim=128 + TEXT_DIM,  # noise-level features + the pooled text feature
    time_embedding_type="fourier",
    timestep_post_act="gelu",
)
# As the published scheduler: scaled-linear betas, log-linear sigmas, a model that predicts x0.
SCHEDULER_CONFIG = {
    "_class_name": "EulerDiscreteScheduler",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "interpolation_type": "log_linear",
    "num_train_timesteps": 1000,
    "prediction_type": "sample",
    "steps_offset": 1,
    "trained_betas": None,
}


def _backend(name: str):
    # torch stays on the CPU (no TF32 convolutions); mlx keeps whatever device it defaults to.
    return get_backend(name, device="cpu" if name == "torch" else None)


def _rerandomise(model, seed: int) -> None:
    """Fan-in scaled normals for every matrix, non-trivial norm scales, biases and frequencies."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if p.ndim >= 2:
                p.copy_(noise / np.sqrt(np.prod(p.shape[1:])))
            elif name == "time_proj.weight":
                p.copy_(noise)  # Fourier frequencies: a standard normal, as diffusers draws them
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.3 * noise)
            else:
                p.copy_(0.2 * noise)


def _make_unet(folder, seed: int = 0, **overrides):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    model = UNet2DConditionModel(**{**UNET_CONFIG, **overrides})
    _rerandomise(model, seed)
    model.half().save_pretrained(str(folder), safe_serialization=True)
    return UNet2DConditionModel.from_pretrained(str(folder), torch_dtype=torch.float32).eval()


def _unet_inputs(batch=2, h=16, w=24, seed=0):
    rng = np.random.default_rng(seed)
    return dict(
        sample=rng.standard_normal((batch, 8, h, w), dtype=np.float32),
        timestep=np.linspace(-0.6, 0.9, batch).astype(np.float32),
        encoder_hidden_states=rng.standard_normal((batch, 7, TEXT_DIM), dtype=np.float32),
        timestep_cond=rng.standard_normal((batch, 128 + TEXT_DIM), dtype=np.float32),
    )


def _run_ours(backend, unet, inputs, timestep=None) -> np.ndarray:
    t = inputs["timestep"] if timestep is None else timestep
    out = unet(backend.asarray(inputs["sample"]), t if isinstance(t, float) else backend.asarray(t),
               backend.asarray(inputs["encoder_hidden_states"]),
               timestep_cond=backend.asarray(inputs["timestep_cond"]))
    return backend.to_numpy(out)


def _run_reference(ref, inputs, timestep=None) -> np.ndarray:
    t = torch.from_numpy(inputs["timestep"]) if timestep is None else torch.tensor(timestep)
    with torch.no_grad():
        return ref(torch.from_numpy(inputs["sample"]), t, torch.from_numpy(inputs["encoder_hidden_states"]),
                   timestep_cond=torch.from_numpy(inputs["timestep_cond"])).sample.numpy()


# --------------------------------------------------------------------------- the K-UNet


@pytest.fixture(scope="module")
def unet_case(tmp_path_factory):
    folder = tmp_path_factory.mktemp("kunet")
    ref = _make_unet(folder)
    inputs = _unet_inputs()
    return folder, ref, inputs, _run_reference(ref, inputs)


@pytest.mark.parametrize("name", BACKENDS)
def test_unet_matches_diffusers(unet_case, name):
    folder, _, inputs, expected = unet_case
    backend = _backend(name)
    unet = backend.load_upsampler_unet(folder, dtype="float32")
    got = _run_ours(backend, unet, inputs)
    assert got.shape == expected.shape == (2, 5, 16, 24)
    assert got.dtype == np.float32
    assert rel_l2(got, expected) <= TOL


def test_unet_runs_without_a_graph_unless_a_gradient_is_wanted(unet_case):
    # The pipeline calls it with grad mode on: the layers (Winograd convolutions among them) must
    # see it off all the same, and on again when the input needs a gradient.
    folder, _, inputs, expected = unet_case
    backend = _backend("torch")
    unet = backend.load_upsampler_unet(folder, dtype="float32")
    seen = []
    unet.conv_in.register_forward_hook(lambda *_: seen.append(torch.is_grad_enabled()))
    sample = torch.from_numpy(inputs["sample"])
    rest = (torch.from_numpy(inputs["timestep"]), torch.from_numpy(inputs["encoder_hidden_states"]))
    cond = torch.from_numpy(inputs["timestep_cond"])
    out = unet(sample, *rest, timestep_cond=cond)
    assert torch.is_grad_enabled() and seen == [False] and out.grad_fn is None
    assert rel_l2(out.numpy(), expected) <= TOL
    out = unet(sample.requires_grad_(True), *rest, timestep_cond=cond)
    assert seen == [False, True] and out.grad_fn is not None


@pytest.mark.parametrize("name", BACKENDS)
def test_unet_scalar_timestep_and_no_condition(unet_case, name):
    folder, ref, inputs, _ = unet_case
    backend = _backend(name)
    unet = backend.load_upsampler_unet(folder, dtype="float32")
    assert rel_l2(_run_ours(backend, unet, inputs, timestep=0.3), _run_reference(ref, inputs, timestep=0.3)) <= TOL
    # Without the timestep condition (cond_proj skipped), as diffusers allows.
    got = backend.to_numpy(unet(backend.asarray(inputs["sample"]), 0.3,
                                backend.asarray(inputs["encoder_hidden_states"])))
    with torch.no_grad():
        want = ref(torch.from_numpy(inputs["sample"]), torch.tensor(0.3),
                   torch.from_numpy(inputs["encoder_hidden_states"])).sample.numpy()
    assert rel_l2(got, want) <= TOL


@pytest.mark.parametrize("name", BACKENDS)
def test_unet_every_parameter_matters(unet_case, name, tmp_path):
    """Perturbing a parameter of each kind moves the output: the parity above is not vacuous."""
    folder, _, inputs, expected = unet_case
    state = load_file(str(folder / UNET_WEIGHTS))
    backend = _backend(name)
    for key in ("time_proj.weight", "time_embedding.cond_proj.weight", "up_blocks.0.attentions.1.attn1.to_v.weight",
                "down_blocks.1.attentions.0.attn2.norm_cross.weight", "up_blocks.1.resnets.1.conv_shortcut.weight",
                "down_blocks.0.resnets.0.norm1.linear.weight"):
        edited = tmp_path / key
        edited.mkdir()
        shutil.copy(folder / "config.json", edited / "config.json")
        save_file({**state, key: (state[key].astype(np.float32) * 1.5 + 0.1).astype(np.float16)},
                  str(edited / UNET_WEIGHTS))
        got = _run_ours(backend, backend.load_upsampler_unet(edited), inputs)
        assert rel_l2(got, expected) > 1e-3, key


@pytest.mark.parametrize("name", BACKENDS)
def test_unet_float16_close_to_float32(unet_case, name):
    folder, _, inputs, expected = unet_case
    backend = _backend(name)
    got = _run_ours(backend, backend.load_upsampler_unet(folder, dtype="float16"), inputs)
    assert got.dtype == np.float32  # the output takes the dtype of the input
    assert rel_l2(got, expected) <= 5e-3


def test_unet_old_config_spelling(unet_case, tmp_path):
    """Older copies of the published config spell ``timestep_post_act`` as ``timestep_act_2``."""
    folder, _, inputs, expected = unet_case
    config = json.loads((folder / "config.json").read_text())
    config["timestep_act_2"] = config.pop("timestep_post_act")
    (tmp_path / "config.json").write_text(json.dumps(config))
    shutil.copy(folder / UNET_WEIGHTS, tmp_path / UNET_WEIGHTS)
    assert UpsamplerUNetConfig.from_folder(tmp_path).timestep_post_act == "gelu"
    backend = _backend("torch")
    assert rel_l2(_run_ours(backend, backend.load_upsampler_unet(tmp_path), inputs), expected) <= TOL


def test_unet_one_layer_per_block(tmp_path):
    """layers_per_block 1 changes which resnet widens and which skips exist."""
    ref = _make_unet(tmp_path, seed=3, layers_per_block=1)
    inputs = _unet_inputs(batch=1, h=16, w=16, seed=3)
    backend = _backend("torch")
    got = _run_ours(backend, backend.load_upsampler_unet(tmp_path), inputs)
    assert rel_l2(got, _run_reference(ref, inputs)) <= TOL


@pytest.mark.parametrize("name", BACKENDS)
def test_unet_missing_tensor_is_named(unet_case, name, tmp_path):
    folder, *_ = unet_case
    state = load_file(str(folder / UNET_WEIGHTS))
    missing = "up_blocks.0.attentions.0.attn1.to_k.bias"
    del state[missing]
    shutil.copy(folder / "config.json", tmp_path / "config.json")
    save_file(state, str(tmp_path / UNET_WEIGHTS))
    with pytest.raises(ModelLoadError, match="missing.*" + missing.replace(".", r"\.")):
        _backend(name).load_upsampler_unet(tmp_path)


@pytest.mark.parametrize("name", BACKENDS)
def test_unet_bad_inputs(unet_case, name):
    folder, _, inputs, _ = unet_case
    backend = _backend(name)
    unet = backend.load_upsampler_unet(folder)
    x, ctx, cond = (backend.asarray(inputs[k]) for k in ("sample", "encoder_hidden_states", "timestep_cond"))
    with pytest.raises(InputError, match="multiples of 8"):
        unet(backend.asarray(inputs["sample"][:, :, :12]), 0.1, ctx, timestep_cond=cond)
    with pytest.raises(InputError, match="sample must be"):
        unet(backend.asarray(inputs["sample"][:, :4]), 0.1, ctx, timestep_cond=cond)
    with pytest.raises(InputError, match="timestep"):
        unet(x, backend.asarray(np.zeros(3, np.float32)), ctx, timestep_cond=cond)
    with pytest.raises(InputError, match="timestep_cond"):
        unet(x, 0.1, ctx, timestep_cond=backend.asarray(inputs["timestep_cond"][:, :10]))


def test_plan_rejects_other_unets():
    base = UpsamplerUNetConfig.from_dict({**UNET_CONFIG, "_class_name": "UNet2DConditionModel"})
    data = {**UNET_CONFIG, "_class_name": "UNet2DConditionModel"}
    assert kunet_plan(base).downsamplings == 3
    for change in ({"mid_block_type": "UNetMidBlock2DCrossAttn"}, {"time_embedding_type": "positional"},
                   {"down_block_types": ["DownBlock2D"] * 4}, {"norm_num_groups": 32}):
        with pytest.raises(ModelLoadError):
            kunet_plan(UpsamplerUNetConfig.from_dict({**data, **change}))


# --------------------------------------------------------------------------- the whole loop


def _write_tokenizer(dst) -> None:
    """The tiny BPE tokenizer of the e2e fixture, padded with <|endoftext|> as CLIP-L's is."""
    src = FIXTURES / "imagedream_e2e" / "model" / "tokenizer"
    shutil.copytree(src, dst)
    config = json.loads((dst / "tokenizer_config.json").read_text())
    config["pad_token"] = "<|endoftext|>"
    (dst / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    tok = json.loads((dst / "tokenizer.json").read_text())
    tok["added_tokens"] = [t for t in tok["added_tokens"] if t["content"] != "!"]
    (dst / "tokenizer.json").write_text(json.dumps(tok))


@pytest.fixture(scope="module")
def upscaler_folder(tmp_path_factory):
    """A tiny random model in the published sd-x2-latent-upscaler folder layout."""
    from transformers import CLIPTextConfig, CLIPTextModel

    root = tmp_path_factory.mktemp("sd-x2-tiny")
    _make_unet(root / "unet", seed=1)
    # CLIP-L style: quick_gelu and the legacy eos_token_id 2 (pooled at the largest id).
    text_config = CLIPTextConfig(vocab_size=514, hidden_size=TEXT_DIM, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, max_position_embeddings=77, hidden_act="quick_gelu",
                                 bos_token_id=0, eos_token_id=2, pad_token_id=1, projection_dim=TEXT_DIM)
    torch.manual_seed(2)
    text = CLIPTextModel(text_config)
    _rerandomise(text, 2)
    text.half().save_pretrained(str(root / "text_encoder"))
    _write_tokenizer(root / "tokenizer")
    (root / "scheduler").mkdir()
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps(SCHEDULER_CONFIG))
    (root / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionLatentUpscalePipeline"}))
    return root


@pytest.fixture(scope="module")
def reference_pipeline(upscaler_folder):
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        StableDiffusionLatentUpscalePipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextModel, CLIPTokenizer

    root = upscaler_folder
    pipe = StableDiffusionLatentUpscalePipeline(
        # The VAE is only needed by the constructor: latents in, latents out never touch it.
        vae=AutoencoderKL(block_out_channels=(32,), norm_num_groups=32, latent_channels=4),
        text_encoder=CLIPTextModel.from_pretrained(str(root / "text_encoder"), dtype=torch.float32).eval(),
        tokenizer=CLIPTokenizer.from_pretrained(str(root / "tokenizer")),
        unet=UNet2DConditionModel.from_pretrained(str(root / "unet"), torch_dtype=torch.float32).eval(),
        scheduler=EulerDiscreteScheduler.from_pretrained(str(root / "scheduler")),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _reference_run(pipe, latents, noise, steps, prompt, negative_prompt=None, guidance_scale=1.0) -> np.ndarray:
    with torch.no_grad():
        out = pipe(prompt=prompt, negative_prompt=negative_prompt, image=torch.from_numpy(latents),
                   num_inference_steps=steps, guidance_scale=guidance_scale, output_type="latent",
                   latents=torch.from_numpy(noise))
    return out.images.numpy()


class _Counting:
    """Wraps a model callable and records the batch size of every call."""

    def __init__(self, fn):
        self.fn, self.batches = fn, []

    def __call__(self, x, *args, **kwargs):
        self.batches.append(int(x.shape[0]))
        return self.fn(x, *args, **kwargs)


@pytest.mark.parametrize("name", BACKENDS)
def test_loop_matches_diffusers_pipeline(upscaler_folder, reference_pipeline, name):
    rng = np.random.default_rng(5)
    latents = rng.standard_normal((1, 4, 8, 12), dtype=np.float32)
    noise = rng.standard_normal((1, 4, 16, 24), dtype=np.float32)
    expected = _reference_run(reference_pipeline, latents, noise, 3, "")

    up = LatentUpsampler.from_pretrained(upscaler_folder, backend=name, device="cpu" if name == "torch" else None)
    up.unet = unet = _Counting(up.unet)
    up.text_encoder = text = _Counting(up.text_encoder)
    steps = []
    got = up(latents, num_inference_steps=3, noise=noise, callback=lambda i, t, x: steps.append((i, x.shape)))
    assert got.shape == (1, 4, 16, 24) and got.dtype == np.float32
    assert rel_l2(got, expected) <= TOL
    assert unet.batches == [1, 1, 1]  # guidance 1.0: no unconditional batch
    assert steps == [(0, (1, 4, 16, 24)), (1, (1, 4, 16, 24)), (2, (1, 4, 16, 24))]
    # The text features are cached: a second call encodes nothing.
    again = up(latents, num_inference_steps=3, noise=noise)
    assert text.batches == [1]
    np.testing.assert_array_equal(again, got)


@pytest.mark.parametrize("name", BACKENDS)
def test_loop_with_guidance_matches_diffusers_pipeline(upscaler_folder, reference_pipeline, name):
    rng = np.random.default_rng(6)
    latents = rng.standard_normal((2, 4, 8, 8), dtype=np.float32)
    noise = rng.standard_normal((2, 4, 16, 16), dtype=np.float32)
    prompts, negatives = ["a portrait photo", "a face, high detail"], ["blurry", "low quality, blurry"]
    expected = _reference_run(reference_pipeline, latents, noise, 2, prompts, negatives, guidance_scale=4.0)

    up = LatentUpsampler.from_pretrained(upscaler_folder, backend=name, device="cpu" if name == "torch" else None)
    up.unet = unet = _Counting(up.unet)
    got = up(latents, prompt=prompts, negative_prompt=negatives, num_inference_steps=2, guidance_scale=4.0,
             noise=noise)
    assert unet.batches == [4, 4]
    assert rel_l2(got, expected) <= TOL
    # The guidance really acts: without it the result differs.
    plain = up(latents, prompt=prompts, num_inference_steps=2, noise=noise)
    assert rel_l2(plain, expected) > 1e-3


def test_loop_seed_and_inputs(upscaler_folder):
    up = LatentUpsampler.from_pretrained(upscaler_folder, backend="torch", device="cpu")
    latents = np.random.default_rng(0).standard_normal((1, 4, 8, 8), dtype=np.float32)
    a = up(latents, num_inference_steps=1, seed=7)
    noise = np.random.default_rng(7).standard_normal((1, 4, 16, 16), dtype=np.float32)
    np.testing.assert_array_equal(a, up(latents, num_inference_steps=1, noise=noise))
    assert rel_l2(up(latents, num_inference_steps=1, seed=8), a) > 1e-3
    with pytest.raises(InputError, match="multiples of 4"):
        up(latents[:, :, :6], num_inference_steps=1, seed=0)
    with pytest.raises(InputError, match="4-channel"):
        up(np.zeros((1, 3, 8, 8), np.float32), num_inference_steps=1, seed=0)
    with pytest.raises(InputError, match="noise must have shape"):
        up(latents, num_inference_steps=1, noise=noise[:, :, :8])
    with pytest.raises(InputError, match="NaN"):
        up(np.full((1, 4, 8, 8), np.nan, np.float32), num_inference_steps=1, seed=0)
    with pytest.raises(InputError, match="prompt has 3 entries"):
        up(latents, prompt=["a", "b", "c"], num_inference_steps=1, seed=0)


def test_from_pretrained_names_missing_parts(upscaler_folder, tmp_path):
    shutil.copytree(upscaler_folder, tmp_path / "m")
    shutil.rmtree(tmp_path / "m" / "scheduler")
    with pytest.raises(ModelLoadError, match="scheduler"):
        LatentUpsampler.from_pretrained(tmp_path / "m", backend="torch", device="cpu")


# --------------------------------------------------------------------------- bilinear fallback


def test_bilinear_matches_interpolate():
    x = np.random.default_rng(0).standard_normal((2, 4, 5, 7), dtype=np.float32)
    want = torch.nn.functional.interpolate(torch.from_numpy(x), scale_factor=2, mode="bilinear",
                                           align_corners=False).numpy()
    up = BilinearUpsampler()
    got = up(x, prompt="ignored", num_inference_steps=3, seed=1)
    assert got.shape == (2, 4, 10, 14) and got.dtype == np.float32
    assert np.abs(got - want).max() <= 1e-6
    # Backend arrays and float64 go in as well; a constant stays constant.
    np.testing.assert_allclose(up(torch.from_numpy(x)), got, atol=1e-6)
    np.testing.assert_array_equal(up(np.full((1, 4, 3, 3), 2.5)), np.full((1, 4, 6, 6), 2.5, np.float32))
    with pytest.raises(InputError):
        up(np.zeros((4, 3, 3), np.float32))


# --------------------------------------------------------------------------- the real checkpoint's shapes


@pytest.fixture(scope="module")
def real_shape_folder(tmp_path_factory):
    src = CHECKPOINTS / "sd-x2-latent-upscaler-unet"
    folder = tmp_path_factory.mktemp("sd-x2-unet-real-shapes")
    shutil.copy(src / "config.json", folder / "config.json")
    write_random_checkpoint(manifest_shapes(src / "keys.json"), folder / UNET_WEIGHTS, seed=0, std=0.02)
    return folder


@pytest.mark.slow
def test_real_shapes_load_strictly_and_agree(real_shape_folder):
    """The published names and shapes load strictly in every backend, and the backends agree."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 8, 16, 16), dtype=np.float32)
    ctx = rng.standard_normal((1, 77, 768), dtype=np.float32)
    cond = rng.standard_normal((1, 896), dtype=np.float32)
    outs = {}
    for name in BACKENDS:
        backend = _backend(name)
        unet = backend.load_upsampler_unet(real_shape_folder)
        out = unet(backend.asarray(x), 0.25 * np.log(3.0), backend.asarray(ctx), timestep_cond=backend.asarray(cond))
        outs[name] = backend.to_numpy(out)
        assert outs[name].shape == (1, 5, 16, 16) and np.isfinite(outs[name]).all()
    if len(outs) == 2:
        assert rel_l2(outs["mlx"], outs["torch"]) <= TOL


@pytest.mark.slow
@pytest.mark.parametrize("name", BACKENDS)
def test_real_shapes_missing_tensor_is_named(real_shape_folder, name, tmp_path):
    state = load_file(str(real_shape_folder / UNET_WEIGHTS))
    missing = "down_blocks.3.attentions.2.attn1.to_out.0.weight"
    del state[missing]
    shutil.copy(real_shape_folder / "config.json", tmp_path / "config.json")
    save_file(state, str(tmp_path / UNET_WEIGHTS))
    with pytest.raises(ModelLoadError, match=missing.replace(".", r"\.")):
        _backend(name).load_upsampler_unet(tmp_path)
