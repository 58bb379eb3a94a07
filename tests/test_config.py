"""Typed configuration: presets, `extends` chains, overrides, and errors that name the dotted key."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

import rlbooth.config as config_module
from rlbooth import cli
from rlbooth.config import (
    CONFIG_DIR,
    AlignConfig,
    Config,
    ConfigError,
    ModelConfig,
    PersonalizeConfig,
    RuntimeConfig,
    TinyModelConfig,
    apply_overrides,
    from_dict,
    load_config,
    read_preset,
)

REPO_CONFIGS = Path(__file__).resolve().parent.parent / "configs"
PRESETS = sorted(REPO_CONFIGS.glob("*.yaml"))
SD15_ID = "stable-diffusion-v1-5/stable-diffusion-v1-5"


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# --------------------------------------------------------------------------- every shipped preset


def test_presets_found():
    """The glob below must see the shipped presets, or the parametrized tests would silently pass."""
    names = {p.stem for p in PRESETS}
    assert {"tiny", "toy", "sd15", "sd15-lora"} <= names
    assert REPO_CONFIGS.resolve() == CONFIG_DIR.resolve()


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.name)
@pytest.mark.parametrize("how", ["path", "name"])
def test_every_preset_loads(preset: Path, how: str):
    config = load_config(str(preset) if how == "path" else preset.stem)
    assert isinstance(config, Config)
    assert isinstance(config.personalize, PersonalizeConfig)
    # every value the preset (and its parents) sets ends up in the config, none silently dropped
    assert_subset(read_preset(preset), config.to_dict())


def assert_subset(raw, built, key: str = "") -> None:
    if isinstance(raw, dict):
        assert isinstance(built, dict), key
        for k, v in raw.items():
            assert k in built, f"{key}{k}"
            assert_subset(v, built[k], f"{key}{k}.")
    elif isinstance(raw, list):
        assert isinstance(built, list) and len(raw) == len(built), key
        for i, (r, b) in enumerate(zip(raw, built)):
            assert_subset(r, b, f"{key}[{i}].")
    elif isinstance(raw, (int, float)) and not isinstance(raw, bool):
        assert built == pytest.approx(float(raw)), key
    elif isinstance(raw, str) and isinstance(built, float):
        assert built == pytest.approx(float(raw)), key  # `1e-4` read by YAML as a string
    else:
        assert built == raw, key


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.name)
@pytest.mark.parametrize("how", ["path", "name"])
def test_every_preset_loads_through_cli_parser(preset: Path, how: str, tmp_path: Path):
    argv = ["personalize", "--config", str(preset) if how == "path" else preset.stem,
            "--images", str(tmp_path), "--class-noun", "dog", "--output", str(tmp_path / "out"),
            "--set", "personalize.max_train_steps=7", "--set", "runtime.seed=3"]
    args = cli.build_parser().parse_args(argv)
    config = load_config(args.config, args.overrides)
    assert config.personalize.max_train_steps == 7
    assert config.runtime.seed == 3
    assert config == load_config(preset, ["personalize.max_train_steps=7", "runtime.seed=3"])


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.name)
def test_preset_round_trips_through_dict(preset: Path):
    config = load_config(preset)
    assert from_dict(Config, config.to_dict()) == config


def test_defaults_round_trip():
    data = Config().to_dict()
    assert data["personalize"]["learning_rate"] == 5e-6
    assert data["model"]["tiny"]["unet_channels"] == [32, 64]
    assert from_dict(Config, data) == Config()
    assert load_config() == Config()


# --------------------------------------------------------------------------- extends


def test_extends_chain_merges():
    sd15, lora, tiny = load_config("sd15"), load_config("sd15-lora"), load_config("tiny")
    # sd15-lora inherits model.pretrained and untouched personalize fields from sd15
    assert lora.model.pretrained == sd15.model.pretrained == SD15_ID
    assert lora.personalize.num_class_images == sd15.personalize.num_class_images == 200
    assert lora.runtime.mixed_precision == "fp16"
    # ... and overrides its own
    assert (sd15.personalize.mode, lora.personalize.mode) == ("full", "lora")
    assert lora.personalize.learning_rate == pytest.approx(1e-4)
    # tiny overrides model.pretrained, inherits lora mode from two levels up
    assert tiny.model.pretrained == "tiny"
    assert tiny.personalize.mode == "lora"
    assert tiny.personalize.lora_rank == lora.personalize.lora_rank
    assert tiny.runtime.mixed_precision == "no"
    assert tiny.personalize.resolution == 32


@pytest.mark.parametrize("extends", ["tiny", "tiny.yaml", "{configs}/tiny.yaml", "base/parent.yaml"])
def test_user_preset_extends(tmp_path: Path, extends: str):
    (tmp_path / "base").mkdir()
    write(tmp_path / "base" / "parent.yaml", "extends: tiny\npersonalize:\n  lora_rank: 2\n")
    child = write(tmp_path / "child.yaml",
                  f"extends: {extends.format(configs=REPO_CONFIGS)}\npersonalize:\n  max_train_steps: 3\n")
    config = load_config(child)
    assert config.model.pretrained == "tiny"
    assert config.personalize.max_train_steps == 3
    assert config.personalize.resolution == 32  # from tiny
    assert config.personalize.lora_rank == (2 if extends.startswith("base") else 4)


def test_nested_mapping_merges_key_by_key(tmp_path: Path):
    child = write(tmp_path / "c.yaml", "extends: tiny\nmodel:\n  tiny:\n    seed: 9\n")
    config = load_config(child)
    assert config.model.pretrained == "tiny"  # sibling key of the merged mapping survives
    assert config.model.tiny.seed == 9
    assert config.model.tiny.resolution == 32


@pytest.mark.parametrize("files", [
    {"a.yaml": "extends: a.yaml\n"},
    {"a.yaml": "extends: b.yaml\n", "b.yaml": "extends: a.yaml\n"},
    {"a.yaml": "extends: b.yaml\n", "b.yaml": "extends: c.yaml\n", "c.yaml": "extends: a.yaml\n"},
], ids=["self", "two", "three"])
def test_extends_loop_detected(tmp_path: Path, files: dict[str, str]):
    for name, text in files.items():
        write(tmp_path / name, text)
    with pytest.raises(ConfigError, match="loops"):
        load_config(tmp_path / "a.yaml")


def test_diamond_is_not_a_loop(tmp_path: Path):
    """The same parent reached twice along *different* chains is fine; only a cycle is an error."""
    write(tmp_path / "a.yaml", "extends: tiny\n")
    write(tmp_path / "b.yaml", "extends: a.yaml\n")
    assert load_config(tmp_path / "b.yaml").model.pretrained == "tiny"


@pytest.mark.parametrize("name", ["no-such-preset", "no-such-preset.yaml", "/nonexistent/dir/x.yaml"])
def test_missing_preset_lists_known(name: str):
    with pytest.raises(ConfigError) as err:
        load_config(name)
    message = str(err.value)
    assert name in message
    for preset in PRESETS:
        assert preset.stem in message


def test_missing_parent_named(tmp_path: Path):
    child = write(tmp_path / "c.yaml", "extends: nope.yaml\n")
    with pytest.raises(ConfigError, match=r"nope\.yaml.*not found.*tiny"):
        load_config(child)


@pytest.mark.parametrize("text, match", [
    ("model: [unclosed\n", "not valid YAML"),
    ("- a\n- b\n", "mapping"),
    ("just a string\n", "mapping"),
])
def test_bad_preset_file(tmp_path: Path, text: str, match: str):
    path = write(tmp_path / "bad.yaml", text)
    with pytest.raises(ConfigError, match=match) as err:
        load_config(path)
    assert "bad.yaml" in str(err.value)


def test_empty_preset_is_defaults(tmp_path: Path):
    assert load_config(write(tmp_path / "empty.yaml", "")) == Config()


# --------------------------------------------------------------------------- unknown keys and types


@pytest.mark.parametrize("text, key", [
    ("personalise:\n  mode: lora\n", "personalise"),
    ("personalize:\n  lerning_rate: 1.0e-4\n", "personalize.lerning_rate"),
    ("model:\n  tiny:\n    resolutoin: 32\n", "model.tiny.resolutoin"),
    ("runtime:\n  seed: 1\n  fp16: true\n", "runtime.fp16"),
])
def test_unknown_key_named(tmp_path: Path, text: str, key: str):
    with pytest.raises(ConfigError, match=f"unknown key '{key}'"):
        load_config(write(tmp_path / "c.yaml", text))


def test_unknown_key_lists_known_keys():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["personalize.lerning_rate=1e-4"])
    assert "learning_rate" in str(err.value).split("known keys")[1]


@pytest.mark.parametrize("override, key, words", [
    ("personalize.max_train_steps='800'", "personalize.max_train_steps", "integer"),
    ("personalize.max_train_steps=true", "personalize.max_train_steps", "integer"),
    ("personalize.max_train_steps=8.5", "personalize.max_train_steps", "integer"),
    ("runtime.seed=[1, 2]", "runtime.seed", "integer"),
    ("model.pretrained=[a, b]", "model.pretrained", "string"),
    ("model.pretrained=12", "model.pretrained", "string"),
    ("runtime.mixed_precision=16", "runtime.mixed_precision", "one of"),
    ("runtime.report_to=comet", "runtime.report_to", "one of"),
    ("personalize.mode=3", "personalize.mode", "one of"),
    ("personalize.learning_rate=fast", "personalize.learning_rate", "number"),
    ("personalize.learning_rate=true", "personalize.learning_rate", "number"),
    ("personalize.center_crop=1", "personalize.center_crop", "true or false"),
    ("personalize.center_crop=yess", "personalize.center_crop", "true or false"),
    ("personalize.lora_target_modules=to_k", "personalize.lora_target_modules", "list"),
    ("personalize.validation_seeds=[0, x]", "personalize.validation_seeds[1]", "integer"),
    ("personalize.snr_gamma=high", "personalize.snr_gamma", "number"),
    ("personalize.checkpoints_total_limit=true", "personalize.checkpoints_total_limit", "integer"),
    ("model.revision=[main]", "model.revision", "string"),
    ("personalize.max_train_steps=", "personalize.max_train_steps", "integer"),
    ("model.tiny=32", "model.tiny", "mapping"),
    ("personalize=null", "personalize", "mapping"),
])
def test_wrong_type_names_key(override: str, key: str, words: str):
    with pytest.raises(ConfigError) as err:
        load_config("tiny", [override])
    message = str(err.value)
    assert message.startswith(f"{key}:"), message
    assert words in message


def test_wrong_type_in_yaml_file_names_key(tmp_path: Path):
    path = write(tmp_path / "c.yaml", "extends: tiny\npersonalize:\n  train_batch_size: one\n")
    with pytest.raises(ConfigError, match=r"^personalize\.train_batch_size: expected an integer"):
        load_config(path)


@pytest.mark.parametrize("text", ["learning_rate: 1e-4", "learning_rate: '1e-4'", "learning_rate: 1.0e-4",
                                  "learning_rate: 0.0001"])
def test_exponent_without_dot_is_float(tmp_path: Path, text: str):
    """YAML 1.1 reads `1e-4` as a string; the float field must still take it."""
    config = load_config(write(tmp_path / "c.yaml", f"personalize:\n  {text}\n"))
    assert isinstance(config.personalize.learning_rate, float)
    assert config.personalize.learning_rate == pytest.approx(1e-4)


def test_int_accepted_for_float():
    config = load_config(None, ["personalize.prior_loss_weight=2", "personalize.snr_gamma=5"])
    assert config.personalize.prior_loss_weight == 2.0 and isinstance(config.personalize.prior_loss_weight, float)
    assert config.personalize.snr_gamma == 5.0 and isinstance(config.personalize.snr_gamma, float)


# --------------------------------------------------------------------------- --set overrides


@pytest.mark.parametrize("override, path, expected", [
    ("personalize.learning_rate=1e-4", ("personalize", "learning_rate"), 1e-4),
    ("personalize.max_train_steps=400", ("personalize", "max_train_steps"), 400),
    ("personalize.center_crop=false", ("personalize", "center_crop"), False),
    ("personalize.snr_gamma=5.0", ("personalize", "snr_gamma"), 5.0),
    ("personalize.snr_gamma=null", ("personalize", "snr_gamma"), None),
    ("personalize.checkpoints_total_limit=~", ("personalize", "checkpoints_total_limit"), None),
    ("personalize.validation_seeds=[3, 4, 5]", ("personalize", "validation_seeds"), [3, 4, 5]),
    ("personalize.lora_target_modules=[to_q, to_v]", ("personalize", "lora_target_modules"), ["to_q", "to_v"]),
    ("personalize.instance_prompt=photo of {identifier} {class_noun}", ("personalize", "instance_prompt"),
     "photo of {identifier} {class_noun}"),
    ("model.pretrained=/some/folder=with=equals", ("model", "pretrained"), "/some/folder=with=equals"),
    ("model.revision=fp16-branch", ("model", "revision"), "fp16-branch"),
    (" runtime.seed =7", ("runtime", "seed"), 7),
    ("runtime.mixed_precision=bf16", ("runtime", "mixed_precision"), "bf16"),
    ("model.tiny.unet_channels=[16, 32, 32]", ("model", "tiny", "unet_channels"), [16, 32, 32]),
    ("model={pretrained: tiny}", ("model", "pretrained"), "tiny"),
])
def test_override_values_parsed_as_yaml(override: str, path: tuple[str, ...], expected):
    node = load_config("sd15", [override])
    for part in path:
        node = getattr(node, part)
    assert node == (pytest.approx(expected) if isinstance(expected, float) else expected)


def test_later_override_wins_and_keeps_siblings():
    config = load_config("tiny", ["runtime.seed=1", "runtime.seed=2", "model.tiny.seed=5"])
    assert config.runtime.seed == 2
    assert config.model.tiny.seed == 5
    assert config.model.pretrained == "tiny"  # untouched sibling of an overridden nested key
    assert config.model.tiny.resolution == 32


def test_overrides_do_not_mutate_input():
    data = {"runtime": {"seed": 1}}
    merged = apply_overrides(data, ["runtime.seed=2"])
    assert data == {"runtime": {"seed": 1}}
    assert merged == {"runtime": {"seed": 2}}


@pytest.mark.parametrize("override", ["personalize.max_train_steps", "=3", "", "no-equals-sign"])
def test_bad_override_syntax(override: str):
    with pytest.raises(ConfigError, match="KEY=VALUE") as err:
        load_config("tiny", [override])
    assert repr(override) in str(err.value)


def test_mixed_precision_no_via_set():
    assert load_config("sd15", ["runtime.mixed_precision=no"]).runtime.mixed_precision == "no"


def test_mixed_precision_no_unquoted_in_yaml(tmp_path: Path):
    path = write(tmp_path / "c.yaml", "runtime:\n  mixed_precision: no\n")
    assert load_config(path).runtime.mixed_precision == "no"


def test_mixed_precision_true_still_rejected():
    with pytest.raises(ConfigError, match="runtime.mixed_precision: must be one of"):
        load_config("sd15", ["runtime.mixed_precision=yes"])


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize("override, key", [
    ("personalize.max_train_steps=0", "personalize.max_train_steps"),
    ("personalize.resolution=-8", "personalize.resolution"),
    ("personalize.train_batch_size=0", "personalize.train_batch_size"),
    ("personalize.gradient_accumulation_steps=0", "personalize.gradient_accumulation_steps"),
    ("personalize.checkpointing_steps=0", "personalize.checkpointing_steps"),
    ("personalize.lora_rank=0", "personalize.lora_rank"),
    ("personalize.learning_rate=0", "personalize.learning_rate"),
    ("personalize.learning_rate=-1e-4", "personalize.learning_rate"),
    ("personalize.prior_loss_weight=0", "personalize.prior_loss_weight"),
    ("personalize.lr_warmup_steps=-1", "personalize.lr_warmup_steps"),
    ("personalize.validation_steps=-1", "personalize.validation_steps"),
    ("personalize.snr_gamma=0", "personalize.snr_gamma"),
    ("personalize.checkpoints_total_limit=0", "personalize.checkpoints_total_limit"),
    ("personalize.lora_target_modules=[]", "personalize.lora_target_modules"),
    ("model.tiny.resolution=33", "model.tiny.resolution"),
    ("model.tiny.unet_channels=[32]", "model.tiny.unet_channels"),
    ("align.samples_per_noise=0", "align.samples_per_noise"),
    ("align.samples_per_noise=3", "align.samples_per_noise"),  # must divide the sample batch (4 in tiny)
    ("align.timestep_window=[0.5]", "align.timestep_window"),
    ("align.timestep_window=[0.6,0.4]", "align.timestep_window"),
    ("align.timestep_window=[0.0,1.5]", "align.timestep_window"),
    ("align.timestep_window=[0.51,0.66]", "align.timestep_window"),  # between steps 3 and 4 of 6 (tiny)
])
def test_validation_names_field(override: str, key: str):
    with pytest.raises(ConfigError) as err:
        load_config("tiny", [override])
    assert str(err.value).startswith(f"{key}:"), str(err.value)


@pytest.mark.parametrize("override", ["personalize.validation_steps=0", "personalize.lr_warmup_steps=0",
                                      "personalize.checkpoints_total_limit=null", "personalize.snr_gamma=null"])
def test_validation_allows_documented_zero_or_null(override: str):
    load_config("tiny", [override])


@pytest.mark.parametrize("window, fraction, steps, trained", [
    ([0.0, 1.0], 1.0, [0, 1, 2, 3, 4], 5),
    ([0.0, 0.4], 1.0, [0, 1], 2),  # 2 / 5 sits at 0.4, outside the half-open window
    ([0.2, 0.8], 0.5, [1, 2, 3], 1),
    ([0.7, 1.0], 1.0, [4], 1),
])
def test_timestep_window_picks_steps_by_position(window, fraction, steps, trained):
    align = AlignConfig(num_steps=5, timestep_window=window, timestep_fraction=fraction)
    assert align.train_steps == steps and align.num_train_timesteps == trained


def test_config_error_is_value_error():
    with pytest.raises(ValueError):
        PersonalizeConfig(max_train_steps=0)
    assert issubclass(ConfigError, ValueError)


SECTIONS = sorted((obj for obj in vars(config_module).values()
                   if dataclasses.is_dataclass(obj) and obj.__module__ == config_module.__name__),
                  key=lambda c: c.__name__)


def test_sections_found():
    assert {Config, ModelConfig, RuntimeConfig, PersonalizeConfig, TinyModelConfig} <= set(SECTIONS)


@pytest.mark.parametrize("cls", SECTIONS, ids=lambda c: c.__name__)
def test_every_section_builds_from_empty_mapping(cls):
    """Every section builds from an empty mapping, and every field type is one `from_dict` understands."""
    instance = from_dict(cls, {})
    assert from_dict(cls, dataclasses.asdict(instance)) == instance
