"""The CLI package: one flag -> DiffusionConfig mapping shared by generate, demo and batch; lazy commands."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import types

import pytest

from oxigaf import DiffusionConfig
from oxigaf.cli import build_parser, config_from_args, main
from oxigaf.cli.options import CONFIG_FLAGS
from oxigaf.errors import ConfigError

# A value other than the default for every setting the CLI maps (flag text, expected field value).
TYPED = {
    "dtype": ("bfloat16", "bfloat16"),
    "vae_dtype": ("float16", "float16"),
    "num_views": ("3", 3),
    "elevation": ("12.5", 12.5),
    "num_inference_steps": ("7", 7),
    "guidance_scale": ("2.5", 2.5),
    "seed": ("42", 42),
    "eta": ("0.25", 0.25),
    "ip_weight": ("0.7", 0.7),
    "prediction_type": ("v_prediction", "v_prediction"),
    "attention": ("chunked", "chunked"),
    "attention_chunk_size": ("64", 64),
    "upsampler_steps": ("5", 5),
    "vae_tile_size": ("128", 128),
    "low_memory": (None, True),
    "compile": (None, True),
}
HEADS = {"generate": ["generate", "photo.png"], "demo": ["demo"], "batch": ["batch", "manifest.csv"]}


def _subparsers(parser):
    action = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    return action.choices


def _options(parser) -> set[str]:
    return {s for a in parser._actions for s in a.option_strings}


def test_the_cli_maps_every_setting_but_use_flash_attention():
    # use_flash_attention=False is --attention naive; every other field has its flag
    assert set(CONFIG_FLAGS) | {"use_flash_attention"} == {f.name for f in dataclasses.fields(DiffusionConfig)}
    assert set(TYPED) == set(CONFIG_FLAGS)


@pytest.mark.parametrize("command", sorted(HEADS))
@pytest.mark.parametrize("field", sorted(TYPED))
def test_every_flag_lands_in_the_config(command, field):
    text, want = TYPED[field]
    flag = CONFIG_FLAGS[field]
    argv = HEADS[command] + ["-o", "out", flag] + ([text] if text is not None else [])
    config = config_from_args(build_parser().parse_args(argv))
    assert getattr(config, field) == want
    assert getattr(DiffusionConfig(), field) != want  # the flag changed something
    # and nothing else moved
    assert config.replace(**{field: getattr(DiffusionConfig(), field)}) == DiffusionConfig()


def test_all_flags_at_once_and_untyped_flags_keep_the_base():
    argv = ["generate", "-o", "out"]
    for field, (text, _) in TYPED.items():
        argv += [CONFIG_FLAGS[field]] + ([text] if text is not None else [])
    config = config_from_args(build_parser().parse_args(argv))
    assert {f: getattr(config, f) for f in TYPED} == {f: want for f, (_, want) in TYPED.items()}
    base = DiffusionConfig(num_inference_steps=9, ip_weight=0.3, seed=11, compile=True, prediction_type="sample")
    assert config_from_args(build_parser().parse_args(["generate", "-o", "out"]), base) == base
    typed = config_from_args(build_parser().parse_args(["generate", "-o", "out", "--seed", "0"]), base)
    assert typed == base.replace(seed=0)  # typed, even when it equals the default, wins over the base


def test_azimuths_set_the_number_of_views():
    args = build_parser().parse_args(["batch", "m.csv", "-o", "out", "--views", "6", "--azimuths", "0,30,60"])
    assert config_from_args(args).num_views == 3


def test_a_bad_value_is_a_config_error_naming_the_field():
    args = build_parser().parse_args(["generate", "-o", "out", "--ip-weight", "inf"])
    with pytest.raises(ConfigError, match="ip_weight"):
        config_from_args(args)


def test_generate_batch_and_demo_take_the_same_generation_flags():
    sub = _subparsers(build_parser())
    generate, batch, demo = _options(sub["generate"]), _options(sub["batch"]), _options(sub["demo"])
    batch_only = {"--engine", "--address", "--workers", "--gpus-per-worker", "--batch-size"}
    assert generate - {"--replay"} == batch - batch_only
    assert batch_only <= batch and "--replay" in generate
    # the demo runs the shipped toy model: no --model / --upsampler, but every setting
    assert generate - {"--replay", "--model", "--upsampler"} == demo - {"--subject", "--refine", "--strength"}
    for flag in CONFIG_FLAGS.values():
        assert flag in generate and flag in batch and flag in demo


def test_batch_flags_reach_the_batch_settings():
    from oxigaf.cli.batch import settings_from_args

    argv = ["batch", "m.csv", "-o", "out", "--model", "some/model", "--compile", "--ip-weight", "0.7", "--steps", "3",
            "--eta", "0.5", "--azimuths", "0,90", "--prompt", "a head", "--negative-prompt", "blur", "--size", "64",
            "--upsampler", "bilinear", "--backend", "torch", "--device", "cpu"]
    settings = settings_from_args(build_parser().parse_args(argv))
    assert settings.config == DiffusionConfig(compile=True, ip_weight=0.7, num_inference_steps=3, eta=0.5, num_views=2)
    assert (settings.model, settings.upsampler, settings.backend, settings.device) == (
        "some/model", "bilinear", "torch", "cpu")
    assert (tuple(settings.azimuths), settings.prompt, settings.negative_prompt, settings.size) == (
        (0.0, 90.0), "a head", "blur", 64)


def test_existing_commands_and_flags_still_parse():
    parse = build_parser().parse_args
    args = parse(["generate", "p.png", "-o", "o", "--model", "m", "--upsampler", "none", "--backend", "mlx", "--device",
                  "cpu", "--dtype", "float16", "--views", "2", "--elevation", "5", "--steps", "3", "--guidance", "4",
                  "--seed", "1", "--prompt", "x", "--negative-prompt", "y", "--size", "256", "--attention", "naive",
                  "--low-memory", "--compile", "--quiet", "--overwrite"])
    assert (args.image, args.output, args.model, args.overwrite, args.quiet) == ("p.png", "o", "m", True, True)
    args = parse(["demo", "-o", "o", "--subject", "3", "--refine", "--strength", "0.2"])
    assert (args.subject, args.refine, args.strength) == (3, True, 0.2)
    args = parse(["train", "data", "--model", "m", "-o", "o", "--steps", "5", "--lora-rank", "4",
                  "--dtype", "bfloat16"])
    assert (args.steps, args.lora_rank, args.dtype) == (5, 4, "bfloat16")
    assert parse(["info"]).command == "info"


def test_help_imports_neither_gradio_nor_the_lazy_commands():
    code = ("import sys\nfrom oxigaf.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('gradio', 'torch', 'mlx', 'ray') "
            "or m in ('oxigaf.serve', 'oxigaf.splat.fit')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "serve" in out.stdout and "fit" in out.stdout
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_lazy_commands_import_their_module_only_when_run(monkeypatch, capsys):
    import oxigaf.cli as cli

    fake = types.ModuleType("oxigaf_fake_command")
    fake.add_arguments = lambda p: p.add_argument("--port", type=int, default=1)
    fake.run = lambda args: args.port + 40
    monkeypatch.setitem(sys.modules, "oxigaf_fake_command", fake)
    monkeypatch.setitem(cli.LAZY_COMMANDS, "serve", ("oxigaf_fake_command", "a page", "pip install 'oxigaf[ui]'"))
    assert main(["serve", "--port", "2"]) == 42
    monkeypatch.setitem(cli.LAZY_COMMANDS, "serve", ("oxigaf_no_such_module", "a page",
                                                     "oxigaf serve needs the ui extra: pip install 'oxigaf[ui]'"))
    assert main(["serve", "--port", "2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("oxigaf: error: oxigaf serve needs the ui extra: pip install 'oxigaf[ui]'")
    assert err.count("\n") == 1


def test_info_reports_each_backends_own_versions(monkeypatch, capsys):
    from oxigaf import plugins
    from oxigaf.backend import Backend, BackendSpec

    class Fake(Backend):
        name, device = "fake", "abacus"

        def versions(self):
            return {"fakelib": "9.9.1", "beads": "17"}

    spec = BackendSpec("fake", lambda device=None, dtype="float32": Fake(), lambda: None)
    monkeypatch.setattr(plugins, "backend_specs", lambda: {"fake": spec})
    monkeypatch.setattr(plugins, "get_backend", lambda name, *a, **k: Fake())
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "fake: available, default device abacus; fakelib 9.9.1, beads 17" in out
