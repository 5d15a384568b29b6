"""`sundae demo`: a local Gradio web app to watch the SUNDAE sampler denoise and to inpaint with a brush.

A thin client of one `sundae.pipeline.SundaePipeline`, in two tabs. *Generate*: the sampler of
`sundae.sundae.sample` (McKinney & Willcocks section 3.4) over the pipeline's logits function, the image grid
redrawn every few steps while it runs, and the steps each sample actually took (early stop); sample i draws
from its own generator seeded seed + i, so the grid holds exactly the images of `pipe(num, class_labels,
seed=seed, sampler=...)`. *Inpaint*: upload an image, paint the region to regenerate, get several completions
(section 3.5, `SundaePipeline.inpaint`); pixels outside the regenerated token cells are the input's.

The schedule widgets are generated from `SamplerConfig`'s fields, with the pipeline's sampler as their
defaults, and validated by building a `SamplerConfig`. Nothing here samples on its own: live previews come
from wrapping the logits function, which sees the current tokens `z` (`b' h w`), the rows still in the batch
and the step at every step. Bad input becomes a message in the page (`gr.Error`), never a traceback. Gradio
is an optional dependency (`pip install -e ".[demo]"`); analytics are off and the page loads nothing from
outside the machine.

Conditioning (`_condition_controls`, read back by `_condition`): a class box when the generator has classes,
a prompt box when it is text-conditional (one prompt per line, cycled over the samples, like `sundae sample
--prompt` repeated; encoded by the pipeline's text encoder, loaded once when the app is built), and for
either a classifier-free guidance scale (Ho & Salimans 2022; `sundae.pipeline.class_logits_fn`, 1 = none).
"""

from __future__ import annotations

import dataclasses
import math
import os
import queue
import threading
import time
from pathlib import Path
from typing import Any, Iterator

os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"  # before gradio is imported: no telemetry, no phoning home

import gradio as gr
import numpy as np
import torch
from PIL import Image

from sundae.images import (ImageError, check_text, image_to_tensor, make_grid, open_image_file, read_image,
                           tensor_to_image)
from sundae.io import error_line
from sundae.pipeline import SundaePipeline
from sundae.sundae import LogitsFn, SamplerConfig, guidance_scales, sample, token_keep_mask

ALL_CLASSES = -1  # the Generate tab's "cycle through all classes" choice
REGENERATED = (255, 0, 255)  # the brush's colour: the Inpaint tab shows the regenerated token cells in it
# Small images are a few dozen pixels: scale them up to the panel, without blurring.
CSS = ("#grid img, #cells img, #upload img { width: 100%; height: 100%; object-fit: contain; }\n"
       "#grid img, #cells img, #upload img, #completions img { image-rendering: pixelated; }")
# The page's inputs for `SamplerConfig`, in its field order: (field, label); a (start, end) schedule is two.
SAMPLER_INPUTS = [(f.name, f.name.replace("_", " ") + part) for f in dataclasses.fields(SamplerConfig)
                  for part in ((" start", " end") if isinstance(f.default, tuple) else ("",))]
LABELS = {"steps": "Steps T", "min steps": "Min steps before early stop"}  # widget labels beyond capitalising


class _Stopped(Exception):
    """Raised inside the sampler's thread when the page went away or the user pressed Stop."""


def sample_live(logits_fn: LogitsFn, shape: tuple[int, int, int], codebook_size: int, every: int,
                sampler: SamplerConfig | None = None,
                **sample_kwargs: Any) -> Iterator[tuple[int, int, torch.Tensor, torch.Tensor | None]]:
    """Run `sundae.sundae.sample` in a thread and yield its tokens while it runs.

    Yields (step, active, tokens `b h w` int64, None) after step 0 (the uniform start) and every `every`
    steps, then once (steps run, 0, final tokens `b h w`, steps taken `b` int64). `active` is the number of
    samples still in the batch. A sample that has left the batch shows its final tokens. The final tokens
    and steps are those of `sample(logits_fn, shape, codebook_size, sampler, **sample_kwargs)` (generator=,
    device=, overrides such as steps=): watching draws no random numbers. Closing the iterator early stops
    the sampler at its next step. Raises what `sample` raises (ValueError for a bad schedule).
    """
    if every < 1:
        raise ValueError(f"preview interval must be >= 1 step, got {every}")
    updates: queue.Queue = queue.Queue(maxsize=2)
    stop = threading.Event()
    seen: dict[str, Any] = {}  # this run's last tokens of every caller sample ("z") and steps run ("steps")

    def put(item) -> None:
        while not stop.is_set():
            try:
                updates.put(item, timeout=0.1)
                return
            except queue.Full:
                continue
        raise _Stopped

    def watched(z: torch.Tensor, rows: torch.Tensor, step: int) -> torch.Tensor:
        if stop.is_set():
            raise _Stopped
        if "z" not in seen:
            seen["z"] = z.clone()
        seen["z"][rows] = z
        seen["steps"] = step + 1
        if step % every == 0:  # z holds the tokens after `step` steps
            put(("step", step, len(rows), seen["z"].clone(), None))
        return logits_fn(z, rows, step)

    def work() -> None:
        try:
            tokens, taken = sample(watched, shape, codebook_size, sampler, **sample_kwargs)
            put(("done", seen["steps"], 0, tokens, taken))
        except _Stopped:
            pass
        except BaseException as err:  # handed to the caller's thread
            try:
                put(("error", 0, 0, err, None))
            except _Stopped:
                pass

    thread = threading.Thread(target=work, daemon=True, name="sundae-demo-sampler")
    thread.start()
    try:
        while True:
            kind, step, active, payload, taken = updates.get()
            if kind == "error":
                raise payload
            yield step, active, payload, taken
            if kind == "done":
                return
    finally:
        stop.set()
        thread.join()


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
        if isinstance(value, bool):
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


class Actions:
    """What the page's buttons do, over a `SundaePipeline` (generator and tokenizer, eval mode); callable
    without a browser. `max_pixels` bounds an uploaded image's H * W, `max_samples` the samples per run.

    The arguments after the conditioning values (`_condition_controls`: a class index for a class-conditional
    generator, the prompt text for a text-conditional one, then the guidance scale for either; none for an
    unconditional generator) are the page's inputs in order, ending with the seed and the sampler's inputs
    (`SAMPLER_INPUTS`; `sampler_values` of a `SamplerConfig`); bad values raise gr.Error with a message for
    the page. Raises ValueError (one line) for a text-conditional generator whose checkpoint names no text
    encoder, or whose encoder cannot be loaded or gives features of another width.
    """

    def __init__(self, pipe: SundaePipeline, max_pixels: int = 2048 * 2048, max_samples: int = 64):
        self.pipe, self.max_pixels, self.max_samples = pipe, max_pixels, max_samples
        if pipe.generator.cfg.text_dim:
            self._check_text_encoder()

    def _check_text_encoder(self) -> None:
        """Encode the empty caption now (the pipeline keeps the encoder), so a missing encoder is a message
        at start, not at the first click."""
        name, width = self.pipe.meta.get("text_encoder"), self.pipe.generator.cfg.text_dim
        try:
            features = self.pipe.text("", 1)[0]
        except (ImportError, OSError, ValueError) as err:
            raise ValueError(f"cannot load the generator's text encoder {name}: {error_line(err)}" if name
                             else error_line(err)) from None
        if features.shape[-1] != width:
            raise ValueError(f"the generator's text encoder {name} gives {features.shape[-1]}-wide features, the "
                             f"generator expects text_dim {width}")

    def _count(self, num, what: str) -> int:
        if num is None or not 1 <= int(num) <= self.max_samples:
            raise _fail(f"number of {what} must be 1..{self.max_samples}")
        return int(num)

    def _decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """One image at a time, as `SundaePipeline.generate` decodes (batched convolutions round otherwise)."""
        return torch.cat([self.pipe.decode(tokens[i:i + 1]).float().cpu() for i in range(len(tokens))])

    def generate(self, *values) -> Iterator[tuple[Image.Image, str]]:
        """(*conditioning, samples, redraw every, seed, *sampler inputs) -> yields (grid image, status text)
        while sampling, the last with the final grid (the images of `pipe(samples, class, prompt, guidance,
        sampler, seed)`) and the steps each sample took. Conditioning: see the class docstring; prompts and
        classes are cycled over the samples."""
        pipe, n = self.pipe, len(SAMPLER_INPUTS)
        cond, (num, every, seed), sampler = values[:-n - 3], values[-n - 3:-n], _sampler(values[-n:])
        num, every = self._count(num, "samples"), max(1, int(every or 1))
        label, prompts, scale = _condition(pipe, cond)
        gens = [torch.Generator(pipe.device).manual_seed(s) for s in pipe.seeds(_seed(seed, num), num)]
        height, width = pipe.image_size
        start = time.time()
        try:
            logits_fn = pipe.logits_fn(pipe.labels(label, num), pipe.text(prompts, num), scale, sampler.steps)
            shape = (num, *pipe.grid)
            for step, active, tokens, taken in sample_live(logits_fn, shape, pipe.generator.cfg.codebook_size, every,
                                                           sampler, generator=gens, device=pipe.device):
                grid = _grid(self._decode(tokens))
                if taken is None:
                    yield grid, f"Step {step} of {sampler.steps}: {active} of {num} samples still in the batch"
                    continue
                taken = taken.cpu().tolist()
                stop = (f"a sample stops once a whole step changes none of its tokens, from step {sampler.min_steps} "
                        f"on" if sampler.early_stop else "early stop off")
                yield grid, (f"Done: {num} samples of {width}x{height} pixels in {time.time() - start:.1f} s; "
                             f"steps taken per sample ({stop}): min {min(taken)}, mean {np.mean(taken):.1f}, max "
                             f"{max(taken)} of {sampler.steps}: {', '.join(map(str, taken))}")
        except ValueError as err:
            raise _fail(str(err)) from None

    def load(self, path: str | None) -> dict[str, Any] | None:
        """The uploaded file -> the editor's value: the image as the tokenizer will see it (`sundae.images.
        read_image`: EXIF orientation, transparency onto white, grayscale or RGB) as the background, nothing
        painted; None clears. gr.Error (one line) for an empty, truncated, corrupt or non-image file, a
        decompression bomb, or a header declaring more than `max_pixels` pixels (refused before decoding)."""
        if path is None:
            return None
        try:
            image = read_image(path, self.pipe.tokenizer.cfg.in_channels, max_pixels=self.max_pixels)
        except ImageError as err:
            raise _fail(str(err).replace(str(Path(path).parent) + "/", "")) from None  # no server paths
        return {"background": image.convert("RGBA"), "layers": [], "composite": None}

    def upload(self, value: dict[str, Any] | None) -> dict[str, Any] | None:
        """The upload box's raw value (Gradio's file data, its "path" the saved upload; the event skips
        Gradio's preprocessing, which would decode the file before our checks) -> `load` of that file."""
        return self.load(None if value is None else value["path"])

    def inpaint(self, editor: dict[str, Any] | None, *values) -> tuple[Image.Image, list[Image.Image], str]:
        """(editor value {background, layers}, *conditioning, completions, grow by N cells, seed, *sampler
        inputs) -> (the upload with its regenerated token cells in REGENERATED colour, the completions at the
        upload's size: `pipe.inpaint`'s, status text). Conditioning: see the class docstring; prompts are
        cycled over the completions."""
        pipe, n, f = self.pipe, len(SAMPLER_INPUTS), self.pipe.tokenizer.cfg.f
        cond, (num, dilate, seed), sampler = values[:-n - 3], values[-n - 3:-n], _sampler(values[-n:])
        num, dilate = self._count(num, "completions"), int(dilate or 0)
        image, mask = _editor_image_and_mask(editor, pipe.tokenizer.cfg.in_channels, self.max_pixels)
        label, prompts, scale = _condition(pipe, cond)
        seed = _seed(seed, num)
        start = time.time()
        try:
            completions = pipe.inpaint(image, mask, num, label, prompts, scale, sampler, seed, dilate).images
        except (ValueError, RuntimeError) as err:  # sizes the tokenizer or the generator cannot take
            raise _fail(f"cannot inpaint this {image.shape[2]}x{image.shape[1]} image: {error_line(err)}") from None
        keep = token_keep_mask(mask[None], f, dilate)[0]  # the cells `pipe.inpaint` kept
        cells = keep.repeat_interleave(f, 0).repeat_interleave(f, 1)[: image.shape[1], : image.shape[2]]
        shown = np.array(tensor_to_image(image).convert("RGB"))
        shown[~cells.numpy()] = REGENERATED
        status = (f"{num} completions in {time.time() - start:.1f} s; {int((~keep).sum())} of {keep.numel()} token "
                  f"cells ({f}x{f} pixels each) regenerated, every other pixel copied from the input")
        return Image.fromarray(shown), completions, status


def build_app(pipe: SundaePipeline, max_pixels: int = 2048 * 2048, max_samples: int = 64) -> gr.Blocks:
    """The demo's Gradio Blocks over `pipe` (generator and tokenizer in eval mode; its `grid` sets the sample
    size, `class_names` label the class box, `sampler` gives the schedule widgets' defaults). The buttons
    call `Actions`. Launch it with `serve`. Raises ValueError as `Actions` does.

    `max_pixels` bounds the uploaded image's H * W, `max_samples` the samples or completions per run.
    """
    actions = Actions(pipe, max_pixels, max_samples)
    (h, w), f, cfg = pipe.grid, pipe.tokenizer.cfg.f, pipe.generator.cfg

    with gr.Blocks(analytics_enabled=False, title="SUNDAE demo") as app:
        conditions = ([f"{cfg.num_classes} classes"] if cfg.num_classes else []) + (
            [f"text prompts ({pipe.meta.get('text_encoder')})"] if cfg.text_dim else [])
        gr.Markdown(f"## SUNDAE: step-unrolled denoising over VQ-GAN tokens\n"
                    f"{h}x{w} tokens of {f}x{f} pixels, {cfg.codebook_size} codes, "
                    + (" and ".join(conditions) or "unconditional"))
        with gr.Tab("Generate", id="generate"):
            with gr.Row():
                cond = _condition_controls(pipe, cycle=True, prefix="gen")
                num = gr.Slider(1, max_samples, value=min(16, max_samples), step=1, precision=0, label="Samples",
                                elem_id="gen-num")
                every = gr.Slider(1, 50, value=5, step=1, precision=0, label="Redraw every N steps")
            seed, *sampler = _sampler_controls(pipe.sampler, "gen")
            with gr.Row():
                run = gr.Button("Generate", variant="primary", elem_id="gen-run")
                stop = gr.Button("Stop", elem_id="gen-stop")
            status = gr.Markdown(elem_id="gen-status")
            grid = gr.Image(label="Samples", format="png", type="pil", interactive=False, elem_id="grid", height=480,
                            buttons=["download"])
            event = run.click(actions.generate, [*cond, num, every, seed, *sampler], [grid, status],
                              concurrency_id="network")
            stop.click(None, cancels=[event])
        with gr.Tab("Inpaint", id="inpaint"):
            gr.Markdown("Upload an image, then paint the part to regenerate. A token cell is regenerated if any "
                        "of its pixels is painted; every other pixel stays as uploaded.")
            with gr.Row():
                # Uploads go through an image box, which reports files over the size limit in the page
                # (the editor's own upload does not), then into the editor. Its event skips Gradio's
                # preprocessing (PIL decoding, with tracebacks for bad files): `Actions.load` checks the file.
                upload = gr.Image(type="filepath", sources=["upload", "clipboard"], format="png",
                                  label="1. Upload an image", elem_id="upload", scale=1, height=300)
                brush = gr.Brush(default_size=max(2, f), colors=[("#%02x%02x%02x" % REGENERATED, 0.6)],
                                 color_mode="fixed")
                editor = gr.ImageEditor(type="pil", sources=(), transforms=(), layers=False, format="png",
                                        label="2. Paint the region to regenerate", elem_id="editor", scale=2,
                                        brush=brush, eraser=gr.Eraser(default_size=max(2, f)), height=300)
                editor.preprocess = _editor_paths  # our checks open the files, not Gradio
            with gr.Row():
                icond = _condition_controls(pipe, cycle=False, prefix="inp")
                inum = gr.Slider(1, max_samples, value=min(4, max_samples), step=1, precision=0, label="Completions",
                                 elem_id="inp-num")
                dilate = gr.Slider(0, 4, value=0, step=1, precision=0, label="Grow the painted cells by N cells",
                                   elem_id="inp-dilate")
            iseed, *isampler = _sampler_controls(pipe.sampler, "inp")
            irun = gr.Button("Inpaint", variant="primary", elem_id="inp-run")
            istatus = gr.Markdown(elem_id="inp-status")
            with gr.Row():
                cells = gr.Image(label="Regenerated token cells", format="png", type="pil", interactive=False,
                                 elem_id="cells", scale=1, height=240)
                gallery = gr.Gallery(label="Completions", format="png", type="pil", columns=4, elem_id="completions",
                                     scale=3, interactive=False, height=240)
            upload.change(actions.upload, upload, editor, preprocess=False,  # an upload, a paste, or clearing
                          show_progress="hidden")  # a refused file: the message alone, no "Error" on the editor
            irun.click(actions.inpaint, [editor, *icond, inum, dilate, iseed, *isampler], [cells, gallery, istatus],
                       concurrency_id="network")
    return app


def serve(app: gr.Blocks, host: str = "127.0.0.1", port: int | None = None, share: bool = False,
          max_upload_bytes: int = upload_limit(2048 * 2048), block: bool = True) -> str:
    """Start `app` on host:port (port None: Gradio picks one from 7860 up) and return its local URL.

    The server refuses uploads over `max_upload_bytes` (`upload_limit` of the app's `max_pixels`) and the
    page says so. `share` opens a public Gradio link (off by default: the app stays on this machine).
    `block=False` returns at once (tests).
    """
    app.queue(default_concurrency_limit=1)  # one run at a time (both tabs share the "network" slot)
    _, url, _ = app.launch(server_name=host, server_port=port, share=share, max_file_size=max_upload_bytes,
                           prevent_thread_lock=not block, quiet=not block, css=CSS, footer_links=[],
                           inbrowser=False)
    return url
