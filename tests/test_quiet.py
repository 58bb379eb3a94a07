"""No noise on a plain run: third-party notes a user cannot act on are dropped (transformers' torchvision fallback,
diffusers' empty float32 list, "No LoRA keys" while rlbooth loads its own stage files); their other warnings are not."""

import subprocess
import sys

import pytest


@pytest.mark.slow
def test_loading_a_pipeline_prints_no_torchvision_note():
    code = ("import rlbooth, transformers; from diffusers import StableDiffusionPipeline; "
            "transformers.CLIPImageProcessor; "
            "transformers.utils.logging.get_logger('transformers.utils.import_utils').warning('another note')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "torchvision" not in proc.stderr and "another note" in proc.stderr


@pytest.fixture
def captured():
    """`captured(logger_name)`: the messages that logger passes to its handlers (after its own filters)."""
    import logging

    attached = []

    def capture(logger_name: str) -> list[str]:
        messages: list[str] = []
        handler = logging.Handler()
        handler.emit = lambda record: messages.append(record.getMessage())
        logging.getLogger(logger_name).addHandler(handler)
        attached.append((logger_name, handler))
        return messages

    yield capture
    for logger_name, handler in attached:
        logging.getLogger(logger_name).removeHandler(handler)


def test_empty_float32_note_is_dropped_a_real_one_kept(captured):
    import logging

    import rlbooth  # noqa: F401  (installs the filters)

    messages = captured("diffusers.models.modeling_utils")
    log = logging.getLogger("diffusers.models.modeling_utils")
    log.warning("There are modules in UNet2DConditionModel that should be kept in float32: []. Casting directly")
    log.warning("There are modules in T5EncoderModel that should be kept in float32: ['wo']. Casting directly")
    assert messages == ["There are modules in T5EncoderModel that should be kept in float32: ['wo']. Casting directly"]


def test_no_lora_keys_note_is_dropped_only_while_rlbooth_loads_its_own_files(captured):
    import logging

    from rlbooth.quiet import NO_TEXT_ENCODER_LORA, without_note

    messages = captured("diffusers.loaders.lora_base")
    note = "No LoRA keys associated to CLIPTextModel found with the prefix='text_encoder'."
    with without_note(*NO_TEXT_ENCODER_LORA):
        logging.getLogger("diffusers.loaders.lora_base").warning(note)
        logging.getLogger("diffusers.loaders.lora_base").warning("another note")
    logging.getLogger("diffusers.loaders.lora_base").warning(note)
    assert messages == ["another note", note]


def test_loading_a_stage_lora_is_quiet_a_plain_load_is_not(tmp_path, captured):
    from rlbooth.config import TinyModelConfig
    from rlbooth.families import get_family
    from rlbooth.models import add_lora, save_lora
    from rlbooth.stages import load_lora

    family = get_family("sd")
    pipe = family.build_tiny(TinyModelConfig())
    add_lora(pipe.unet, 4, None, ["to_q", "to_v"])
    save_lora(tmp_path, family, {"unet": pipe.unet})  # a UNet-only file, as stage two writes
    messages = captured("diffusers.loaders.lora_base")
    load_lora(family.build_tiny(TinyModelConfig()), tmp_path, "align")
    assert messages == []
    family.build_tiny(TinyModelConfig()).load_lora_weights(tmp_path)
    assert any("No LoRA keys associated to CLIPTextModel" in m for m in messages)
