"""The built wheel works on its own: installed into a fresh virtual environment, run outside the checkout.

The running site may hold an editable rlbooth whose finder maps to a source tree, so the test checks that
the rlbooth it runs is the one the wheel installed into the new environment.
"""

from __future__ import annotations

import os
import shutil
import site
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SOURCES = ["setup.py", "setup.cfg", "pyproject.toml", "README.md", "rlbooth", "configs", "prompts", "dreambench"]
QUICK = ["runtime.report_to=none", "personalize.max_train_steps=2", "personalize.validation_steps=0",
         "personalize.num_class_images=2", "align.num_epochs=1", "align.num_steps=3", "align.grid_every=0",
         "align.checkpointing_epochs=1", "align.sample_batch_size=2", "align.num_batches_per_epoch=1",
         "align.train_batch_size=2", "align.stat_buffer_size=2", "align.stat_min_count=2",
         "align.reward={brightness: 1.0}", "report.num_prompts=1", "report.seeds=[0]", "report.num_inference_steps=3"]


def _run(args: list[str], cwd: Path, env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(map(str, args))}\n{proc.stdout}\n{proc.stderr}"
    return proc


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel, built from a copy of the sources so the checkout gets no build/ or egg-info."""
    src = tmp_path_factory.mktemp("src")
    for name in SOURCES:
        (shutil.copytree if (REPO / name).is_dir() else shutil.copy2)(
            REPO / name, src / name, **({"ignore": shutil.ignore_patterns("__pycache__")} if (REPO / name).is_dir() else {}))
    out = tmp_path_factory.mktemp("dist")
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(src)],
         cwd=src, env=os.environ.copy())
    (path,) = out.glob("rlbooth-*.whl")
    return path


def test_wheel_holds_the_data_under_rlbooth(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith((".dist-info", ".data"))}
    assert top == {"rlbooth"}  # no generic top-level `dreambench`
    for name in ("rlbooth/presets/tiny.yaml", "rlbooth/presets/toy.yaml", "rlbooth/prompt_sets/live.txt",
                 "rlbooth/prompt_sets/heldout-object.txt", "rlbooth/dreambench/subjects.tsv",
                 "rlbooth/dreambench/prompts-live.txt", "rlbooth/dreambench/evaluate.py",
                 "rlbooth/toyworld/weights/unet/diffusion_pytorch_model.safetensors",
                 "rlbooth/presets/toy-flow.yaml",
                 "rlbooth/toyworld/weights-flow/transformer/diffusion_pytorch_model.safetensors",
                 "rlbooth/toyworld/weights-flow/tokenizer_3/tokenizer_config.json"):
        assert name in names, name


def parent_site_dirs() -> list[str]:
    """The running interpreter's site folders (a venv's, a conda env's or the system's), where torch and the
    other dependencies are: a venv made with --system-site-packages would see the *base* interpreter's site
    instead, which inside a virtual environment has none of them."""
    dirs = site.getsitepackages() + ([site.getusersitepackages()] if site.ENABLE_USER_SITE else [])
    return [d for d in dict.fromkeys(dirs) if Path(d).is_dir()]


@pytest.mark.slow
def test_wheel_runs_both_stages_outside_the_source_tree(wheel, tmp_path):
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], tmp_path, os.environ.copy())
    bin_dir = venv / ("Scripts" if os.name == "nt" else "bin")
    python = bin_dir / "python"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env["PYTHONWARNINGS"] = "ignore"
    purelib = _run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                   tmp_path, env).stdout.strip()
    # Plain path lines, after the venv's own site: the dependencies and pip come from the running interpreter's
    # site, but its .pth hooks (an editable rlbooth's finder among them) do not run in the new environment.
    (Path(purelib) / "parent-site.pth").write_text("\n".join(parent_site_dirs()) + "\n")
    _run([str(python), "-m", "pip", "install", "--no-deps", "-q", str(wheel)], tmp_path, env)

    work = tmp_path / "elsewhere"
    shutil.copytree(REPO / "examples" / "tiny", work / "tiny")
    where = _run([str(python), "-c", "import rlbooth, rlbooth.dreambench, rlbooth.presets; "
                  "print(rlbooth.__file__); print(rlbooth.dreambench.__file__); print(rlbooth.presets.__file__)"],
                 work, env).stdout.split()
    for path in where:
        assert Path(path).resolve().is_relative_to(venv.resolve()), where

    overrides = [a for item in QUICK + [f"personalize.class_data_dir={work / 'class'}"] for a in ("--set", item)]
    proc = _run([str(bin_dir / "rlbooth"), "run", "tiny/subject.yaml", "--config", "tiny", "-o", "out", *overrides],
                work, env)
    assert (work / "out" / "report" / "index.html").is_file(), proc.stdout
    assert (work / "out" / "align" / "rlbooth.json").is_file()
    help_text = _run([str(bin_dir / "rlbooth"), "eval", "--help"], work, env).stdout
    assert "--dreambench-root" in help_text
