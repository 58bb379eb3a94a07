"""The report of `rlbooth run`: a sample sheet (stage one beside stage two), reward curves, the config.

Layout of `<run>/report/`:
    sheet.png                 one row per held-out prompt; per seed a stage-one and a stage-two column
                              (samples under 128 px enlarged by whole pixels)
    images/<stage>/p<i>-seed<s>.png   the sheet's images one by one (what `rlbooth sample` draws)
    rewards.png               stage two's reward mean and each component per epoch
    heldout.png               with align.eval_every: the training reward beside the held-out scores per evaluation
    index.html                all of the above with the prompts and both stages' configs
"""

from __future__ import annotations

import html
import json
from pathlib import Path

from PIL import Image, ImageDraw

from rlbooth.config import ReportConfig
from rlbooth.images import enlarge, make_grid, save_image_atomic
from rlbooth.prompts import heldout_prompt_set, read_prompt_file
from rlbooth.files import write_text_atomic
from rlbooth.stages import StageOutput, read_stage
from rlbooth.subject import Subject

SHEET_CELL = 128
"""Smallest side of a sheet cell in pixels: smaller samples are enlarged by an integer factor."""
COLORS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75)]


def report_prompts(cfg: ReportConfig, subject: Subject) -> list[str]:
    templates = read_prompt_file(cfg.prompt_file or heldout_prompt_set(subject))
    return [subject.prompt(t) for t in templates[:cfg.num_prompts]]


def write_report(run_dir: Path, cfg: ReportConfig) -> Path:
    from rlbooth.sampling import sample_stage

    one, two = read_stage(run_dir / "personalize", "personalize"), read_stage(run_dir / "align", "align")
    out = run_dir / "report"
    prompts = report_prompts(cfg, one.subject)
    drawn = {}
    for name, stage in (("stage-one", one), ("stage-two", two)):
        images = sample_stage(stage, prompts, cfg.seeds, cfg.num_inference_steps, cfg.guidance_scale)
        for index, image in enumerate(images):
            p, s = divmod(index, len(cfg.seeds))
            save_image_atomic(image, out / "images" / name / f"p{p}-seed{cfg.seeds[s]}.png")
        drawn[name] = images
    side_by_side = [img for pair in zip(drawn["stage-one"], drawn["stage-two"]) for img in pair]
    sheet = make_grid([enlarge(img, SHEET_CELL) for img in side_by_side], cols=2 * len(cfg.seeds))
    save_image_atomic(sheet, out / "sheet.png")
    history = two.metadata["history"]
    save_image_atomic(plot_curves(curves(history)), out / "rewards.png")
    if "heldout" in two.metadata:
        table = two.metadata["heldout"]["table"]
        save_image_atomic(plot_curves(heldout_curves(table), epochs=[row["epoch"] for row in table]),
                          out / "heldout.png")
    index = out / "index.html"
    write_text_atomic(index, render_html(one, two, prompts, cfg.seeds))
    return index


def curves(history: list[dict[str, float]]) -> dict[str, list[float]]:
    keys = ["reward_mean"] + sorted(k for k in history[0] if k.startswith("reward/")) if history else []
    return {key: [h[key] for h in history] for key in keys}


def heldout_curves(table: list[dict]) -> dict[str, list[float]]:
    """Per evaluation: the training reward, the held-out selection metric, each held-out reward."""
    keys = ["train_reward", "selection"] + sorted(k for k in table[0] if k.startswith("heldout/")) if table else []
    return {key: [row[key] for row in table] for key in keys}


def plot_curves(series: dict[str, list[float]], width: int = 640, panel: int = 160,
                epochs: list[int] | None = None) -> Image.Image:
    """One panel per curve, each with its own y range: reward components differ in scale.

    `epochs`: the epoch of each point where they are not 0, 1, 2, ... (the held-out evaluations)."""
    img = Image.new("RGB", (width, max(1, len(series)) * panel), "white")
    draw = ImageDraw.Draw(img)
    left, right, top, bottom = 70, 20, 22, 24
    for row, (name, values) in enumerate(series.items()):
        y0 = row * panel
        x_span, plot_h = width - left - right, panel - top - bottom
        lo, hi = min(values), max(values)
        hi = hi if hi > lo else lo + 1e-9
        draw.rectangle([left, y0 + top, width - right, y0 + panel - bottom], outline=(180, 180, 180))
        draw.text((left, y0 + 4), f"{name} per epoch", fill=(0, 0, 0))
        draw.text((4, y0 + top), f"{hi:.4g}", fill=(80, 80, 80))
        draw.text((4, y0 + panel - bottom - 10), f"{lo:.4g}", fill=(80, 80, 80))
        first, last = (epochs[0], epochs[-1]) if epochs else (0, len(values) - 1)
        draw.text((left, y0 + panel - bottom + 4), str(first), fill=(80, 80, 80))
        draw.text((width - right - 20, y0 + panel - bottom + 4), str(last), fill=(80, 80, 80))
        points = [(left + x_span * i / max(1, len(values) - 1), y0 + top + plot_h * (hi - v) / (hi - lo))
                  for i, v in enumerate(values)]
        color = COLORS[row % len(COLORS)]
        if len(points) > 1:
            draw.line(points, fill=color, width=2)
        for x, y in points:
            draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=color)
    return img


def kept_epoch_text(heldout: dict) -> str:
    """Which epoch's LoRA is the output, and by what."""
    weights = " + ".join(f"{w:g} x {name}" for name, w in heldout["selection_weights"].items())
    last = heldout["table"][-1]["epoch"] if heldout["table"] else 0
    kept = heldout["best_epoch"] if heldout["keep"] == "best" and heldout["best_epoch"] is not None else last
    return (f"Kept: epoch {kept} of {last} (align.keep: {heldout['keep']}); best held-out selection metric "
            f"({weights}, means over the held-out images) at epoch {heldout['best_epoch']}.")


def heldout_section(heldout: dict | None) -> str:
    if heldout is None:
        return ""
    alarms = (f"<p><b>Reward-hacking alarm</b> at epochs {', '.join(map(str, heldout['alarms']))}: the training "
              "reward rose while the held-out selection metric fell.</p>" if heldout["alarms"] else "")
    return (f"<h2>Held-out evaluation during stage two</h2><p>{html.escape(kept_epoch_text(heldout))}</p>{alarms}"
            '<img src="heldout.png">')


def render_html(one: StageOutput, two: StageOutput, prompts: list[str], seeds: list[int]) -> str:
    subject = one.subject
    head = "".join(f"<th>seed {s}<br>stage one</th><th>seed {s}<br>stage two</th>" for s in seeds)
    rows = []
    for p, prompt in enumerate(prompts):
        cells = "".join(f'<td><img src="images/{stage}/p{p}-seed{s}.png" width="128"></td>'
                        for s in seeds for stage in ("stage-one", "stage-two"))
        rows.append(f"<tr><td>{html.escape(prompt)}</td>{cells}</tr>")
    config = lambda stage: html.escape(json.dumps(stage.metadata["config"], indent=2))
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>rlbooth: {html.escape(subject.name)}</title>
<style>body{{font-family:sans-serif;margin:2em}} td,th{{padding:4px;text-align:center}}
img{{image-rendering:pixelated}} pre{{background:#f4f4f4;padding:1em;overflow:auto}}</style></head><body>
<h1>rlbooth: {html.escape(subject.name)}</h1>
<p>{html.escape(subject.prompt("a {identifier} {description} {class_noun}"))} ({html.escape(subject.kind)});
stage one: {html.escape(one.metadata["mode"])} on {html.escape(str(one.metadata["base_model"]))};
stage two: {len(two.metadata["history"])} epochs of {html.escape(json.dumps(two.metadata["reward"]))}.</p>
<h2>Held-out prompts, stage one beside stage two (same seed, same noise)</h2>
<table><tr><th>prompt</th>{head}</tr>{"".join(rows)}</table>
<p><a href="sheet.png">sheet.png</a>: the same images in one grid.</p>
<h2>Reward during stage two</h2><img src="rewards.png">
{heldout_section(two.metadata.get("heldout"))}
<h2>Config of stage one</h2><pre>{config(one)}</pre>
<h2>Config of stage two</h2><pre>{config(two)}</pre>
</body></html>
"""

