"""Finding model folders, reading their configs and weights, and checking weights strictly.

Weights are read from safetensors files straight into numpy (memory-mapped, so only what a
backend copies is ever resident). numpy has no bfloat16, so bfloat16 tensors are widened to
float32 on read; float16 and float32 stay as stored. Backends convert to their compute dtype.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np

from .errors import ModelLoadError, OxigafError

# Tensors that some published files carry but that are buffers, not parameters, in every
# implementation: skipped by exact name suffix, never by a loose match.
HARMLESS_EXTRAS = ("position_ids",)

_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": np.uint16,  # widened to float32 in _bf16_to_f32
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}

# A header larger than this is not a real safetensors header (the format caps it at 100 MB).
_MAX_HEADER = 100_000_000


def is_hub_id(ref: str) -> bool:
    """A hub id looks like ``owner/name`` and is not an existing local path."""
    parts = ref.split("/")
    return len(parts) == 2 and all(parts) and not ref.startswith((".", "/", "~"))


def resolve_model(ref: str | os.PathLike, *, allow_patterns: list[str] | None = None) -> Path:
    """Return the local folder for a model reference: a local folder, or a hub id.

    Hub ids go through ``huggingface_hub.snapshot_download``, which honours ``HF_HUB_OFFLINE``
    and the cache; offline and not cached is a ``ModelLoadError`` naming the id.
    """
    path = Path(os.path.expanduser(str(ref)))
    if path.is_dir():
        return path
    if path.exists():
        raise ModelLoadError(f"model path {str(ref)!r} is a file; expected a model folder")
    ref = str(ref)
    if not is_hub_id(ref):
        raise ModelLoadError(f"model folder {ref!r} does not exist (and is not a hub id owner/name)")
    try:
        from huggingface_hub import snapshot_download
    except ImportError as exc:  # pragma: no cover - depends on the installed extras
        raise ModelLoadError(
            f"{ref!r} is not a local folder; loading hub ids needs huggingface_hub "
            "(pip install 'oxigaf[hub]')"
        ) from exc
    try:
        return Path(snapshot_download(ref, allow_patterns=allow_patterns))
    except Exception as exc:  # huggingface_hub raises many kinds; all mean "not available"
        offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
        why = "HF_HUB_OFFLINE is set and it is not in the local cache" if offline else str(exc)
        raise ModelLoadError(f"cannot get model {ref!r} from the Hugging Face hub: {why}") from exc


def read_json(path: str | os.PathLike, what: str | None = None) -> dict:
    """Read a JSON object, turning a missing or corrupt file into a ``ModelLoadError``."""
    path = Path(path)
    what = what or path.name
    if not path.is_file():
        raise ModelLoadError(f"{what} not found: {path}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"{what} is not valid JSON: {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise ModelLoadError(f"{what} must hold a JSON object: {path}")
    return data


def weight_files(folder: str | os.PathLike) -> list[Path]:
    """The safetensors files of a component folder: one file, or the shards of an index."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ModelLoadError(f"model component folder not found: {folder}")
    indexes = sorted(folder.glob("*.safetensors.index.json"))
    if indexes:
        index = read_json(indexes[0], "safetensors index")
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ModelLoadError(f"safetensors index has no weight_map: {indexes[0]}")
        shards = sorted({folder / name for name in weight_map.values()})
        missing = [str(s) for s in shards if not s.is_file()]
        if missing:
            raise ModelLoadError(f"shards named in {indexes[0].name} are missing: {', '.join(missing)}")
        return shards
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"no .safetensors weights in {folder}")
    if len(files) > 1:
        # diffusers folders may hold both a full and a fp16 variant; prefer the plain name.
        plain = [f for f in files if f.name in ("diffusion_pytorch_model.safetensors", "model.safetensors")]
        if len(plain) == 1:
            return plain
        raise ModelLoadError(
            f"several safetensors files and no index in {folder}: {', '.join(f.name for f in files)}"
        )
    return files


def _bf16_to_f32(raw: np.ndarray) -> np.ndarray:
    return (raw.astype(np.uint32) << 16).view(np.float32)


def _header_ints(value, count: int | None) -> tuple[int, ...] | None:
    """A header list of non-negative integers (``count`` of them if given), else None."""
    if not isinstance(value, list) or (count is not None and len(value) != count):
        return None
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value):
        return None
    return tuple(value)


def _read_header(path: Path) -> tuple[list[tuple], int, int]:
    """The checked entries ``(name, dtype name, numpy dtype, shape, begin, end)`` of a safetensors
    file, the offset of its data and the data's size. Reads the header only."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ModelLoadError(f"not a safetensors file (too short): {path}")
            (n,) = struct.unpack("<Q", head)
            if n == 0 or n > _MAX_HEADER or 8 + n > size:
                raise ModelLoadError(f"not a safetensors file or truncated (header size {n}): {path}")
            raw = f.read(n)
    except OSError as exc:
        raise ModelLoadError(f"cannot read weights file {path}: {exc}") from exc
    try:
        header = json.loads(raw)
    except (ValueError, RecursionError) as exc:  # bad JSON, bad encoding, absurd nesting
        raise ModelLoadError(f"corrupt safetensors header in {path}: {type(exc).__name__}") from exc
    if not isinstance(header, dict):
        raise ModelLoadError(f"corrupt safetensors header in {path}")
    header.pop("__metadata__", None)
    data_size = size - 8 - n
    entries = []
    for name, info in header.items():
        kind = info.get("dtype") if isinstance(info, dict) else None
        dtype = _DTYPES.get(kind) if isinstance(kind, str) else None
        shape = _header_ints(info.get("shape"), None) if isinstance(info, dict) else None
        offsets = _header_ints(info.get("data_offsets"), 2) if isinstance(info, dict) else None
        if dtype is None or shape is None or offsets is None:
            raise ModelLoadError(
                f"corrupt entry {name!r} in safetensors header of {path} (needs a known dtype, a shape of "
                "non-negative integers and two data offsets)"
            )
        begin, end = offsets
        nbytes = math.prod(shape) * np.dtype(dtype).itemsize  # Python ints: no overflow
        if end > data_size or end - begin != nbytes:
            raise ModelLoadError(
                f"tensor {name!r} lies outside the data of {path} (file truncated or corrupt)"
            )
        entries.append((name, kind, dtype, shape, begin, end))
    return entries, 8 + n, data_size


def read_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read one safetensors file into numpy arrays (memory-mapped; bf16 widened to float32).

    Truncated, corrupt or foreign files raise ``ModelLoadError`` naming the file.
    """
    path = Path(path)
    entries, offset, data_size = _read_header(path)
    mm = np.memmap(path, dtype=np.uint8, mode="r", offset=offset, shape=(data_size,)) if data_size else None
    out: dict[str, np.ndarray] = {}
    for name, kind, dtype, shape, begin, end in entries:
        try:
            arr = mm[begin:end].view(dtype).reshape(shape) if end > begin else np.zeros(shape, dtype)
        except ValueError as exc:  # e.g. an empty tensor with an absurd dimension
            raise ModelLoadError(f"tensor {name!r} in {path} has an impossible shape {list(shape)}") from exc
        out[name] = _bf16_to_f32(arr) if kind == "BF16" else arr
    return out


def read_shapes(folder: str | os.PathLike) -> dict[str, tuple[int, ...]]:
    """Names and shapes of a component folder's tensors, from the file headers alone.

    The cheap check of a folder before loading it: missing, truncated and corrupt files fail
    here as in ``load_state``, but no tensor data is read.
    """
    shapes: dict[str, tuple[int, ...]] = {}
    for file in weight_files(folder):
        for name, _, _, shape, _, _ in _read_header(file)[0]:
            if name in shapes:
                raise ModelLoadError(f"tensor {name!r} appears in more than one shard of {folder}")
            shapes[name] = shape
    return shapes


def load_state(folder: str | os.PathLike) -> dict[str, np.ndarray]:
    """All tensors of a component folder (single file or shards), by name."""
    state: dict[str, np.ndarray] = {}
    for file in weight_files(folder):
        for name, arr in read_safetensors(file).items():
            if name in state:
                raise ModelLoadError(f"tensor {name!r} appears in more than one shard of {folder}")
            state[name] = arr
    return state


def strip_prefix(state: Mapping[str, np.ndarray], prefix: str) -> dict[str, np.ndarray]:
    """Drop ``prefix`` from every key when all keys carry it (e.g. transformers' ``text_model.``)."""
    if state and all(k.startswith(prefix) for k in state):
        return {k[len(prefix):]: v for k, v in state.items()}
    return dict(state)


def rename(state: Mapping[str, np.ndarray], table: Mapping[str, str]) -> dict[str, np.ndarray]:
    """Rename key *segments* by an explicit table (``.query.`` -> ``.to_q.``); exact, not fuzzy."""
    out = {}
    for key, value in state.items():
        parts = key.split(".")
        for i, part in enumerate(parts):
            if part in table:
                parts[i] = table[part]
        out[".".join(parts)] = value
    return out


def check_state(
    expected: Mapping[str, tuple[int, ...]],
    found: Mapping[str, tuple[int, ...]],
    where: str,
    *,
    ignore: Iterable[str] = HARMLESS_EXTRAS,
) -> None:
    """Compare expected names/shapes with a file's; one ``ModelLoadError`` lists every problem."""
    ignore = tuple(ignore)
    missing = sorted(k for k in expected if k not in found)
    unexpected = sorted(k for k in found if k not in expected and not k.endswith(ignore))
    misshaped = sorted(
        f"{k}: file {tuple(found[k])} vs model {tuple(expected[k])}"
        for k in expected
        if k in found and tuple(found[k]) != tuple(expected[k])
    )
    if not (missing or unexpected or misshaped):
        return
    lines = [f"weights in {where} do not match the model:"]
    for title, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", misshaped)):
        if items:
            lines.append(f"  {title} ({len(items)}): " + ", ".join(items))
    raise ModelLoadError("\n".join(lines))


def guarded(what: str, load, folder, **kwargs):
    """``load(folder, **kwargs)``: a backend's model loader. The config checks catch what they know
    of; anything else that fails while building the model from a config still ends as a
    ``ModelLoadError`` naming the model and the folder."""
    try:
        return load(folder, **kwargs)
    except OxigafError:
        raise
    except (ArithmeticError, LookupError, TypeError, ValueError, AttributeError) as exc:
        raise ModelLoadError(f"cannot build the {what} from {folder}: {type(exc).__name__}: {exc}") from exc


def manifest_shapes(keys_json: str | os.PathLike) -> dict[str, tuple[int, ...]]:
    """Names and shapes from a ``keys.json`` manifest (``{name: shape}``)."""
    return {k: tuple(v) for k, v in read_json(keys_json, "checkpoint manifest").items()}


def write_random_checkpoint(
    shapes: Mapping[str, tuple[int, ...]], path: str | os.PathLike, *, seed: int = 0,
    dtype=np.float16, std: float = 0.02,
) -> None:
    """Write a safetensors file with random tensors of the given names and shapes.

    Used by tests (real-shape manifests) and the demo model; values are small normals.
    """
    from safetensors.numpy import save_file

    rng = np.random.default_rng(seed)
    tensors = {
        name: (rng.standard_normal(shape, dtype=np.float32) * std).astype(dtype)
        for name, shape in shapes.items()
    }
    save_file(tensors, str(path))
