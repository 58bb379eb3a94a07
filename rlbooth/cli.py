"""The `rlbooth` console script: thin subcommands over plain functions.

Nothing heavy is imported at module level, so `rlbooth --help` answers at once; each command
imports its stage when it runs.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from rlbooth import __version__


FIELDS_HINT = ("every config field with its type, default and doc: `rlbooth config --fields`; "
               "the resolved config of a preset and overrides: `rlbooth config --config X --set ...`")


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", "-c", default=None,
                        help="preset YAML: a path or a name in configs/ (toy, tiny, sd15, sd15-lora)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field, e.g. --set personalize.max_train_steps=400 (repeatable); "
                        + FIELDS_HINT)


def _add_hub_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--push-to-hub", metavar="REPO", default=None,
                        help="when the stage has finished, upload its model/ (weights, model card) to this Hub repo")
    parser.add_argument("--private", action="store_true", help="create the Hub repository private")


def _add_subject_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("subject", "a subject spec YAML, or its fields as flags")
    group.add_argument("--subject", "-s", type=Path, help="subject spec YAML (images, class_noun, identifier, ...)")
    group.add_argument("--images", type=Path, help="folder of the subject's photos")
    group.add_argument("--class-noun", help="class of the subject, e.g. dog")
    group.add_argument("--identifier", default=None, help="rare token for the subject (default: sks)")
    group.add_argument("--description", default=None, help="words between identifier and class noun")
    group.add_argument("--kind", choices=["face", "live", "object"], default=None, help="subject kind")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rlbooth", description="Personalize a text-to-image model to one subject (DreamBooth), then align it with RL (DDPO).")
    parser.add_argument("--version", action="version", version=f"rlbooth {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("personalize", help="stage one: DreamBooth with prior preservation", epilog=FIELDS_HINT)
    _add_config_args(p)
    _add_subject_args(p)
    p.add_argument("--output", "-o", type=Path, required=True, help="output folder of this stage")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --output")
    _add_hub_args(p)
    p.set_defaults(func=cmd_personalize)

    p = sub.add_parser("align", help="stage two: DDPO on the personalized model", epilog=FIELDS_HINT)
    _add_config_args(p)
    p.add_argument("--stage-one", type=Path, required=True, help="output folder of `rlbooth personalize`")
    p.add_argument("--output", "-o", type=Path, required=True, help="output folder of this stage")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --output")
    _add_hub_args(p)
    p.set_defaults(func=cmd_align)

    p = sub.add_parser("run", help="both stages and a report for one subject, resumable", epilog=FIELDS_HINT)
    p.add_argument("subject_spec", type=Path, metavar="SUBJECT.yaml", help="subject spec")
    _add_config_args(p)
    p.add_argument("--output", "-o", type=Path, default=None, help="run folder (default: runs/<subject name>)")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("config", help="print the resolved configuration with each field's doc",
                       description="Print the configuration a preset and overrides resolve to, as YAML with each "
                       "field's doc as a comment (it loads back with --config), or with --fields every field's "
                       "type, default and doc.")
    _add_config_args(p)
    p.add_argument("--fields", action="store_true", help="list every field with its type, default and doc")
    p.set_defaults(func=cmd_config)

    p = sub.add_parser("plan", help="print each stage's memory (weights, LoRA, optimizer, activations) before any compute",
                       description="Build the config's model on the meta device (no weights, no download) and print, "
                       "for stage one and stage two, each component's parameters and dtype, the LoRA, gradients, AdamW "
                       "state, an activation estimate, the peak, and which memory savings are on.")
    _add_config_args(p)
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("sample", help="draw images from a finished stage's output")
    p.add_argument("stage", type=Path, help="output folder of `rlbooth personalize` or `rlbooth align`")
    p.add_argument("--prompt", "-p", action="append", default=[],
                   help="prompt (repeatable); {identifier}, {description}, {class_noun} are filled in")
    p.add_argument("--prompt-file", default=None, help="prompt set: a name in prompts/ or a path")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="one image per prompt and seed")
    p.add_argument("--steps", type=int, default=50, help="denoising steps")
    p.add_argument("--guidance-scale", type=float, default=7.5, help="classifier-free guidance scale")
    p.add_argument("--output", "-o", type=Path, required=True, help="folder for the images")
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("export", help="write a stage's LoRA as one file for AUTOMATIC1111, Forge, ComfyUI",
                       description="Write a finished stage's LoRA in the single-file kohya layout. A stage-one folder "
                       "gives its LoRA; a stage-two folder gives its own LoRA (load it on top of stage one), or with "
                       "--merge both stages in one file.")
    p.add_argument("stage", type=Path, help="output folder of `rlbooth personalize` (mode lora) or `rlbooth align`")
    p.add_argument("--format", dest="fmt", choices=["kohya"], default="kohya", help="file layout (default: kohya)")
    p.add_argument("--merge", action="store_true", help="stage two: stage one's LoRA and stage two's in one file")
    p.add_argument("--output", "-o", type=Path, required=True, help="the .safetensors file to write")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("push", help="upload a finished stage's model/ (weights, model card) to the Hugging Face Hub")
    p.add_argument("stage", type=Path, help="output folder of `rlbooth personalize` or `rlbooth align`")
    p.add_argument("repo", help="Hub model repository, e.g. me/my-dog (created if missing)")
    p.add_argument("--private", action="store_true", help="create the repository private")
    p.set_defaults(func=lambda args: _push(args.stage, args.repo, args.private))

    p = sub.add_parser("eval", add_help=False,
                       help="DreamBench evaluation of stage outputs (options: `rlbooth eval --help`)")
    p.set_defaults(func=cmd_eval, eval_args=[])
    return parser


def subject_from_args(args: argparse.Namespace):
    from rlbooth.subject import Subject, SubjectError

    flags = {k: getattr(args, k) for k in ("images", "class_noun", "identifier", "description", "kind")
             if getattr(args, k) is not None}
    if args.subject is not None:
        subject = Subject.from_yaml(args.subject)
        if flags:
            from dataclasses import replace

            subject = replace(subject, **flags)
        return subject
    if "images" not in flags or "class_noun" not in flags:
        raise SubjectError("give --subject SPEC.yaml, or at least --images DIR and --class-noun NOUN")
    return Subject(**flags)


def cmd_personalize(args: argparse.Namespace) -> None:
    from rlbooth.config import load_config
    from rlbooth.hub_upload import check_repo_id
    from rlbooth.personalize.train import personalize

    config = load_config(args.config, args.overrides)
    subject = subject_from_args(args)
    check_repo_id(args.push_to_hub)
    model_dir = personalize(config, subject, args.output, resume=args.resume)  # locks and claims the folder
    print(f"stage one finished: {model_dir}")
    if args.push_to_hub:
        _push(args.output, args.push_to_hub, args.private)


def cmd_align(args: argparse.Namespace) -> None:
    from rlbooth.align.train import align, preflight
    from rlbooth.config import load_config
    from rlbooth.families import get_family
    from rlbooth.hub_upload import check_repo_id
    from rlbooth.lock import output_lock
    from rlbooth.models import check_family_switches
    from rlbooth.stages import claim_output, stage_request

    config = load_config(args.config, args.overrides)
    one, _ = preflight(config, args.stage_one, args.output, args.resume)  # before the folder is locked (made)
    check_family_switches(config, get_family(one.metadata.get("family", "sd")))
    check_repo_id(args.push_to_hub)
    subject = one.subject
    with output_lock(args.output):
        claim_output(args.output, "align", stage_request("align", config, subject, args.stage_one))
        model_dir = align(config, args.stage_one, args.output, resume=args.resume)
    print(f"stage two finished: {model_dir}")
    if args.push_to_hub:
        _push(args.output, args.push_to_hub, args.private)


def _push(stage: Path, repo: str, private: bool) -> None:
    from rlbooth.hub_upload import push_stage

    if os.environ.get("RANK", "0") != "0":  # under torchrun, one upload
        return
    print(f"uploaded to {repo}: {push_stage(stage, repo, private)}")


def cmd_run(args: argparse.Namespace) -> None:
    from rlbooth.config import load_config
    from rlbooth.run import run
    from rlbooth.subject import Subject

    config = load_config(args.config, args.overrides)
    subject = Subject.from_yaml(args.subject_spec)
    index = run(config, subject, args.output or Path("runs") / subject.name)
    print(f"report: {index}")


def cmd_config(args: argparse.Namespace) -> None:
    from rlbooth.config import load_config
    from rlbooth.config_doc import render_config, render_fields

    print(render_fields() if args.fields else render_config(load_config(args.config, args.overrides)), end="")


def cmd_plan(args: argparse.Namespace) -> None:
    from rlbooth.config import load_config
    from rlbooth.plan import plan, render

    print(render(plan(load_config(args.config, args.overrides))), end="")


def cmd_sample(args: argparse.Namespace) -> None:
    from rlbooth.images import save_image_atomic
    from rlbooth.prompts import read_prompt_file
    from rlbooth.sampling import sample_stage
    from rlbooth.stages import read_stage
    from rlbooth.subject import SubjectError

    stage = read_stage(args.stage)
    templates = args.prompt + (read_prompt_file(args.prompt_file) if args.prompt_file else [])
    if not templates:
        raise SubjectError("give at least one --prompt or a --prompt-file")
    prompts = [stage.subject.prompt(t) for t in templates]
    images = sample_stage(stage, prompts, args.seeds, args.steps, args.guidance_scale)
    for index, image in enumerate(images):
        p, s = divmod(index, len(args.seeds))
        path = args.output / f"p{p}-seed{args.seeds[s]}.png"
        save_image_atomic(image, path)
        print(f"{path}\t{prompts[p]}")


def cmd_export(args: argparse.Namespace) -> None:
    from rlbooth.export import export_lora

    print(f"wrote {export_lora(args.stage, args.output, args.fmt, merge=args.merge)}")


def cmd_eval(args: argparse.Namespace) -> None:
    """Forwards everything after `eval` to `python -m rlbooth.dreambench.evaluate`."""
    from rlbooth.dreambench.evaluate import main as evaluate_main

    code = evaluate_main(args.eval_args)
    if code:
        raise SystemExit(code)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["eval"]:  # its options belong to rlbooth.dreambench.evaluate's own parser
        cmd_eval(argparse.Namespace(eval_args=argv[1:]))
        return 0
    args = build_parser().parse_args(argv)
    main_process = os.environ.get("RANK", "0") == "0"
    logging.basicConfig(level=logging.INFO if main_process else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    from rlbooth.errors import RlboothError

    try:
        args.func(args)
    except RlboothError as err:
        print(f"rlbooth {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
