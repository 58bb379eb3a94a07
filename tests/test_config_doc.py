"""`rlbooth config`: the resolved configuration with each field's doc, and `--fields`."""

from __future__ import annotations

import dataclasses

import yaml

from rlbooth.cli import main
from rlbooth.config import Config, load_config
from rlbooth.config_doc import field_docs, iter_fields


def test_every_field_has_a_doc():
    missing = [name for name, _, _, doc in iter_fields() if not doc]
    assert not missing, f"fields without a docstring under them in rlbooth/config.py: {missing}"
    assert len(list(iter_fields())) > 80  # the walk reaches into every nested dataclass


def test_docs_are_the_strings_under_the_fields():
    docs = field_docs()
    assert docs["AlignConfig"]["clip_range"] == "PPO clip range of the importance ratio."
    assert docs["PersonalizeConfig"]["learning_rate"] == "Peak AdamW learning rate."
    assert docs["Config"]["align"] == "Stage two."


def test_config_prints_resolved_values_with_docs(capsys, tmp_path):
    assert main(["config", "-c", "tiny", "--set", "align.clip_range=0.25"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    at = lines.index("  clip_range: 0.25")  # the override, under align:
    assert lines[at - 1] == "  # PPO clip range of the importance ratio."
    assert "  pretrained: tiny" in lines and "  # Peak AdamW learning rate." in lines
    # the printout is a preset: it loads back to the same configuration
    (tmp_path / "resolved.yaml").write_text(out)
    assert load_config(tmp_path / "resolved.yaml") == load_config("tiny", ["align.clip_range=0.25"])


def test_config_fields_lists_type_default_and_doc(capsys):
    assert main(["config", "--fields"]) == 0
    out = capsys.readouterr().out
    assert "align.clip_range  (float, default 0.0001)\n    PPO clip range of the importance ratio." in out
    assert "runtime.mixed_precision  (Literal['no', 'fp16', 'bf16'], default fp16)" in out
    for f in dataclasses.fields(Config):
        assert f"\n{f.name}." in "\n" + out


def test_config_errors_like_the_other_commands(capsys):
    assert main(["config", "--set", "align.clip_rnge=0.2"]) == 2
    assert "align.clip_rnge" in capsys.readouterr().err


def test_subcommand_help_points_to_the_fields(capsys):
    for command in ("personalize", "align", "run"):
        try:
            main([command, "--help"])
        except SystemExit:
            pass
        assert "rlbooth config --fields" in capsys.readouterr().out, command


def test_override_that_is_not_yaml_is_a_config_error(capsys):
    assert main(["config", "--set", "personalize.validation_prompts=[a {identifier}]"]) == 2
    assert "not valid YAML" in capsys.readouterr().err
