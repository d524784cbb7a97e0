"""Reading safetensors (single, sharded, fp16/bf16/fp32), strict checks, model resolution."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from safetensors.numpy import save_file

from oxigaf.checkpoints import (
    check_state,
    load_state,
    manifest_shapes,
    read_safetensors,
    rename,
    resolve_model,
    strip_prefix,
    weight_files,
    write_random_checkpoint,
)
from oxigaf.errors import ModelLoadError

from conftest import CHECKPOINTS, make_hub_cache


def _bf16_bytes(x: np.ndarray) -> np.ndarray:
    return (x.astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)


def test_fp16_fp32_and_bf16_read(tmp_path):
    rng = np.random.default_rng(0)
    a = rng.standard_normal((3, 4)).astype(np.float32)
    save_file({"a32": a, "a16": a.astype(np.float16)}, str(tmp_path / "m.safetensors"))
    st = read_safetensors(tmp_path / "m.safetensors")
    assert st["a32"].dtype == np.float32 and st["a16"].dtype == np.float16
    np.testing.assert_array_equal(st["a32"], a)
    # bf16 written by hand (numpy has no bf16): header + raw bytes.
    raw = _bf16_bytes(a)
    header = json.dumps({"w": {"dtype": "BF16", "shape": [3, 4], "data_offsets": [0, raw.nbytes]}}).encode()
    (tmp_path / "b.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + raw.tobytes())
    w = read_safetensors(tmp_path / "b.safetensors")["w"]
    assert w.dtype == np.float32
    np.testing.assert_allclose(w, a, rtol=2 ** -7)  # bf16 keeps 8 bits of mantissa
    assert not np.array_equal(w, a)


def test_sharded_checkpoint(tmp_path):
    save_file({"x": np.ones(2, np.float16)}, str(tmp_path / "model-00001-of-00002.safetensors"))
    save_file({"y": np.zeros(3, np.float16)}, str(tmp_path / "model-00002-of-00002.safetensors"))
    index = {"metadata": {}, "weight_map": {"x": "model-00001-of-00002.safetensors",
                                            "y": "model-00002-of-00002.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    assert len(weight_files(tmp_path)) == 2
    state = load_state(tmp_path)
    assert set(state) == {"x", "y"} and state["y"].shape == (3,)
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(ModelLoadError, match="00002"):
        load_state(tmp_path)


def test_check_state_lists_every_problem_in_one_error():
    expected = {"a": (2, 2), "b": (3,), "c": (4,)}
    found = {"a": (2, 2), "b": (5,), "d": (1,), "text_model.embeddings.position_ids": (1, 77)}
    with pytest.raises(ModelLoadError) as err:
        check_state(expected, found, "unet/x.safetensors")
    msg = str(err.value)
    assert "missing (1): c" in msg and "unexpected (1): d" in msg and "b: file (5,) vs model (3,)" in msg
    assert "position_ids" not in msg and "unet/x.safetensors" in msg
    check_state(expected, {**expected, "embeddings.position_ids": (1, 77)}, "ok")


@pytest.mark.parametrize("content", [b"", b"abc", b"\xff" * 8 + b"{}", (100).to_bytes(8, "little") + b"{" * 100,
                                     (4).to_bytes(8, "little") + b"[1] "])
def test_garbage_files_are_model_load_errors(tmp_path, content):
    p = tmp_path / "bad.safetensors"
    p.write_bytes(content)
    with pytest.raises(ModelLoadError, match="bad.safetensors"):
        read_safetensors(p)


def test_truncated_file_names_the_tensor(tmp_path):
    p = tmp_path / "m.safetensors"
    save_file({"big": np.ones((64, 64), np.float32)}, str(p))
    data = p.read_bytes()
    p.write_bytes(data[:-100])
    with pytest.raises(ModelLoadError, match="big"):
        read_safetensors(p)


def test_prefix_and_rename_helpers():
    st = {"text_model.a": 1, "text_model.b": 2}
    assert strip_prefix(st, "text_model.") == {"a": 1, "b": 2}
    assert strip_prefix({"a": 1, "text_model.b": 2}, "text_model.") == {"a": 1, "text_model.b": 2}
    assert rename({"mid.attentions.0.query.weight": 0}, {"query": "to_q"}) == {"mid.attentions.0.to_q.weight": 0}


def test_random_checkpoint_from_manifest_matches_it(tmp_path):
    shapes = manifest_shapes(CHECKPOINTS / "sd21-text-encoder" / "keys.json")
    small = {k: v for k, v in list(shapes.items())[:8]}
    write_random_checkpoint(small, tmp_path / "model.safetensors")
    state = load_state(tmp_path)
    check_state(small, {k: v.shape for k, v in state.items()}, "random")
    assert all(v.dtype == np.float16 for v in state.values())


def test_resolve_local_and_missing(tmp_path):
    assert resolve_model(tmp_path) == tmp_path
    with pytest.raises(ModelLoadError, match="does not exist"):
        resolve_model(tmp_path / "nope")
    (tmp_path / "f").write_text("x")
    with pytest.raises(ModelLoadError, match="is a file"):
        resolve_model(tmp_path / "f")


def _resolve_offline(cache, ref):
    code = textwrap.dedent(f"""
        from oxigaf.checkpoints import resolve_model
        from oxigaf.errors import ModelLoadError
        try:
            print("OK", resolve_model({ref!r}))
        except ModelLoadError as e:
            print("ERR", e)
    """)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "HF_HOME": str(cache.parent / "hf")}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env).stdout


def test_hub_id_resolves_from_local_cache_offline(tmp_path):
    src = tmp_path / "src"
    (src / "unet").mkdir(parents=True)
    (src / "unet" / "config.json").write_text("{}")
    snapshot = make_hub_cache(tmp_path / "hub", "someone/tiny-model", src)
    out = _resolve_offline(tmp_path / "hub", "someone/tiny-model")
    assert out.startswith("OK") and str(snapshot) in out, out
    out = _resolve_offline(tmp_path / "hub", "someone/not-cached")
    assert out.startswith("ERR") and "someone/not-cached" in out and "HF_HUB_OFFLINE" in out, out
