"""CLIP image and text encoders, both backends, against transformers' CLIP models.

The references are built here with small random configs, re-randomised so that no layer is
trivial (LayerNorm weights included), saved as float16 in transformers' own folder layout
and read back in float32 by transformers and by us.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from safetensors.numpy import load_file, save_file  # noqa: E402

from oxigaf.checkpoints import load_state, manifest_shapes, write_random_checkpoint  # noqa: E402
from oxigaf.errors import InputError, ModelLoadError  # noqa: E402
from oxigaf.plugins import get_backend  # noqa: E402

from conftest import BACKENDS, CHECKPOINTS, FIXTURES, rel_l2  # noqa: E402

TOL = 1e-4
LOW_PRECISION_TOL = {"float16": 3e-3, "bfloat16": 3e-2}
E2E = FIXTURES / "imagedream_e2e" / "model"
WEIGHTS = "model.safetensors"


def _backend(name: str):
    # torch stays on the CPU (no TF32 convolutions); mlx keeps whatever device it defaults to.
    return get_backend(name, device="cpu" if name == "torch" else None)


def _np(backend, x) -> np.ndarray:
    return backend.to_numpy(x)


def _rerandomise(model, seed: int) -> None:
    """Fan-in scaled normals for every matrix, non-trivial LayerNorm scales and biases."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if p.ndim >= 2:
                p.copy_(noise / np.sqrt(np.prod(p.shape[1:])))
            elif name.endswith("class_embedding"):
                p.copy_(noise)
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.3 * noise)
            else:
                p.copy_(0.2 * noise)


def _save_half(model, folder) -> None:
    model.half().save_pretrained(str(folder))


def _reprefix(src, dst, prefix: str, projection: str) -> None:
    """Copy a saved folder, flipping the tower prefix convention of its weights."""
    shutil.copytree(src, dst)
    state = {k: np.array(v) for k, v in load_state(src).items()}
    if any(k.startswith(prefix) for k in state):
        state = {k.removeprefix(prefix): v for k, v in state.items()}
    else:
        state = {k if k == projection else prefix + k: v for k, v in state.items()}
    save_file(state, str(dst / WEIGHTS))


def _edit_weights(src, dst, edit) -> None:
    shutil.copytree(src, dst)
    state = {k: np.array(v) for k, v in load_state(src).items()}
    save_file(edit(state), str(dst / WEIGHTS))


def _compare(ours: dict, ref: dict, keys) -> dict[str, float]:
    errors = {}
    for key in keys:
        if key == "hidden_states":
            assert len(ours[key]) == len(ref[key])
            for i, (a, b) in enumerate(zip(ours[key], ref[key], strict=True)):
                errors[f"hidden_states[{i}]"] = rel_l2(a, b)
        else:
            assert ours[key].shape == ref[key].shape, key
            errors[key] = rel_l2(ours[key], ref[key])
    bad = {k: e for k, e in errors.items() if not e <= TOL}
    assert not bad, f"relative L2 above {TOL}: {bad}"
    return errors


def _outputs(backend, out: dict) -> dict:
    res = {k: _np(backend, v) for k, v in out.items() if k != "hidden_states" and v is not None}
    if out.get("hidden_states") is not None:
        res["hidden_states"] = [_np(backend, h) for h in out["hidden_states"]]
    return res


def _reference(out) -> dict:
    res = {k: getattr(out, k).numpy() for k in ("last_hidden_state", "pooler_output", "image_embeds",
                                                   "text_embeds") if getattr(out, k, None) is not None}
    res["hidden_states"] = [h.numpy() for h in out.hidden_states]
    return res


# --------------------------------------------------------------------------- vision

VISION_CASES = {
    "proj-gelu": ("CLIPVisionModelWithProjection", "gelu"),
    "plain-quick_gelu": ("CLIPVisionModel", "quick_gelu"),
    "plain-gelu": ("CLIPVisionModel", "gelu"),
    "proj-quick_gelu": ("CLIPVisionModelWithProjection", "quick_gelu"),
}


@pytest.fixture(scope="module", params=list(VISION_CASES))
def vision_case(request, tmp_path_factory):
    cls_name, act = VISION_CASES[request.param]
    cfg = transformers.CLIPVisionConfig(
        hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
        image_size=56, patch_size=14, projection_dim=48, hidden_act=act, layer_norm_eps=1e-5,
    )
    cls = getattr(transformers, cls_name)
    torch.manual_seed(0)
    model = cls(cfg)
    _rerandomise(model, seed=len(request.param))
    folder = tmp_path_factory.mktemp(f"vision-{request.param}")
    _save_half(model, folder)
    ref_model = cls.from_pretrained(str(folder), dtype=torch.float32).eval()
    pixels = np.random.default_rng(1).standard_normal((2, 3, 56, 56)).astype(np.float32)
    with torch.no_grad():
        ref = _reference(ref_model(pixel_values=torch.from_numpy(pixels), output_hidden_states=True))
        if "pooler_output" not in ref:  # the projection class returns only its projection
            ref["pooler_output"] = ref_model.vision_model(pixel_values=torch.from_numpy(pixels)).pooler_output.numpy()
    flipped = tmp_path_factory.mktemp(f"vision-{request.param}-flipped") / "enc"
    _reprefix(folder, flipped, "vision_model.", "visual_projection.weight")
    return {"folder": folder, "flipped": flipped, "pixels": pixels, "ref": ref,
            "projection": cls_name.endswith("WithProjection")}


@pytest.mark.parametrize("flip", [False, True], ids=["as-saved", "other-prefix"])
def test_vision_matches_transformers(vision_case, backend_name, flip):
    backend = _backend(backend_name)
    enc = backend.load_image_encoder(vision_case["flipped" if flip else "folder"], dtype="float32")
    assert enc.config.hidden_act in ("gelu", "quick_gelu")
    out = _outputs(backend, enc(backend.asarray(vision_case["pixels"]), output_hidden_states=True))
    ref = vision_case["ref"]
    assert ("image_embeds" in out) == vision_case["projection"]
    keys = ["last_hidden_state", "pooler_output", "hidden_states"]
    if vision_case["projection"]:
        keys.append("image_embeds")
    errors = _compare(out, ref, keys)
    # What ImageDream consumes: the penultimate layer's states.
    assert rel_l2(out["hidden_states"][-2], ref["hidden_states"][-2]) <= TOL
    assert max(errors.values()) <= TOL


def test_vision_mixed_prefixes_rejected(vision_case, backend_name, tmp_path):
    """Half-prefixed files are not guessed at: the stray names are reported."""
    def edit(state):
        bare = {k.removeprefix("vision_model."): v for k, v in state.items()}
        bare["vision_model.post_layernorm.bias"] = bare.pop("post_layernorm.bias")
        return bare

    _edit_weights(vision_case["folder"], tmp_path / "enc", edit)
    with pytest.raises(ModelLoadError, match=r"vision_model\.post_layernorm\.bias"):
        _backend(backend_name).load_image_encoder(tmp_path / "enc")


# --------------------------------------------------------------------------- text

VOCAB = 50
TEXT_CASES = {
    "proj-gelu-eos2": ("CLIPTextModelWithProjection", "gelu", 2),
    "plain-quick_gelu-eos2": ("CLIPTextModel", "quick_gelu", 2),
    "plain-gelu-eos7": ("CLIPTextModel", "gelu", 7),
    "proj-quick_gelu-eos7": ("CLIPTextModelWithProjection", "quick_gelu", 7),
}


def _text_ids(eos: int, seed: int) -> np.ndarray:
    """Two rows of 77 ids built so that picking the wrong pooled position shows.

    Legacy rule (eos 2): the largest id (the BOS of the last row) is repeated, as CLIP-L pads
    with its end token; new rule: the EOS id appears twice and is not the largest id.
    """
    rng = np.random.default_rng(seed)
    rows = []
    for length in (9, 30):
        words = rng.integers(10, VOCAB - 2, size=length)
        if eos == 2:
            end = VOCAB - 1
            row = np.concatenate([[3], words, np.full(77 - length - 1, end)])
        else:
            row = np.concatenate([[VOCAB - 2], words, [eos, 12, eos], np.zeros(77 - length - 4, int)])
        rows.append(row)
    return np.stack(rows).astype(np.int64)


@pytest.fixture(scope="module", params=list(TEXT_CASES))
def text_case(request, tmp_path_factory):
    cls_name, act, eos = TEXT_CASES[request.param]
    cfg = transformers.CLIPTextConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
        max_position_embeddings=77, projection_dim=40, hidden_act=act, layer_norm_eps=1e-5,
        bos_token_id=VOCAB - 2 if eos != 2 else 0, eos_token_id=eos, pad_token_id=1,
    )
    cls = getattr(transformers, cls_name)
    torch.manual_seed(0)
    model = cls(cfg)
    _rerandomise(model, seed=len(request.param))
    folder = tmp_path_factory.mktemp(f"text-{request.param}")
    _save_half(model, folder)
    ref_model = cls.from_pretrained(str(folder), dtype=torch.float32).eval()
    ids = _text_ids(eos, seed=3)
    with torch.no_grad():
        out = ref_model(input_ids=torch.from_numpy(ids), output_hidden_states=True)
        ref = _reference(out)
        if "pooler_output" not in ref:  # the projection class returns only its projection
            ref["pooler_output"] = ref_model.text_model(input_ids=torch.from_numpy(ids)).pooler_output.numpy()
    flipped = tmp_path_factory.mktemp(f"text-{request.param}-flipped") / "enc"
    _reprefix(folder, flipped, "text_model.", "text_projection.weight")
    return {"folder": folder, "flipped": flipped, "ids": ids, "ref": ref, "eos": eos,
            "projection": cls_name.endswith("WithProjection")}


@pytest.mark.parametrize("flip", [False, True], ids=["as-saved", "other-prefix"])
def test_text_matches_transformers(text_case, backend_name, flip):
    backend = _backend(backend_name)
    enc = backend.load_text_encoder(text_case["flipped" if flip else "folder"], dtype="float32")
    assert enc.config.eos_token_id == text_case["eos"]
    out = _outputs(backend, enc(backend.asarray(text_case["ids"])))
    ref = text_case["ref"]
    assert ("text_embeds" in out) == text_case["projection"]
    keys = ["last_hidden_state", "pooler_output", "hidden_states"]
    if text_case["projection"]:
        keys.append("text_embeds")
    _compare(out, ref, keys)
    # What the upsampler consumes: the last layer before final_layer_norm.
    assert rel_l2(out["hidden_states"][-1], ref["hidden_states"][-1]) <= TOL


def test_text_pooled_position(text_case, backend_name):
    """The pooled row is the final state at the first qualifying position, not a later one."""
    backend = _backend(backend_name)
    enc = backend.load_text_encoder(text_case["folder"])
    ids = text_case["ids"]
    out = _outputs(backend, enc(backend.asarray(ids), output_hidden_states=False))
    target = ids.max(axis=1, keepdims=True) if text_case["eos"] == 2 else text_case["eos"]
    hits = [np.flatnonzero(row == t) for row, t in zip(ids, np.broadcast_to(target, (len(ids), 1)), strict=True)]
    assert all(len(h) >= 2 for h in hits)  # the ids really do repeat the pooled id
    for b, h in enumerate(hits):
        np.testing.assert_array_equal(out["pooler_output"][b], out["last_hidden_state"][b, h[0]])
        assert rel_l2(out["pooler_output"][b], out["last_hidden_state"][b, h[1]]) > 1e-2


# --------------------------------------------------------------------------- fixtures


def test_e2e_image_encoder_matches_transformers(backend_name):
    ref_model = transformers.CLIPVisionModel.from_pretrained(str(E2E / "image_encoder"), dtype=torch.float32)
    pixels = np.random.default_rng(5).standard_normal((1, 3, 224, 224)).astype(np.float32)
    with torch.no_grad():
        ref = _reference(ref_model(pixel_values=torch.from_numpy(pixels), output_hidden_states=True))
    backend = _backend(backend_name)
    enc = backend.load_image_encoder(E2E / "image_encoder")
    out = _outputs(backend, enc(backend.asarray(pixels)))
    assert out["hidden_states"][-2].shape == (1, 257, 1280)
    _compare(out, ref, ["last_hidden_state", "pooler_output", "hidden_states"])


def test_e2e_text_encoder_matches_transformers(backend_name):
    ref_model = transformers.CLIPTextModel.from_pretrained(str(E2E / "text_encoder"), dtype=torch.float32)
    prompt = load_file(str(FIXTURES / "imagedream_e2e" / "expected.safetensors"))["prompt_ids"].astype(np.int64)
    other = prompt.copy()
    other[1:6] = [17, 300, 4, 99, 513]  # a longer prompt with its EOS further on
    ids = np.stack([prompt, other])
    with torch.no_grad():
        ref = _reference(ref_model(input_ids=torch.from_numpy(ids), output_hidden_states=True))
    backend = _backend(backend_name)
    enc = backend.load_text_encoder(E2E / "text_encoder")
    out = _outputs(backend, enc(backend.asarray(ids)))
    _compare(out, ref, ["last_hidden_state", "pooler_output", "hidden_states"])


# --------------------------------------------------------------------------- precision, errors


@pytest.fixture(scope="module")
def small_vision_folder(tmp_path_factory):
    cfg = transformers.CLIPVisionConfig(
        hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
        image_size=56, patch_size=14, projection_dim=48, hidden_act="gelu",
    )
    torch.manual_seed(0)
    model = transformers.CLIPVisionModelWithProjection(cfg)
    _rerandomise(model, seed=11)
    folder = tmp_path_factory.mktemp("small-vision")
    _save_half(model, folder)
    return folder


# Measured (relative L2 against our float32, both backends): float16 <= 1.0e-3, bfloat16 <= 1.0e-2.
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_low_precision_close_to_float32(backend_name, dtype, small_vision_folder):
    backend = _backend(backend_name)
    tol = LOW_PRECISION_TOL[dtype]
    pixels = np.random.default_rng(5).standard_normal((2, 3, 56, 56)).astype(np.float32)
    full = _outputs(backend, backend.load_image_encoder(small_vision_folder)(backend.asarray(pixels)))
    low_enc = backend.load_image_encoder(small_vision_folder, dtype=dtype)
    low = _outputs(backend, low_enc(backend.asarray(pixels, dtype=dtype)))
    for key in ("pooler_output", "last_hidden_state", "image_embeds"):
        assert rel_l2(low[key], full[key]) <= tol, key
    assert rel_l2(low["hidden_states"][-2], full["hidden_states"][-2]) <= tol

    prompt = load_file(str(FIXTURES / "imagedream_e2e" / "expected.safetensors"))["prompt_ids"][None]
    full = _outputs(backend, backend.load_text_encoder(E2E / "text_encoder")(backend.asarray(prompt)))
    low = _outputs(backend, backend.load_text_encoder(E2E / "text_encoder", dtype=dtype)(backend.asarray(prompt)))
    for key in ("pooler_output", "last_hidden_state"):
        assert rel_l2(low[key], full[key]) <= tol, key


@pytest.mark.parametrize("component, missing", [
    ("image_encoder", "encoder.layers.1.mlp.fc2.bias"),
    ("image_encoder", "embeddings.class_embedding"),
    ("text_encoder", "final_layer_norm.weight"),
    ("text_encoder", "encoder.layers.0.self_attn.q_proj.weight"),
])
def test_missing_tensor_is_named(backend_name, tmp_path, component, missing):
    def edit(state):
        assert missing in state
        del state[missing]
        return state

    _edit_weights(E2E / component, tmp_path / component, edit)
    backend = _backend(backend_name)
    load = backend.load_image_encoder if component == "image_encoder" else backend.load_text_encoder
    with pytest.raises(ModelLoadError, match="missing") as err:
        load(tmp_path / component)
    assert missing in str(err.value)


def test_unexpected_and_misshaped_tensors_are_named(backend_name, tmp_path):
    def edit(state):
        state["encoder.layers.0.mlp.fc3.weight"] = state["encoder.layers.0.mlp.fc2.weight"]
        state["final_layer_norm.bias"] = np.zeros(65, np.float16)
        return state

    _edit_weights(E2E / "text_encoder", tmp_path / "te", edit)
    with pytest.raises(ModelLoadError) as err:
        _backend(backend_name).load_text_encoder(tmp_path / "te")
    assert "encoder.layers.0.mlp.fc3.weight" in str(err.value)
    assert "final_layer_norm.bias" in str(err.value)


def test_unknown_activation_is_rejected(backend_name, tmp_path):
    shutil.copytree(E2E / "text_encoder", tmp_path / "te")
    cfg = json.loads((tmp_path / "te" / "config.json").read_text())
    cfg["hidden_act"] = "swish"
    (tmp_path / "te" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match="swish"):
        _backend(backend_name).load_text_encoder(tmp_path / "te")


def test_bad_inputs_are_rejected(backend_name):
    backend = _backend(backend_name)
    image = backend.load_image_encoder(E2E / "image_encoder")
    with pytest.raises(InputError, match="224"):
        image(backend.asarray(np.zeros((1, 3, 112, 112), np.float32)))
    text = backend.load_text_encoder(E2E / "text_encoder")
    with pytest.raises(InputError, match="514"):
        text(backend.asarray(np.full((1, 77), 514, np.int64)))
    with pytest.raises(InputError, match="77"):
        text(backend.asarray(np.zeros((1, 78), np.int64)))
    with pytest.raises(InputError, match="integer"):
        text(backend.asarray(np.zeros((1, 77), np.float32)))


# --------------------------------------------------------------------------- real shapes


@pytest.fixture(scope="module")
def real_shape_folders(tmp_path_factory):
    folders = {}
    for i, name in enumerate(("clip-vit-h14-vision", "sd21-text-encoder", "clip-vit-l14-text")):
        folder = tmp_path_factory.mktemp(name)
        shutil.copy(CHECKPOINTS / name / "config.json", folder / "config.json")
        write_random_checkpoint(manifest_shapes(CHECKPOINTS / name / "keys.json"), folder / WEIGHTS,
                                seed=i, dtype=np.float16)
        folders[name] = folder
    yield folders
    for folder in folders.values():  # ~2.3 GB of random weights: do not leave them in pytest's temp dirs
        shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["clip-vit-h14-vision", "sd21-text-encoder", "clip-vit-l14-text"])
@pytest.mark.parametrize("backend_name", BACKENDS)
def test_real_shapes_load_strictly(real_shape_folders, name, backend_name):
    backend = _backend(backend_name)
    folder = real_shape_folders[name]
    if name == "clip-vit-h14-vision":
        enc = backend.load_image_encoder(folder, dtype="float16")
        assert (enc.config.hidden_size, enc.config.num_hidden_layers, enc.config.hidden_act) == (1280, 32, "gelu")
        assert not any(k.startswith("visual_projection") for k, _ in _param_names(backend_name, enc))
        return
    enc = backend.load_text_encoder(folder, dtype="float16")
    assert enc.config.eos_token_id == 2
    ids = np.array([[49406, 320, 49407, 0, 0, 0, 0, 0]], np.int64)  # short: float16 matmuls are slow on CPUs
    out = enc(backend.asarray(ids))
    assert out["last_hidden_state"].shape == (1, 8, enc.config.hidden_size)
    assert len(out["hidden_states"]) == enc.config.num_hidden_layers + 1
    assert backend.isfinite(out["pooler_output"])


def _param_names(backend_name, module):
    if backend_name == "torch":
        return module.named_parameters()
    from mlx.utils import tree_flatten

    return tree_flatten(module.parameters())
