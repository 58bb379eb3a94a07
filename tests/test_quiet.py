"""No noise on a plain run: transformers' torchvision fallback note is dropped, its other warnings are not."""

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


def captured(logger_name: str) -> list[str]:
    import logging

    messages: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())
    logging.getLogger(logger_name).addHandler(handler)  # after the logger's own filters, as its real handler
    return messages


def test_empty_float32_note_is_dropped_a_real_one_kept():
    import logging

    import rlbooth  # noqa: F401  (installs the filters)

    messages = captured("diffusers.models.modeling_utils")
    log = logging.getLogger("diffusers.models.modeling_utils")
    log.warning("There are modules in UNet2DConditionModel that should be kept in float32: []. Casting directly")
    log.warning("There are modules in T5EncoderModel that should be kept in float32: ['wo']. Casting directly")
    assert messages == ["There are modules in T5EncoderModel that should be kept in float32: ['wo']. Casting directly"]


def test_no_lora_keys_note_is_dropped_only_while_rlbooth_loads_its_own_files():
    import logging

    from rlbooth.quiet import NO_TEXT_ENCODER_LORA, without_note

    messages = captured("diffusers.loaders.lora_base")
    note = "No LoRA keys associated to CLIPTextModel found with the prefix='text_encoder'."
    with without_note(*NO_TEXT_ENCODER_LORA):
        logging.getLogger("diffusers.loaders.lora_base").warning(note)
        logging.getLogger("diffusers.loaders.lora_base").warning("another note")
    logging.getLogger("diffusers.loaders.lora_base").warning(note)
    assert messages == ["another note", note]
