"""oxigaf.tokenizers.CLIPTokenizer against transformers' CLIPTokenizer (the reference).

Two vocabularies: the tiny one of the ImageDream fixture, and the real 49408-token CLIP BPE
vocabulary in tests/fixtures/clip_bpe (built from OpenCLIP's bpe_simple_vocab_16e6.txt.gz,
see the README there) with two tokenizer configs: SD 2.1's (pad "!", id 0) and CLIP-L's
(pad <|endoftext|>).
"""

import gzip
import json
import shutil

import numpy as np
import pytest

from oxigaf.errors import InputError, ModelLoadError
from oxigaf.tokenizers import CLIPTokenizer

from conftest import FIXTURES

transformers = pytest.importorskip("transformers")

CLIP_BPE = FIXTURES / "clip_bpe"
TINY = FIXTURES / "imagedream_e2e" / "model" / "tokenizer"
BOS, EOS = 49406, 49407

PROMPTS = [
    "a photo of an astronaut riding a horse on mars",
    "Hello, World! How's it going?",
    "ALL CAPS and MiXeD CaSe",
    "a   lot    of\tspaces\t\tand\nnew\r\nlines  \n ",
    "   ",
    "",
    "don't stop, it'll be fine; we're here, I'm ok, they've gone, she'd go, it's the cat's",
    "Café crème, naïve façade, Ångström, Cafe\u0301 (decomposed)",
    "東京タワーの写真, 한국어, русский текст",
    "a portrait 😀🎉 with emoji 👩\u200d👩\u200d👧 and ✨",
    "3D render, 4k, 1920x1080, 12.5%, #1, 007",
    "!!! wow!! so good!",
    "<|startoftext|>hello<|endoftext|> world",
    "under_score, hy-phen, a/b\\c, (parens) [brackets] {braces}, \"quotes\" 'single'",
    "Ｆｕｌｌｗｉｄｔｈ ＬＥＴＴＥＲＳ and İstanbul",
    "a highly detailed portrait of a person, " * 12,
    "cat " * 75,
    "cat " * 76,
]


def _reference_ids(folder, texts):
    ref = transformers.CLIPTokenizer.from_pretrained(str(folder))
    out = ref(texts, padding="max_length", max_length=77, truncation=True)["input_ids"]
    return np.asarray(out, dtype=np.int64), ref


def _unpack_bpe(dst):
    dst.mkdir(parents=True, exist_ok=True)
    for name in ("vocab.json", "merges.txt"):
        with gzip.open(CLIP_BPE / f"{name}.gz", "rb") as src, open(dst / name, "wb") as out:
            shutil.copyfileobj(src, out)
    return dst


@pytest.fixture(scope="module")
def bpe_folders(tmp_path_factory):
    """Tokenizer folders of the real CLIP vocabulary: vocab.json + merges.txt + configs."""
    root = tmp_path_factory.mktemp("clip_bpe")
    folders = {}
    for variant in ("sd21", "clip_l"):
        folder = _unpack_bpe(root / variant)
        for cfg in (CLIP_BPE / variant).iterdir():
            shutil.copy(cfg, folder / cfg.name)
        folders[variant] = folder
    return folders


def test_real_vocab_fixture_shape():
    with gzip.open(CLIP_BPE / "vocab.json.gz", "rt", encoding="utf-8") as f:
        vocab = json.load(f)
    with gzip.open(CLIP_BPE / "merges.txt.gz", "rt", encoding="utf-8") as f:
        merges = [line for line in f.read().split("\n") if line and not line.startswith("#version")]
    assert len(vocab) == 49408 and sorted(vocab.values()) == list(range(49408))
    assert len(merges) == 48894
    assert vocab["!"] == 0 and vocab["<|startoftext|>"] == BOS and vocab["<|endoftext|>"] == EOS


@pytest.mark.parametrize("variant, pad_id", [("sd21", 0), ("clip_l", EOS)])
def test_matches_transformers_vocab_merges_only(bpe_folders, variant, pad_id):
    folder = bpe_folders[variant]
    assert not (folder / "tokenizer.json").exists()
    tok = CLIPTokenizer.from_pretrained(folder)
    assert tok.pad_token_id == pad_id and tok.bos_token_id == BOS and tok.eos_token_id == EOS
    ids = tok(PROMPTS)
    expected, ref = _reference_ids(folder, PROMPTS)
    assert ref.pad_token_id == pad_id
    assert ids.dtype == np.int64 and ids.shape == (len(PROMPTS), 77)
    for text, got, want in zip(PROMPTS, ids, expected, strict=True):
        assert got.tolist() == want.tolist(), text


@pytest.mark.parametrize("variant", ["sd21", "clip_l"])
def test_known_ids_and_layout(bpe_folders, variant):
    tok = CLIPTokenizer.from_pretrained(bpe_folders[variant])
    pad = tok.pad_token_id
    ids = tok(["a photo", "", "cat " * 200])
    # Well-known CLIP ids: "a</w>" 320, "photo</w>" 1125.
    assert ids[0, :4].tolist() == [BOS, 320, 1125, EOS] and (ids[0, 4:] == pad).all()
    assert ids[1, :2].tolist() == [BOS, EOS] and (ids[1, 2:] == pad).all()
    # Truncated: 75 text ids, and the last kept id is the end token.
    assert ids[2, 0] == BOS and ids[2, -1] == EOS and (ids[2, 1:-1] == ids[2, 1]).all()
    assert tok("a photo").shape == (1, 77) and (tok("a photo") == ids[:1]).all()
    assert tok.encode("a photo") == [BOS, 320, 1125, EOS]
    bang = "!" if variant == "sd21" else "!</w>"  # SD 2.1's pad token "!" is cut out as a special token
    assert tok.tokenize("Photos!") == ["photos</w>", bang]


def test_pad_token_is_matched_in_text_like_transformers(bpe_folders):
    # SD 2.1's pad token "!" is a special token, so a typed "!" becomes id 0 (transformers does this).
    sd = CLIPTokenizer.from_pretrained(bpe_folders["sd21"])("wow!")[0, :4].tolist()
    clip_l = CLIPTokenizer.from_pretrained(bpe_folders["clip_l"])("wow!")[0, :4].tolist()
    assert sd[2] == 0 and clip_l[2] == 256  # "!</w>" is id 256 in the CLIP vocabulary
    assert sd[1] == clip_l[1]


def test_transformers5_save_with_tokenizer_json_only(bpe_folders, tmp_path):
    ref = transformers.CLIPTokenizer.from_pretrained(str(bpe_folders["sd21"]))
    ref.save_pretrained(str(tmp_path))
    for name in ("vocab.json", "merges.txt"):
        (tmp_path / name).unlink(missing_ok=True)
    assert (tmp_path / "tokenizer.json").is_file()
    tok = CLIPTokenizer.from_pretrained(tmp_path)
    expected, ref2 = _reference_ids(tmp_path, PROMPTS)
    assert tok.pad_token_id == ref2.pad_token_id == 0
    np.testing.assert_array_equal(tok(PROMPTS), expected)


def test_config_with_added_tokens_decoder_ignores_special_tokens_map(bpe_folders, tmp_path):
    folder = _unpack_bpe(tmp_path / "tok")
    token = {"lstrip": False, "rstrip": False, "single_word": False, "normalized": False, "special": True}
    config = {
        "added_tokens_decoder": {
            "0": {"content": "!", **token},
            str(BOS): {"content": "<|startoftext|>", **token},
            str(EOS): {"content": "<|endoftext|>", **token},
        },
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "pad_token": "!",
        "unk_token": "<|endoftext|>",
        "model_max_length": 77,
        "tokenizer_class": "CLIPTokenizer",
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    (folder / "special_tokens_map.json").write_text(json.dumps({"pad_token": "<|endoftext|>"}))
    tok = CLIPTokenizer.from_pretrained(folder)
    expected, ref = _reference_ids(folder, PROMPTS)
    assert tok.pad_token_id == ref.pad_token_id == 0
    np.testing.assert_array_equal(tok(PROMPTS), expected)


def test_no_config_defaults_to_clip_l_padding(tmp_path):
    folder = _unpack_bpe(tmp_path / "bare")
    tok = CLIPTokenizer.from_pretrained(folder)
    expected, _ = _reference_ids(folder, PROMPTS[:6])
    assert tok.pad_token_id == EOS and tok.model_max_length == 77
    np.testing.assert_array_equal(tok(PROMPTS[:6]), expected)


def test_tiny_fixture_tokenizer_matches_transformers_and_fixture():
    tok = CLIPTokenizer.from_pretrained(TINY)
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (512, 513, 0)
    expected, _ = _reference_ids(TINY, PROMPTS)
    np.testing.assert_array_equal(tok(PROMPTS), expected)
    from safetensors.numpy import load_file

    prompt = json.loads((FIXTURES / "imagedream_e2e" / "call.json").read_text())["prompt"]
    fixture_ids = load_file(str(FIXTURES / "imagedream_e2e" / "expected.safetensors"))["prompt_ids"]
    np.testing.assert_array_equal(tok(prompt)[0], fixture_ids.astype(np.int64))


def test_random_text_matches_transformers(bpe_folders):
    hypothesis = pytest.importorskip("hypothesis")
    st = hypothesis.strategies
    tok = CLIPTokenizer.from_pretrained(bpe_folders["sd21"])
    ref = transformers.CLIPTokenizer.from_pretrained(str(bpe_folders["sd21"]))
    alphabet = st.one_of(
        st.characters(codec="utf-8"),
        st.sampled_from(list(" \t\n'!.,-_") + ["'s", "'t", "'ll", "<|endoftext|>", "é", "e\u0301", "😀"]),
    )

    @hypothesis.settings(max_examples=150, deadline=None, database=None, derandomize=True)
    @hypothesis.given(st.lists(alphabet, max_size=40).map("".join))
    def check(text):
        want = ref(text, padding="max_length", max_length=77, truncation=True)["input_ids"]
        assert tok(text)[0].tolist() == want

    check()


def test_bad_prompts_raise_input_error(bpe_folders):
    tok = CLIPTokenizer.from_pretrained(bpe_folders["clip_l"])
    with pytest.raises(InputError, match="str"):
        tok(None)
    with pytest.raises(InputError, match="str"):
        tok(["ok", 3])
    with pytest.raises(InputError, match="max_length"):
        tok("x", max_length=1)
    assert tok([]).shape == (0, 77)


def test_missing_or_corrupt_folders_raise_model_load_error(tmp_path):
    with pytest.raises(ModelLoadError, match="not found"):
        CLIPTokenizer.from_pretrained(tmp_path / "nope")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelLoadError, match="vocab.json and merges.txt"):
        CLIPTokenizer.from_pretrained(empty)

    bad_vocab = _unpack_bpe(tmp_path / "bad_vocab")
    (bad_vocab / "vocab.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="vocab.json"):
        CLIPTokenizer.from_pretrained(bad_vocab)

    bad_merges = _unpack_bpe(tmp_path / "bad_merges")
    with open(bad_merges / "merges.txt", "a", encoding="utf-8") as f:
        f.write("one two three\n")
    with pytest.raises(ModelLoadError, match="merge"):
        CLIPTokenizer.from_pretrained(bad_merges)

    unknown = _unpack_bpe(tmp_path / "unknown_merge")
    with open(unknown / "merges.txt", "a", encoding="utf-8") as f:
        f.write("qqqqzz zzqqqq\n")
    with pytest.raises(ModelLoadError, match="BPE"):
        CLIPTokenizer.from_pretrained(unknown)

    bad_json = tmp_path / "bad_json"
    bad_json.mkdir()
    (bad_json / "tokenizer.json").write_text("[1, 2")
    with pytest.raises(ModelLoadError, match="tokenizer.json"):
        CLIPTokenizer.from_pretrained(bad_json)

    bad_config = _unpack_bpe(tmp_path / "bad_config")
    (bad_config / "tokenizer_config.json").write_text("{")
    with pytest.raises(ModelLoadError, match="tokenizer_config.json"):
        CLIPTokenizer.from_pretrained(bad_config)
