"""CLIP's text tokenizer: byte-level BPE with a ``</w>`` word suffix, 77 ids per prompt.

The tokenizer is built on the Hugging Face ``tokenizers`` library with the same pieces that
transformers' ``CLIPTokenizer`` assembles (transformers 5; it is what diffusers pipelines and
the ImageDream / MVDream diffusers port use), so ids agree with it:

- normaliser: Unicode NFC, every whitespace run to one space, lowercase (CLIP's own
  ``ftfy`` clean-up is not applied, as in transformers);
- pre-tokeniser: CLIP's split pattern (specials, English contractions, letter runs, single
  digits, punctuation runs), then the GPT-2 byte-to-unicode mapping;
- BPE with ``</w>`` marking the end of a word, no dropout, unknown pieces kept separate;
- ``<|startoftext|> ids <|endoftext|>``, cut so that the last kept id is always the end token,
  then padded with the folder's pad token.

The pad token differs between checkpoints and must be read from the folder: Stable Diffusion
2.x (and so MVDream / ImageDream) pads with ``"!"`` (id 0), CLIP ViT-L/14 with
``<|endoftext|>``. As in transformers, every special token, the pad token included, is also
matched in the prompt text, so a ``"!"`` typed in a prompt becomes id 0 under the SD 2.x
tokenizer (OpenCLIP's own tokenizer would give ``"!</w>"``, id 256).

Where the settings come from, in transformers' order: ``tokenizer_config.json``; when that file
has no ``added_tokens_decoder`` (older saves), ``special_tokens_map.json`` overrides its special
tokens and the ``added_tokens`` of ``tokenizer.json`` are registered. The vocabulary and merges
are read from ``tokenizer.json`` when present, else from ``vocab.json`` and ``merges.txt``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
from tokenizers import AddedToken, Regex, Tokenizer, normalizers, pre_tokenizers
from tokenizers.models import BPE

from .checkpoints import read_json
from .errors import InputError, ModelLoadError

__all__ = ["CLIPTokenizer", "DEFAULT_MAX_LENGTH"]

DEFAULT_MAX_LENGTH = 77

# CLIP's split pattern (openai/CLIP simple_tokenizer.py) as transformers spells it.
_SPLIT_PATTERN = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""

# Named special tokens in transformers' SPECIAL_TOKENS_ATTRIBUTES order (the order decides the
# id of a special token that is not in the vocabulary) with CLIPTokenizer's defaults.
_SPECIAL_DEFAULTS = {
    "bos_token": "<|startoftext|>",
    "eos_token": "<|endoftext|>",
    "unk_token": "<|endoftext|>",
    "pad_token": "<|endoftext|>",
}
_EXTRA_KEYS = ("additional_special_tokens", "extra_special_tokens")
_TOKEN_FLAGS = ("single_word", "lstrip", "rstrip", "normalized")


def _as_added_token(value, where: str, *, special: bool = True) -> AddedToken:
    """A token as a ``str``, an ``AddedToken`` or its JSON form (``{"content": ..., flags}``)."""
    if isinstance(value, AddedToken):
        return value
    if isinstance(value, str):
        # A bare string: special tokens are matched verbatim, before normalisation.
        return AddedToken(value, special=special, normalized=not special)
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        flags = {k: bool(value[k]) for k in _TOKEN_FLAGS if k in value}
        return AddedToken(value["content"], special=bool(value.get("special", special)), **flags)
    raise ModelLoadError(f"{where}: a token must be a string or an object with 'content', got {value!r}")


def _read_merges_txt(path: Path) -> list[tuple[str, str]]:
    merges: list[tuple[str, str]] = []
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ModelLoadError(f"cannot read merges file {path}: {exc}") from exc
    for number, line in enumerate(text.split("\n"), start=1):
        line = line.rstrip("\r")
        if not line or line.startswith("#version"):
            continue
        parts = line.split(" ")
        if len(parts) != 2 or not all(parts):
            raise ModelLoadError(f"{path}: line {number} is not a merge 'a b': {line!r}")
        merges.append((parts[0], parts[1]))
    return merges


def _parse_merges(raw, where: str) -> list[tuple[str, str]]:
    if not isinstance(raw, list):
        raise ModelLoadError(f"{where}: 'merges' must be a list")
    merges = []
    for item in raw:
        # tokenizers writes "a b" strings (older files) or ["a", "b"] pairs (0.20 and later).
        pair = item.split(" ") if isinstance(item, str) else item
        if not isinstance(pair, (list, tuple)) or len(pair) != 2 or not all(isinstance(p, str) for p in pair):
            raise ModelLoadError(f"{where}: bad merge entry {item!r}")
        merges.append((pair[0], pair[1]))
    return merges


def _check_vocab(vocab, where: str) -> dict[str, int]:
    if not isinstance(vocab, dict) or not vocab:
        raise ModelLoadError(f"{where}: the vocabulary must be a non-empty JSON object token -> id")
    for token, index in vocab.items():
        if not isinstance(token, str) or isinstance(index, bool) or not isinstance(index, int) or index < 0:
            raise ModelLoadError(f"{where}: bad vocabulary entry {token!r}: {index!r}")
    return vocab


class CLIPTokenizer:
    """Turns prompts into CLIP token ids: ``tok(["a cat", ""]) -> int64 (2, 77)``."""

    def __init__(
        self,
        vocab: Mapping[str, int],
        merges: Sequence[tuple[str, str]],
        *,
        bos_token="<|startoftext|>",
        eos_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        model_max_length: int = DEFAULT_MAX_LENGTH,
        added_tokens: Iterable = (),
        extra_special_tokens: Iterable = (),
        where: str = "tokenizer",
    ):
        vocab = _check_vocab(dict(vocab), where)
        merges = [tuple(m) for m in merges]
        if isinstance(model_max_length, bool) or not isinstance(model_max_length, int) or model_max_length < 2:
            raise ModelLoadError(f"{where}: model_max_length must be an integer >= 2, got {model_max_length!r}")
        specials = {
            "bos_token": _as_added_token(bos_token, where),
            "eos_token": _as_added_token(eos_token, where),
            "unk_token": _as_added_token(unk_token, where),
            "pad_token": _as_added_token(pad_token, where),
        }
        try:
            model = BPE(
                vocab=vocab,
                merges=merges,
                dropout=None,
                continuing_subword_prefix="",
                end_of_word_suffix="</w>",
                fuse_unk=False,
                unk_token=specials["unk_token"].content,
            )
        except Exception as exc:  # the Rust side reports bad merges as a plain Exception
            raise ModelLoadError(f"{where}: cannot build the BPE model: {exc}") from exc
        tok = Tokenizer(model)
        tok.normalizer = normalizers.Sequence(
            [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
        )
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(_SPLIT_PATTERN), behavior="removed", invert=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False),
            ]
        )
        # Registered tokens are cut out of the text before normalisation and BPE, which is how
        # transformers treats the special tokens (the pad token included) and saved added tokens.
        to_add: list[AddedToken] = [_as_added_token(t, where, special=False) for t in added_tokens]
        to_add += [_as_added_token(t, where) for t in extra_special_tokens]
        seen = {t.content for t in to_add}
        for token in specials.values():
            if token.content not in seen:
                to_add.append(token)
                seen.add(token.content)
        tok.add_tokens(to_add)
        self._tokenizer = tok
        self.model_max_length = model_max_length
        self.bos_token = specials["bos_token"].content
        self.eos_token = specials["eos_token"].content
        self.pad_token = specials["pad_token"].content
        self.unk_token = specials["unk_token"].content
        self.bos_token_id = self._id(self.bos_token)
        self.eos_token_id = self._id(self.eos_token)
        self.pad_token_id = self._id(self.pad_token)

    def _id(self, token: str) -> int:
        index = self._tokenizer.token_to_id(token)
        if index is None:  # pragma: no cover - add_tokens always assigns an id
            raise ModelLoadError(f"tokenizer has no id for {token!r}")
        return int(index)

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike) -> CLIPTokenizer:
        """Read a ``tokenizer/`` folder as saved by transformers (any version)."""
        folder = Path(folder)
        if not folder.is_dir():
            raise ModelLoadError(f"tokenizer folder not found: {folder}")
        config_path = folder / "tokenizer_config.json"
        config = read_json(config_path, "tokenizer_config.json") if config_path.is_file() else {}
        where = str(folder)

        tokenizer_json = folder / "tokenizer.json"
        file_added: list = []
        if tokenizer_json.is_file():
            data = read_json(tokenizer_json, "tokenizer.json")
            model = data.get("model")
            if not isinstance(model, dict) or model.get("type", "BPE") != "BPE":
                raise ModelLoadError(f"{tokenizer_json}: expected a BPE model, got {model.get('type')!r}"
                                     if isinstance(model, dict) else f"{tokenizer_json}: no 'model' section")
            vocab = _check_vocab(model.get("vocab"), str(tokenizer_json))
            merges = _parse_merges(model.get("merges", []), str(tokenizer_json))
            file_added = data.get("added_tokens") or []
            if not isinstance(file_added, list):
                raise ModelLoadError(f"{tokenizer_json}: 'added_tokens' must be a list")
        else:
            vocab_path, merges_path = folder / "vocab.json", folder / "merges.txt"
            missing = [p.name for p in (vocab_path, merges_path) if not p.is_file()]
            if missing:
                raise ModelLoadError(
                    f"tokenizer folder {folder} has no tokenizer.json and lacks {' and '.join(missing)}"
                )
            try:
                vocab = json.loads(vocab_path.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise ModelLoadError(f"vocab.json is not valid JSON: {vocab_path}: {exc}") from exc
            vocab = _check_vocab(vocab, str(vocab_path))
            merges = _read_merges_txt(merges_path)

        specials = {key: config.get(key, default) for key, default in _SPECIAL_DEFAULTS.items()}
        extras = [t for key in _EXTRA_KEYS for t in (config.get(key) or [])]
        if "added_tokens_decoder" in config:
            decoder = config["added_tokens_decoder"]
            if not isinstance(decoder, dict):
                raise ModelLoadError(f"{config_path}: 'added_tokens_decoder' must be an object")
            try:
                ordered = sorted(decoder.items(), key=lambda item: int(item[0]))
            except ValueError as exc:
                raise ModelLoadError(f"{config_path}: 'added_tokens_decoder' keys must be ids") from exc
            added = [token for _, token in ordered]
        else:
            map_path = folder / "special_tokens_map.json"
            if map_path.is_file():
                for key, value in read_json(map_path, "special_tokens_map.json").items():
                    if key in specials:
                        specials[key] = value
                    elif key in _EXTRA_KEYS and isinstance(value, list):
                        extras += [t for t in value if t not in extras]
            added = [{k: v for k, v in t.items() if k != "id"} if isinstance(t, dict) else t for t in file_added]

        max_length = config.get("model_max_length", DEFAULT_MAX_LENGTH)
        # Configs saved without a limit carry a huge sentinel (int(1e30)); CLIP's context is 77.
        if isinstance(max_length, (int, float)) and not isinstance(max_length, bool) and max_length > 1_000_000:
            max_length = DEFAULT_MAX_LENGTH
        if isinstance(max_length, float) and max_length.is_integer():
            max_length = int(max_length)
        return cls(
            vocab,
            merges,
            **specials,
            model_max_length=max_length,
            added_tokens=added,
            extra_special_tokens=extras,
            where=where,
        )

    @property
    def vocab_size(self) -> int:
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    def tokenize(self, text: str) -> list[str]:
        """The BPE pieces of one prompt, without start/end tokens (for inspection)."""
        return self._tokenizer.encode(self._check_text(text), add_special_tokens=False).tokens

    def encode(self, text: str) -> list[int]:
        """The ids of one prompt with start and end tokens, neither truncated nor padded."""
        ids = self._tokenizer.encode(self._check_text(text), add_special_tokens=False).ids
        return [self.bos_token_id, *ids, self.eos_token_id]

    @staticmethod
    def _check_text(text) -> str:
        if not isinstance(text, str):
            raise InputError(f"a prompt must be a str, got {type(text).__name__}")
        return text

    def __call__(self, texts: str | Sequence[str], max_length: int | None = None) -> np.ndarray:
        """Token ids ``int64 (B, max_length)``: start, ids, end, then pad; a str gives B = 1."""
        length = self.model_max_length if max_length is None else max_length
        if isinstance(length, bool) or not isinstance(length, int) or length < 2:
            raise InputError(f"max_length must be an integer >= 2, got {max_length!r}")
        batch = [texts] if isinstance(texts, str) else texts
        if not isinstance(batch, (list, tuple)):
            raise InputError(f"prompts must be a str or a list of str, got {type(texts).__name__}")
        batch = [self._check_text(t) for t in batch]
        out = np.full((len(batch), length), self.pad_token_id, dtype=np.int64)
        if not batch:
            return out
        encodings = self._tokenizer.encode_batch(batch, add_special_tokens=False)
        for row, encoding in zip(out, encodings, strict=True):
            ids = encoding.ids[: length - 2]
            row[0] = self.bos_token_id
            row[1 : 1 + len(ids)] = ids
            row[1 + len(ids)] = self.eos_token_id
        return out

    def __repr__(self) -> str:
        return (
            f"CLIPTokenizer(vocab_size={self.vocab_size}, max_length={self.model_max_length}, "
            f"pad={self.pad_token!r}:{self.pad_token_id})"
        )
