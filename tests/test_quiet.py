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
