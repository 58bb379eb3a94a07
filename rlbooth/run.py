"""`rlbooth run`: one subject from photos to an aligned model and a report, resumable stage by stage.

Layout of the run folder (default `runs/<subject name>`):
    personalize/   stage one's output (see rlbooth.personalize.train)
    align/         stage two's output (see rlbooth.align.train)
    report/        sample sheet, reward curves, index.html (see rlbooth.report)

A stage whose output is finished is skipped; one that left checkpoints is resumed. So rerunning
the same command after a crash continues where it stopped. Either happens only for the config and subject
that made the folder (`rlbooth.stages.claim_output`); another gets an error naming the keys that differ.
The run folder and both stage folders are locked while the run writes them (rlbooth.lock).
"""

from __future__ import annotations

import logging
from contextlib import ExitStack
from pathlib import Path

from rlbooth.accel import check_runtime
from rlbooth.checkpoint import latest_checkpoint
from rlbooth.config import Config
from rlbooth.lock import output_lock
from rlbooth.prompts import default_prompt_set, heldout_prompt_set, read_prompt_file
from rlbooth.stages import claim_output, is_finished, stage_request
from rlbooth.subject import Subject

logger = logging.getLogger(__name__)


def run(config: Config, subject: Subject, run_dir: Path) -> Path:
    """Both stages and the report; returns the report's index.html."""
    from rlbooth.images import check_images
    from rlbooth.models import check_model
    from rlbooth.rewards.composite import check_composite

    # Everything checkable is checked before the first stage spends compute.
    check_runtime(config.runtime)
    check_composite(config.align.reward, config.align.reward_options, config.align.reward_modules,
                    differentiable=config.align.algorithm == "refl")
    check_images(subject.images, config.personalize.resolution)
    read_prompt_file(config.align.prompt_file or default_prompt_set(subject))
    read_prompt_file(config.report.prompt_file or heldout_prompt_set(subject))
    check_model(config)

    one, two = run_dir / "personalize", run_dir / "align"
    with ExitStack() as locks:
        for folder in (run_dir, two):  # stage one locks its own folder (rlbooth.personalize.train)
            locks.enter_context(output_lock(folder))
        for stage, folder in (("personalize", one), ("align", two), ("report", run_dir / "report")):
            claim_output(folder, stage, stage_request(stage, config, subject, None if stage == "personalize" else one))
        return _run_stages(config, subject, run_dir)


def _run_stages(config: Config, subject: Subject, run_dir: Path) -> Path:
    from rlbooth.align.train import align
    from rlbooth.personalize.train import personalize
    from rlbooth.report import write_report

    one, two = run_dir / "personalize", run_dir / "align"
    if is_finished(one):
        logger.info("stage one already finished in %s: skipped", one)
    else:
        personalize(config, subject, one, resume=_started(one))
    if is_finished(two):
        logger.info("stage two already finished in %s: skipped", two)
    else:
        align(config, one, two, resume=_started(two))
    index = run_dir / "report" / "index.html"
    if index.is_file():
        logger.info("report already written: %s", index)
        return index
    return write_report(run_dir, config.report)


def _started(stage_dir: Path) -> bool:
    return latest_checkpoint(stage_dir / "checkpoints") is not None
