"""`rlbooth export --format kohya`: the single-file LoRA, read back by diffusers' own loader, draws the same pixels."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open

from rlbooth.align.train import align
from rlbooth.cli import main
from rlbooth.config import load_config
from rlbooth.models import load_pipeline
from rlbooth.personalize.train import personalize
from rlbooth.sampling import draw, sample_stage
from rlbooth.stages import read_stage
from rlbooth.subject import Subject
from tests.conftest import draw_subject_photos

PROMPT, SEEDS, STEPS, GUIDANCE = "a sks triangular toy on the beach", [0, 1], 4, 7.5
QUICK = ["runtime.report_to=none", "personalize.validation_steps=0", "align.grid_every=0", "align.num_steps=4"]


@pytest.fixture(scope="module", params=["tiny", pytest.param("tiny-sdxl", marks=pytest.mark.slow)])
def stages(tmp_path_factory, request) -> tuple[Path, Path]:
    """A LoRA stage one (UNet and text encoder(s), alpha = 2 x rank) and a stage two on it (alpha = rank / 2),
    for each model family. The quick tier exports SD's here and SDXL's kohya names below."""
    root = tmp_path_factory.mktemp("export")
    subject = Subject(images=draw_subject_photos(root / "photos"), class_noun="toy", description="triangular")
    config = load_config(request.param, QUICK + [
        "personalize.max_train_steps=6", "personalize.learning_rate=1e-2", "personalize.train_text_encoder=true",
        "personalize.lora_alpha=8", "align.num_epochs=1", "align.learning_rate=3e-2", "align.lora_alpha=2",
        "align.reward={brightness: 1.0}", "align.clip_range=0.5"])
    personalize(config, subject, root / "one")
    align(config, root / "one", root / "two")
    return root / "one", root / "two"


def pixels(images) -> np.ndarray:
    return np.stack([np.asarray(image, dtype=np.int16) for image in images])


def draw_exported(stage_dir: Path, file: Path) -> np.ndarray:
    """The base model with the exported file loaded the way any diffusers user would."""
    pipe = load_pipeline(read_stage(stage_dir).base_model)
    pipe.load_lora_weights(str(file))
    return pixels(draw(pipe, [PROMPT], SEEDS, STEPS, GUIDANCE))


def export(stage_dir: Path, file: Path, *flags: str) -> Path:
    assert main(["export", str(stage_dir), "--format", "kohya", "-o", str(file), *flags]) == 0
    return file


def test_stage_one_lora_round_trips(stages, tmp_path):
    one, _ = stages
    file = export(one, tmp_path / "one.safetensors")
    with safe_open(str(file), "pt") as f:
        keys = list(f.keys())
    assert any(k.startswith("lora_unet_") and k.endswith(".lora_down.weight") for k in keys)
    sdxl = read_stage(one).metadata["family"] == "sdxl"  # kohya names SDXL's two encoders te1 and te2
    for prefix in ("lora_te1_", "lora_te2_") if sdxl else ("lora_te_",):
        assert any(k.startswith(f"{prefix}text_model_encoder_layers_") for k in keys), prefix
    expected = pixels(sample_stage(read_stage(one), [PROMPT], SEEDS, STEPS, GUIDANCE))
    base = pixels(draw(load_pipeline(read_stage(one).base_model), [PROMPT], SEEDS, STEPS, GUIDANCE))
    assert np.abs(expected - base).mean() > 5  # the LoRA changes the picture: the comparison below means something
    assert np.abs(draw_exported(one, file) - expected).max() <= 1


def test_merged_stages_round_trip_in_one_file(stages, tmp_path):
    one, two = stages
    file = export(two, tmp_path / "both.safetensors", "--merge")
    expected = pixels(sample_stage(read_stage(two), [PROMPT], SEEDS, STEPS, GUIDANCE))
    stage_one = pixels(sample_stage(read_stage(one), [PROMPT], SEEDS, STEPS, GUIDANCE))
    assert np.abs(expected - stage_one).mean() > 0.5  # stage two moved the model
    assert np.abs(draw_exported(two, file) - expected).max() <= 1


def test_stage_two_alone_goes_on_top_of_stage_one(stages, tmp_path):
    one, two = stages
    file = export(two, tmp_path / "two.safetensors")
    pipe = load_pipeline(read_stage(one).base_model)
    pipe.load_lora_weights(str(export(one, tmp_path / "one.safetensors")), adapter_name="one")
    pipe.load_lora_weights(str(file), adapter_name="two")
    pipe.set_adapters(["one", "two"])
    expected = pixels(sample_stage(read_stage(two), [PROMPT], SEEDS, STEPS, GUIDANCE))
    assert np.abs(pixels(draw(pipe, [PROMPT], SEEDS, STEPS, GUIDANCE)) - expected).max() <= 1


def test_bad_exports_are_refused_before_loading(stages, tmp_path, capsys):
    one, _ = stages
    assert main(["export", str(one), "--merge", "-o", str(tmp_path / "x.safetensors")]) == 2
    assert "give a stage-two folder" in capsys.readouterr().err
    assert main(["export", str(one), "-o", str(tmp_path / "x.ckpt")]) == 2
    assert ".safetensors" in capsys.readouterr().err


def test_stage_loras_load_with_their_trained_alpha(stages):
    """alpha / rank is saved with each LoRA, so loaders apply the scale training used (2 and 0.5 here), not 1."""
    from peft.tuners.lora import LoraLayer

    from rlbooth.stages import load_stage_pipeline

    pipe = load_stage_pipeline(read_stage(stages[1]))
    for model in (pipe.unet, pipe.text_encoder):
        scales = {(name, scale) for m in model.modules() if isinstance(m, LoraLayer) for name, scale in m.scaling.items()}
        assert scales == ({("personalize", 2.0), ("align", 0.5)} if model is pipe.unet else {("personalize", 2.0)})


def test_flow_model_stages_are_refused_with_the_file_to_use(tmp_path, capsys):
    from tests.align.conftest import make_stage_one

    one = make_stage_one(tmp_path / "flux", 32, "tiny-flux")
    assert main(["export", str(one), "-o", str(tmp_path / "x.safetensors")]) == 2
    err = capsys.readouterr().err
    assert "flux" in err and "pytorch_lora_weights.safetensors" in err and "Traceback" not in err
    assert not (tmp_path / "x.safetensors").exists()


WIDE = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1", "conv2",
        "time_emb_proj", "conv", "conv_in", "conv_out", "time_embedding.linear_1", "time_embedding.linear_2"]


@pytest.fixture(scope="module")
def wide_sdxl_stage(tmp_path_factory) -> Path:
    """A LoRA stage one on SDXL with every kind of UNet module trained, from a base model in a local folder."""
    from rlbooth.families import get_family
    from rlbooth.models import tiny_pipeline_folder

    root = tmp_path_factory.mktemp("wide")
    base = tiny_pipeline_folder(load_config("tiny-sdxl").model.tiny, get_family("sdxl"))
    subject = Subject(images=draw_subject_photos(root / "photos"), class_noun="toy", description="triangular")
    config = load_config("tiny-sdxl", QUICK + [
        f"model.pretrained={base}", "personalize.max_train_steps=4", "personalize.learning_rate=1e-2",
        f"personalize.lora_target_modules=[{', '.join(WIDE)}]"])
    personalize(config, subject, root / "one")
    return root / "one"


def test_exported_sdxl_file_is_listed_by_clients_and_carries_no_local_path(wide_sdxl_stage, tmp_path, caplog):
    with caplog.at_level("WARNING", logger="rlbooth.export"):
        file = export(wide_sdxl_stage, tmp_path / "wide.safetensors")
    with safe_open(str(file), "pt") as f:
        metadata, keys = f.metadata(), list(f.keys())
    assert metadata["ss_base_model_version"] == "sdxl_base_v1-0" and metadata["ss_v2"] == "False"
    assert metadata["ss_network_module"] == "networks.lora"
    assert metadata["ss_network_dim"] == metadata["ss_network_alpha"] == "4"  # tiny preset: lora_rank 4
    base = read_stage(wide_sdxl_stage).base_model.pretrained
    assert Path(base).is_absolute() and metadata["rlbooth_base_model"] == Path(base).name
    assert not [value for value in metadata.values() if "/" in value or str(tmp_path.parent) in value]
    for module in ("lora_unet_conv_in", "lora_unet_time_embedding_linear_1", "lora_unet_up_blocks_0_upsamplers_0_conv",
                   "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"):
        assert f"{module}.lora_down.weight" in keys, module
    assert "sd-scripts" in caplog.text and "conv_in" in caplog.text and "time_embedding.linear_1" in caplog.text
    assert "AUTOMATIC1111 ignores the trained module up_blocks.0.upsamplers.0.conv" in caplog.text
    expected = pixels(sample_stage(read_stage(wide_sdxl_stage), [PROMPT], SEEDS, STEPS, GUIDANCE))
    assert np.abs(draw_exported(wide_sdxl_stage, file) - expected).max() <= 1  # diffusers reads every module
    card = (wide_sdxl_stage / "model" / "README.md").read_text()
    assert str(Path(base).parent) not in card  # the model card names the folder only, too


def test_exported_sd_file_says_sd1_and_warns_of_nothing_for_attention_only(stages, tmp_path, caplog):
    one, _ = stages
    with caplog.at_level("WARNING", logger="rlbooth.export"):
        file = export(one, tmp_path / "one.safetensors")
    with safe_open(str(file), "pt") as f:
        version = f.metadata()["ss_base_model_version"]
    assert version == ("sdxl_base_v1-0" if read_stage(one).metadata["family"] == "sdxl" else "sd_v1")
    assert "ignore" not in caplog.text


def test_sdxl_added_embedding_is_named_as_dropped_by_diffusers_kohya_loader(caplog):
    from rlbooth.export import warn_ignored_modules

    with caplog.at_level("WARNING", logger="rlbooth.export"):
        warn_ignored_modules("sdxl", {"add_embedding.linear_1": None, "down_blocks.0.resnets.0.conv1": None})
    assert "diffusers' load_lora_weights (kohya layout) ignores 1 trained module(s) of this file: add_embedding" \
        in caplog.text
