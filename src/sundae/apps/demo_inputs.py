"""The demo's inputs: the widgets of the conditioning and the sampler, and how their values and the uploads are
read and checked (one-line `gr.Error` messages for the page). Used by `sundae.apps.demo` (the tabs and their
actions); nothing here samples.

Conditioning (`_condition_controls`, read back by `_condition`): a class box when the generator has classes,
a prompt box when it is text-conditional (one prompt per line, cycled over the samples, like `sundae sample
--prompt` repeated; encoded by the pipeline's text encoder), and for either a classifier-free guidance scale
(Ho & Salimans 2022; `sundae.pipeline.class_logits_fn`, 1 = none). The schedule widgets are generated from
`SamplerConfig`'s fields and validated by building a `SamplerConfig`. Uploads are opened by `sundae.images`'
policy, their headers checked before decoding.
"""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path
from typing import Any

os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"  # before gradio is imported: no telemetry, no phoning home

import gradio as gr
import numpy as np
import torch
from PIL import Image

from sundae.images import (ImageError, check_text, image_to_tensor, make_grid, open_image_file, read_image,
                           tensor_to_image)
from sundae.pipeline import SundaePipeline
from sundae.sundae import UPDATE_POSITIONS, SamplerConfig, guidance_scales

ALL_CLASSES = -1  # the Generate tab's "cycle through all classes" choice
REGENERATED = (255, 0, 255)  # the brush's colour: the Inpaint tab shows the regenerated token cells in it
# The page's inputs for `SamplerConfig`, in its field order: (field, label); a (start, end) schedule is two.
SAMPLER_INPUTS = [(f.name, f.name.replace("_", " ") + part) for f in dataclasses.fields(SamplerConfig)
                  for part in ((" start", " end") if isinstance(f.default, tuple) else ("",))]
LABELS = {"steps": "Steps T", "min steps": "Min steps before early stop"}  # widget labels beyond capitalising


def _grid(images: torch.Tensor) -> Image.Image:
    """`b c H W` in [-1, 1] -> one PIL image, ceil(sqrt(b)) images per row, 2 white pixels between."""
    return tensor_to_image(make_grid(images.cpu(), nrow=math.ceil(math.sqrt(len(images)))))


def _fail(message: str) -> gr.Error:
    """A message for the page (first letter capitalised), with no traceback on the server's console."""
    return gr.Error(message[:1].upper() + message[1:], print_exception=False)


def sampler_values(sampler: SamplerConfig) -> list[Any]:
    """A `SamplerConfig` as the page's sampler inputs (`SAMPLER_INPUTS`: a schedule's start and end apart)."""
    values = (getattr(sampler, f.name) for f in dataclasses.fields(sampler))
    return [x for value in values for x in (value if isinstance(value, tuple) else (value,))]


def _sampler(values: list[Any]) -> SamplerConfig:
    """The page's sampler inputs (`SAMPLER_INPUTS` order) -> the `SamplerConfig` they make; gr.Error for an
    empty box or for the ValueError of `SamplerConfig`'s checks (its field names in the page's words)."""
    fields: dict[str, list[Any]] = {}
    for (name, label), value in zip(SAMPLER_INPUTS, values, strict=True):
        if value is None:
            raise _fail(f"{label} is empty: enter a number")
        fields.setdefault(name, []).append(value)
    try:
        return SamplerConfig(**{name: v[0] if len(v) == 1 else tuple(v) for name, v in fields.items()})
    except ValueError as err:
        message = str(err)
        name = next((name for name in fields if message.startswith(name)), "")  # min_steps -> min steps
        raise _fail(name.replace("_", " ") + message[len(name):]) from None


def _seed(seed, num: int) -> int:
    """The page's seed box (empty = 0); sample i uses seed + i. gr.Error unless every seed fits 0..2**63-1."""
    seed = int(seed or 0)
    if not 0 <= seed <= 2 ** 63 - num:
        raise _fail(f"seed must lie in 0..{2 ** 63 - num} (sample i uses seed + i), got {seed}")
    return seed


def _condition_controls(pipe: SundaePipeline, cycle: bool, prefix: str) -> list[gr.components.Component]:
    """The conditioning inputs of a tab, in this order: a class box for a class-conditional generator (`cycle`
    adds the choice "all classes, cycled over the samples"), a prompt box for a text-conditional one, and a
    guidance scale for either; nothing for an unconditional generator."""
    controls, cfg = [], pipe.generator.cfg
    if cfg.num_classes:
        choices = [(name if name == str(i) else f"{i}: {name}", i) for i, name in enumerate(pipe.class_names)]
        if cycle:
            choices = [("all, cycled over the samples", ALL_CLASSES)] + choices
        controls.append(gr.Dropdown(choices, value=choices[0][1], label="Class", elem_id=f"{prefix}-class"))
    if cfg.text_dim:
        controls.append(gr.Textbox("", lines=2, max_lines=8, label="Prompt", elem_id=f"{prefix}-prompt", scale=2,
                                   placeholder="one prompt per line; empty: the empty caption",
                                   info="One prompt per line, cycled over the samples; an empty line or an empty "
                                   "box is the empty caption"))
    if cfg.num_classes or cfg.text_dim:
        controls.append(gr.Number(1.0, step=0.5, label="Guidance scale", elem_id=f"{prefix}-guidance",
                                  info="Classifier-free: 1 = none, 0 = unconditional, above 1 follows the "
                                  "condition more closely"))
    return controls


def _condition(pipe: SundaePipeline, values: list[Any]) -> tuple[int | None, tuple[str, ...] | None, float]:
    """The conditioning inputs' values (`_condition_controls`' order) -> the pipeline's `class_labels` (a
    class index, or None for "all" or a generator without classes), `prompt` (the lines, or None) and
    `guidance_scale`. gr.Error for a missing or unknown class (`SundaePipeline.labels`), a prompt that is
    not valid text, or an empty or non-finite scale (`sundae.sundae.guidance_scales`, as `sundae sample
    --guidance-scale` checks it; any finite scale is accepted)."""
    values, cfg = list(values), pipe.generator.cfg
    label = prompts = None
    scale = 1.0
    try:
        if cfg.num_classes:
            if values[0] is None:
                raise ValueError("choose a class")
            label = int(values.pop(0))
            label = None if label == ALL_CLASSES else label
            pipe.labels(label, 1)  # a class outside the trained ones: the pipeline's message
        if cfg.text_dim:
            prompts = tuple((values.pop(0) or "").splitlines()) or ("",)  # a line per prompt; empty box: ""
            for i, prompt in enumerate(prompts):
                check_text(prompt, f"prompt line {i + 1}")
        if cfg.num_classes or cfg.text_dim:
            if values[0] is None:
                raise ValueError("guidance scale is empty: enter a number (1 = no guidance)")
            scale = float(values[0])
            guidance_scales(scale, 1)
    except ValueError as err:
        raise _fail(str(err)) from None
    return label, prompts, scale


def _sampler_controls(sampler: SamplerConfig, prefix: str) -> list[gr.components.Component]:
    """The seed, then an input per `SAMPLER_INPUTS` entry (its order), showing `sampler` (the pipeline's)."""
    widgets = []
    for (name, label), value in zip(SAMPLER_INPUTS, sampler_values(sampler)):
        common = dict(label=LABELS.get(label, label.capitalize()), elem_id=f"{prefix}-{label.replace(' ', '-')}",
                      render=False)  # placed in rows below
        if isinstance(value, str):  # update_positions: one of the sampler's named rules
            widgets.append(gr.Radio(list(UPDATE_POSITIONS), value=value, **common))
        elif isinstance(value, bool):
            widgets.append(gr.Checkbox(value, info="a sample stops once a step changes none of its tokens", **common))
        elif isinstance(value, int):
            top = max(500 if name == "steps" else 100, value)
            widgets.append(gr.Slider(int(name == "steps"), top, value=value, step=1, precision=0, **common))
        elif name == "update_proportion":
            widgets.append(gr.Slider(0.01, 1.0, value=value, step=0.01, **common))
        else:  # temperatures: any number, for SamplerConfig to check
            widgets.append(gr.Number(value, **common))
    schedule = [isinstance(getattr(sampler, name), tuple) for name, _ in SAMPLER_INPUTS]
    with gr.Row():
        seed = gr.Number(0, precision=0, label="Seed", elem_id=f"{prefix}-seed", info="sample i uses seed + i")
        for widget, pair in zip(widgets, schedule):
            if not pair:
                widget.render()
    with gr.Row():
        for widget, pair in zip(widgets, schedule):
            if pair:
                widget.render()
    return [seed, *widgets]


def upload_limit(max_pixels: int) -> int:
    """Bytes the server accepts in one upload: 5 per pixel of the largest image. The editor sends its
    background back as a PNG, which for `max_pixels` RGBA pixels stays under 4 bytes per pixel plus headers,
    so an image that passed the pixel check never bounces; bigger files are refused before they are read."""
    return 5 * max_pixels


def _opened(image: Image.Image | str, max_pixels: int) -> Image.Image:
    """A PIL image, or a file `_editor_paths` passed on, opened by `open_image_file` (its header checked
    before decoding); gr.Error (one line, no server folder) for a refused file or over `max_pixels` pixels."""
    if isinstance(image, (str, Path)):
        try:
            image = open_image_file(image, max_pixels=max_pixels)
        except ImageError as err:
            raise _fail(str(err).replace(str(Path(image).parent) + "/", "")) from None
    width, height = image.size
    if width * height > max_pixels:
        raise _fail(f"the image is {width}x{height} = {width * height} pixels; this demo takes at most "
                    f"{max_pixels} pixels")
    return image


def _editor_paths(payload: Any) -> dict[str, Any] | None:
    """The editor's preprocessing (set on the instance): its payload -> {background, layers} as file paths.
    Gradio's own decodes them before our checks (a traceback, or a huge canvas decoded, via the API)."""
    if payload is None:
        return None
    get = payload.get if isinstance(payload, dict) else (lambda key: getattr(payload, key, None))

    def path(data: Any) -> str | None:
        return None if data is None else (data.get("path") if isinstance(data, dict) else data.path)
    return {"background": path(get("background")), "layers": [path(x) for x in get("layers") or []]}


def _editor_image_and_mask(editor: dict[str, Any] | None, channels: int,
                           max_pixels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The editor's value -> (image `c H W` float in [-1, 1], mask `1 H W` float, 1 = painted).

    Transparent parts of the uploaded image are laid onto white. gr.Error without an image, for one of
    more than `max_pixels` pixels, or without paint.
    """
    background = (editor or {}).get("background")
    if background is None:
        raise _fail("upload an image first")
    background = _opened(background, max_pixels)
    width, height = background.size
    white = Image.new("RGBA", background.size, (255, 255, 255, 255))
    rgb = Image.alpha_composite(white, background.convert("RGBA"))
    image = image_to_tensor(rgb.convert("L" if channels == 1 else "RGB"))
    painted = np.zeros((height, width), dtype=bool)
    for layer in editor.get("layers") or []:
        layer = None if layer is None else _opened(layer, max_pixels)
        if layer is not None and layer.size == background.size:
            painted |= np.asarray(layer.convert("RGBA"))[:, :, 3] > 0
    if not painted.any():
        raise _fail("paint the region to regenerate with the brush first")
    return image, torch.from_numpy(painted).float()[None]


def _upload_path(payload: Any) -> str | None:
    """An upload box's preprocessing (set on the instance): its payload -> the saved file's path, which
    `_read_upload` opens; Gradio's own would open the file before our checks (a traceback for a bad one)."""
    if payload is None:
        return None
    return payload.get("path") if isinstance(payload, dict) else getattr(payload, "path", None)


def _read_upload(path: str | None, channels: int, max_pixels: int) -> Image.Image:
    """An uploaded file, read as the tokenizer will see it (`sundae.images.read_image`: EXIF orientation,
    transparency onto white, grayscale or RGB). gr.Error (one line, no server folder) without a file, or for
    an empty, truncated, corrupt or non-image file, a decompression bomb, or a header declaring more than
    `max_pixels` pixels (refused before decoding)."""
    if path is None:
        raise _fail("upload an image first")
    try:
        return read_image(path, channels, max_pixels=max_pixels)
    except ImageError as err:
        raise _fail(str(err).replace(str(Path(path).parent) + "/", "")) from None  # no server paths
