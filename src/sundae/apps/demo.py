"""`sundae demo`: a local Gradio web app to watch the SUNDAE sampler denoise and to inpaint with a brush.

Two tabs over one loaded generator + tokenizer. *Generate*: the sampler of `sundae.sundae.sample` with its
schedules (McKinney & Willcocks section 3.4), the image grid redrawn every few steps while it runs, and the
steps each sample actually took (early stop). *Inpaint*: upload an image, paint the region to regenerate,
get several completions (section 3.5, `sundae.cli.inpaint_images`); pixels outside the regenerated token
cells are the input's.

Nothing here samples on its own: live previews come from wrapping the logits function, which sees the
current tokens `z` (`b' h w`) and the rows still in the batch at every step. Bad input becomes a message in
the page (`gr.Error`), never a traceback. Gradio is an optional dependency (`pip install -e ".[demo]"`);
analytics are off and the page loads nothing from outside the machine.

Conditioning (`_condition_controls`, read back by `_condition`): a class box when the generator has classes,
a prompt box when it is text-conditional (one prompt per line, cycled over the samples, like `sundae sample
--prompt` repeated; encoded by the text encoder named in the checkpoint, loaded once when the app is built),
and for either a classifier-free guidance scale (Ho & Salimans 2022; `sundae.cli.class_logits_fn`, 1 = none).
"""

from __future__ import annotations

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

from sundae.cli import class_logits_fn, encode_prompts, error_line, inpaint_images
from sundae.hourglass import Hourglass
from sundae.images import ImageError, check_text, image_to_tensor, make_grid, read_image, tensor_to_image
from sundae.sundae import check_schedule, guidance_scales, sample
from sundae.text import load_text_encoder
from sundae.vqgan import VQGAN

ALL_CLASSES = -1  # the Generate tab's "cycle through all classes" choice
REGENERATED = (255, 0, 255)  # the brush's colour: the Inpaint tab shows the regenerated token cells in it
# Small images are a few dozen pixels: scale them up to the panel, without blurring.
CSS = ("#grid img, #cells img, #upload img { width: 100%; height: 100%; object-fit: contain; }\n"
       "#grid img, #cells img, #upload img, #completions img { image-rendering: pixelated; }")


class _Stopped(Exception):
    """Raised inside the sampler's thread when the page went away or the user pressed Stop."""


def sample_live(logits_fn, shape: tuple[int, int, int], vocab_size: int, every: int,
                **sample_kwargs: Any) -> Iterator[tuple[int, int, torch.Tensor, torch.Tensor | None]]:
    """Run `sundae.sundae.sample` in a thread and yield its tokens while it runs.

    Yields (step, active, tokens `b h w` int64, None) after step 0 (the uniform start) and every `every`
    steps, then once (steps run, 0, final tokens `b h w`, steps taken `b` int64). `active` is the number of
    samples still in the batch. A sample that has left the batch shows its final tokens. The final tokens
    and steps are those of `sample(logits_fn, shape, vocab_size, **sample_kwargs)`: watching draws no
    random numbers. Closing the iterator early stops the sampler at its next step.
    Raises what `sample` raises (ValueError for a bad schedule).
    """
    if every < 1:
        raise ValueError(f"preview interval must be >= 1 step, got {every}")
    updates: queue.Queue = queue.Queue(maxsize=2)
    stop = threading.Event()
    latest: list[torch.Tensor] = []  # the last tokens seen for every caller sample
    calls = [0]

    def put(item) -> None:
        while not stop.is_set():
            try:
                updates.put(item, timeout=0.1)
                return
            except queue.Full:
                continue
        raise _Stopped

    def watched(z: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        if stop.is_set():
            raise _Stopped
        if not latest:
            latest.append(z.clone())
        else:
            latest[0][rows] = z
        n = calls[0]  # z holds the tokens after n steps
        if n % every == 0:
            put(("step", n, len(rows), latest[0].clone(), None))
        calls[0] += 1
        return logits_fn(z, rows)

    def work() -> None:
        try:
            tokens, taken = sample(watched, shape, vocab_size, **sample_kwargs)
            put(("done", calls[0], 0, tokens, taken))
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


def _schedule(steps, temperature, proportion, min_steps) -> dict[str, Any]:
    """The sampler's schedule keywords from the page's values; gr.Error for empty or invalid ones."""
    values = {"steps": steps, "temperature start": temperature[0], "temperature end": temperature[1],
              "update proportion start": proportion[0], "update proportion end": proportion[1],
              "min steps": min_steps}
    for name, value in values.items():
        if value is None or (isinstance(value, float) and math.isnan(value)):
            raise _fail(f"{name} is empty: enter a number")
    steps, min_steps = int(steps), int(min_steps)
    temperature = (float(temperature[0]), float(temperature[1]))
    proportion = (float(proportion[0]), float(proportion[1]))
    try:
        check_schedule(steps, temperature, proportion)
    except ValueError as err:
        raise _fail(str(err)) from None
    if min_steps < 0:
        raise _fail(f"min steps must be >= 0, got {min_steps}")
    return {"steps": steps, "temperature": temperature, "update_proportion": proportion, "min_steps": min_steps}


def _generator(seed, device: torch.device) -> torch.Generator:
    """A torch.Generator seeded from the page's seed box (empty = 0); gr.Error outside 0..2**63-1."""
    seed = int(seed or 0)
    if not 0 <= seed < 2 ** 63:
        raise _fail(f"seed must lie in 0..{2 ** 63 - 1}, got {seed}")
    return torch.Generator(device).manual_seed(seed)


def _class_names(net: Hourglass, meta: dict[str, Any]) -> list[str]:
    names = list(meta.get("class_names") or [])
    k = net.cfg.num_classes
    return [f"{i}: {names[i]}" if len(names) == k else str(i) for i in range(k)]


def _condition_controls(net: Hourglass, meta: dict[str, Any], cycle: bool,
                        prefix: str) -> list[gr.components.Component]:
    """The conditioning inputs of a tab, in this order: a class box for a class-conditional generator (`cycle`
    adds the choice "all classes, cycled over the samples"), a prompt box for a text-conditional one, and a
    guidance scale for either; nothing for an unconditional generator."""
    controls = []
    if net.cfg.num_classes:
        choices = [(name, i) for i, name in enumerate(_class_names(net, meta))]
        if cycle:
            choices = [("all, cycled over the samples", ALL_CLASSES)] + choices
        controls.append(gr.Dropdown(choices, value=choices[0][1], label="Class", elem_id=f"{prefix}-class"))
    if net.cfg.text_dim:
        controls.append(gr.Textbox("", lines=2, max_lines=8, label="Prompt", elem_id=f"{prefix}-prompt", scale=2,
                                   placeholder="one prompt per line; empty: the empty caption",
                                   info="One prompt per line, cycled over the samples; an empty line or an empty "
                                   "box is the empty caption"))
    if net.cfg.num_classes or net.cfg.text_dim:
        controls.append(gr.Number(1.0, step=0.5, label="Guidance scale", elem_id=f"{prefix}-guidance",
                                  info="Classifier-free: 1 = none, 0 = unconditional, above 1 follows the "
                                  "condition more closely"))
    return controls


def _condition(net: Hourglass, values: list[Any], num: int, steps: int,
               device: torch.device) -> tuple[torch.Tensor | None, tuple[str, ...] | None, float]:
    """The conditioning inputs' values (`_condition_controls`' order) -> (`num` int64 labels or None, the
    prompts or None, the guidance scale). gr.Error for a missing or unknown class, a prompt that is not valid
    text, or an empty or non-finite scale (the checks of `sundae.sundae.guidance_scales`, as `sundae sample
    --guidance-scale` makes them; any finite scale is accepted)."""
    values = list(values)
    labels = _labels_for(net, values, num, device)
    values = values[1:] if net.cfg.num_classes else values
    prompts = None
    if net.cfg.text_dim:
        prompts = tuple((values.pop(0) or "").splitlines()) or ("",)  # a line per prompt; empty box: ""
        for i, prompt in enumerate(prompts):
            try:
                check_text(prompt, f"prompt line {i + 1}")
            except ValueError as err:
                raise _fail(str(err)) from None
    scale = 1.0
    if net.cfg.num_classes or net.cfg.text_dim:
        scale = values[0]
        if scale is None:
            raise _fail("guidance scale is empty: enter a number (1 = no guidance)")
        scale = float(scale)
        try:
            guidance_scales(scale, steps)
        except ValueError as err:
            raise _fail(str(err)) from None
    return labels, prompts, scale


def _labels_for(net: Hourglass, values: list[Any], num: int, device: torch.device) -> torch.Tensor | None:
    """`num` int64 labels from the conditioning inputs' values (None for a generator without classes)."""
    if not net.cfg.num_classes:
        return None
    choice = values[0]
    if choice is None:
        raise _fail("choose a class")
    choice = int(choice)
    if choice == ALL_CLASSES:
        return torch.arange(num, device=device) % net.cfg.num_classes
    if not 0 <= choice < net.cfg.num_classes:
        raise _fail(f"class {choice} is outside the trained classes 0..{net.cfg.num_classes - 1}")
    return torch.full((num,), choice, dtype=torch.long, device=device)


def _schedule_controls(prefix: str) -> list[gr.components.Component]:
    """Steps, temperature and update-proportion schedules, min steps, seed: the CLI's defaults."""
    with gr.Row():
        steps = gr.Slider(1, 500, value=100, step=1, label="Steps T", elem_id=f"{prefix}-steps")
        min_steps = gr.Slider(0, 100, value=10, step=1, label="Min steps before early stop")
        seed = gr.Number(0, precision=0, label="Seed", elem_id=f"{prefix}-seed")
    with gr.Row():
        t0 = gr.Number(0.8, label="Temperature start", minimum=0.01)
        t1 = gr.Number(0.8, label="Temperature end", minimum=0.01)
        p0 = gr.Slider(0.01, 1.0, value=0.5, step=0.01, label="Update proportion start")
        p1 = gr.Slider(0.01, 1.0, value=0.5, step=0.01, label="Update proportion end")
    return [steps, min_steps, seed, t0, t1, p0, p1]


def upload_limit(max_pixels: int) -> int:
    """Bytes the server accepts in one upload: 5 per pixel of the largest image. The editor sends its
    background back as a PNG, which for `max_pixels` RGBA pixels stays under 4 bytes per pixel plus headers,
    so an image that passed the pixel check never bounces; bigger files are refused before they are read."""
    return 5 * max_pixels


def _check_pixels(image: Image.Image, max_pixels: int) -> None:
    width, height = image.size
    if width * height > max_pixels:
        raise _fail(f"the image is {width}x{height} = {width * height} pixels; this demo takes at most "
                    f"{max_pixels} pixels")


def _editor_image_and_mask(editor: dict[str, Any] | None, channels: int,
                           max_pixels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The editor's value -> (image `c H W` float in [-1, 1], mask `1 H W` float, 1 = painted).

    Transparent parts of the uploaded image are laid onto white. gr.Error without an image, for one of
    more than `max_pixels` pixels, or without paint.
    """
    background = (editor or {}).get("background")
    if background is None:
        raise _fail("upload an image first")
    _check_pixels(background, max_pixels)
    width, height = background.size
    white = Image.new("RGBA", background.size, (255, 255, 255, 255))
    rgb = Image.alpha_composite(white, background.convert("RGBA"))
    image = image_to_tensor(rgb.convert("L" if channels == 1 else "RGB"))
    painted = np.zeros((height, width), dtype=bool)
    for layer in editor.get("layers") or []:
        if layer is not None and layer.size == background.size:
            painted |= np.asarray(layer.convert("RGBA"))[:, :, 3] > 0
    if not painted.any():
        raise _fail("paint the region to regenerate with the brush first")
    return image, torch.from_numpy(painted).float()[None]


class Actions:
    """What the page's buttons do, over a loaded generator `net` and its `tokenizer` (eval mode, on `device`);
    callable without a browser. `meta` is the generator checkpoint's meta dict: its `grid` [h, w] sets the
    sample size, its `text_encoder` the encoder of a text-conditional generator's prompts (loaded here, once).
    `max_pixels` bounds an uploaded image's H * W, `max_samples` the samples per run.

    The arguments after the conditioning values (`_condition_controls`: a class index for a class-conditional
    generator, the prompt text for a text-conditional one, then the guidance scale for either; none for an
    unconditional generator) are the page's inputs in order; bad values raise gr.Error with a message for
    the page. Raises ValueError (one line) for meta without a grid, or for a text-conditional generator whose
    checkpoint names no text encoder or whose encoder cannot be loaded or gives features of another width.
    """

    def __init__(self, net: Hourglass, tokenizer: VQGAN, meta: dict[str, Any], device: torch.device | str = "cpu",
                 max_pixels: int = 2048 * 2048, max_samples: int = 64):
        self.net, self.tokenizer, self.device = net, tokenizer, torch.device(device)
        if not meta.get("grid"):
            raise ValueError("the generator's meta names no token grid [h, w] to sample at")
        self.grid = tuple(meta["grid"])
        # The training images' size, when the tokenizer padded them (sides not multiples of f): decode to it.
        self.size = tuple(meta["image_size"]) if meta.get("image_size") else None
        self.max_pixels, self.max_samples = max_pixels, max_samples
        self.text_encoder = meta.get("text_encoder")
        if net.cfg.text_dim:
            self._check_text_encoder()

    def _check_text_encoder(self) -> None:
        """Load the text encoder now, so a missing one is a message at start, not at the first click; later
        `encode_prompts` calls get the same instance from `load_text_encoder`'s cache."""
        name = self.text_encoder
        if not name:
            raise ValueError("this text-conditional generator names no text encoder in its checkpoint (meta "
                             "text_encoder), so its prompts cannot be encoded")
        try:
            encoder = load_text_encoder(str(name), str(self.device))
        except (ImportError, OSError, ValueError) as err:
            raise ValueError(f"cannot load the generator's text encoder {name}: {error_line(err)}") from None
        if encoder.dim != self.net.cfg.text_dim:
            raise ValueError(f"the generator's text encoder {name} gives {encoder.dim}-wide features, the "
                             f"generator expects text_dim {self.net.cfg.text_dim}")

    def _text(self, prompts: tuple[str, ...] | None, num: int):
        """The prompts cycled over `num` samples and encoded (`sundae.cli.encode_prompts`), or None."""
        return None if prompts is None else encode_prompts(prompts, num, self.text_encoder, self.device)

    def _count(self, num, what: str) -> int:
        if num is None or not 1 <= int(num) <= self.max_samples:
            raise _fail(f"number of {what} must be 1..{self.max_samples}")
        return int(num)

    def generate(self, *values) -> Iterator[tuple[Image.Image, str]]:
        """(*conditioning, samples, redraw every, steps, min steps, seed, temperature start, end, update
        proportion start, end) -> yields (grid image, status text) while sampling, the last with the final
        grid and the steps each sample took. Conditioning: see the class docstring; prompts and classes are
        cycled over the samples."""
        net, f = self.net, self.tokenizer.cfg.f
        (h, w), device = self.grid, self.device
        height, width = self.size or (h * f, w * f)
        cond, (num, every, steps, min_steps, seed, t0, t1, p0, p1) = values[:-9], values[-9:]
        schedule = _schedule(steps, (t0, t1), (p0, p1), min_steps)
        num = self._count(num, "samples")
        every = max(1, int(every or 1))
        labels, prompts, scale = _condition(net, cond, num, schedule["steps"], device)
        gen = _generator(seed, device)
        start = time.time()
        try:
            text = self._text(prompts, num)
            logits_fn = class_logits_fn(net, labels, guidance_scale=scale, steps=schedule["steps"], text=text)
            for step, active, tokens, taken in sample_live(logits_fn, (num, h, w), net.cfg.vocab_size, every,
                                                           generator=gen, device=device, **schedule):
                with torch.inference_mode():
                    grid = _grid(self.tokenizer.decode(tokens, size=self.size))
                if taken is None:
                    yield grid, f"Step {step} of {schedule['steps']}: {active} of {num} samples still in the batch"
                    continue
                taken = taken.cpu().tolist()
                yield grid, (f"Done: {num} samples of {width}x{height} pixels in {time.time() - start:.1f} s; "
                             f"steps taken per sample (a sample stops once a whole step changes none of its tokens, "
                             f"from step {schedule['min_steps']} on): "
                             f"min {min(taken)}, mean {np.mean(taken):.1f}, max {max(taken)} of "
                             f"{schedule['steps']}: {', '.join(map(str, taken))}")
        except ValueError as err:
            raise _fail(str(err)) from None

    def load(self, path: str | None) -> dict[str, Any] | None:
        """The uploaded file -> the editor's value: the image as the tokenizer will see it (`sundae.images.
        read_image`: EXIF orientation, transparency onto white, grayscale or RGB) as the background, nothing
        painted; None clears. gr.Error for an unreadable file or more than `max_pixels` pixels."""
        if path is None:
            return None
        try:
            image = read_image(path, self.tokenizer.cfg.in_channels)
        except ImageError as err:
            raise _fail(str(err).replace(str(Path(path).parent) + "/", "")) from None  # no server paths
        _check_pixels(image, self.max_pixels)
        return {"background": image.convert("RGBA"), "layers": [], "composite": None}

    def inpaint(self, editor: dict[str, Any] | None, *values) -> tuple[Image.Image, list[Image.Image], str]:
        """(editor value {background, layers}, *conditioning, completions, grow by N cells, steps, min steps,
        seed, temperature start, end, update proportion start, end) -> (the upload with its regenerated
        token cells in REGENERATED colour, the completions at the upload's size, status text). Conditioning:
        see the class docstring; prompts are cycled over the completions."""
        net, f, device = self.net, self.tokenizer.cfg.f, self.device
        cond, (num, dilate, steps, min_steps, seed, t0, t1, p0, p1) = values[:-9], values[-9:]
        schedule = _schedule(steps, (t0, t1), (p0, p1), min_steps)
        num = self._count(num, "completions")
        image, mask = _editor_image_and_mask(editor, self.tokenizer.cfg.in_channels, self.max_pixels)
        labels, prompts, scale = _condition(net, cond, num, schedule["steps"], device)
        gen = _generator(seed, device)
        start = time.time()
        text = self._text(prompts, num)
        try:
            with torch.inference_mode():
                images, _, keep, _ = inpaint_images(net, self.tokenizer, image, mask, num, labels, gen,
                                                    dilate=int(dilate or 0), guidance_scale=scale, text=text,
                                                    **schedule)
        except (ValueError, RuntimeError) as err:  # sizes the tokenizer or the generator cannot take
            raise _fail(f"cannot inpaint this {image.shape[2]}x{image.shape[1]} image: {error_line(err)}") from None
        cells = keep[0].repeat_interleave(f, 0).repeat_interleave(f, 1)[: image.shape[1], : image.shape[2]]
        shown = np.array(tensor_to_image(image).convert("RGB"))
        shown[~cells.cpu().numpy()] = REGENERATED
        regenerated = int((~keep[0]).sum())
        status = (f"{num} completions in {time.time() - start:.1f} s; {regenerated} of {keep[0].numel()} token "
                  f"cells ({f}x{f} pixels each) regenerated, every other pixel copied from the input")
        return Image.fromarray(shown), [tensor_to_image(x) for x in images.cpu()], status


def build_app(net: Hourglass, tokenizer: VQGAN, meta: dict[str, Any], device: torch.device | str = "cpu",
              max_pixels: int = 2048 * 2048, max_samples: int = 64) -> gr.Blocks:
    """The demo's Gradio Blocks for a loaded generator `net` and its `tokenizer` (both in eval mode on
    `device`); `meta` is the generator checkpoint's meta dict (its `grid` [h, w] sets the sample size,
    its `class_names` label the class box, its `text_encoder` encodes a text-conditional generator's
    prompts). The buttons call `Actions`. Launch it with `serve`. Raises ValueError as `Actions` does.

    `max_pixels` bounds the uploaded image's H * W, `max_samples` the samples or completions per run.
    """
    actions = Actions(net, tokenizer, meta, device, max_pixels, max_samples)
    h, w = actions.grid
    f = tokenizer.cfg.f

    with gr.Blocks(analytics_enabled=False, title="SUNDAE demo") as app:
        conditions = ([f"{net.cfg.num_classes} classes"] if net.cfg.num_classes else []) + (
            [f"text prompts ({actions.text_encoder})"] if net.cfg.text_dim else [])
        gr.Markdown(f"## SUNDAE: step-unrolled denoising over VQ-GAN tokens\n"
                    f"{h}x{w} tokens of {f}x{f} pixels, {net.cfg.vocab_size} codes, "
                    + (" and ".join(conditions) or "unconditional"))
        with gr.Tab("Generate", id="generate"):
            with gr.Row():
                cond = _condition_controls(net, meta, cycle=True, prefix="gen")
                num = gr.Slider(1, max_samples, value=min(16, max_samples), step=1, label="Samples",
                                elem_id="gen-num")
                every = gr.Slider(1, 50, value=5, step=1, label="Redraw every N steps")
            schedule = _schedule_controls("gen")
            with gr.Row():
                run = gr.Button("Generate", variant="primary", elem_id="gen-run")
                stop = gr.Button("Stop", elem_id="gen-stop")
            status = gr.Markdown(elem_id="gen-status")
            grid = gr.Image(label="Samples", format="png", type="pil", interactive=False, elem_id="grid", height=480,
                            buttons=["download"])
            event = run.click(actions.generate, [*cond, num, every, *schedule], [grid, status],
                              concurrency_id="network")
            stop.click(None, cancels=[event])
        with gr.Tab("Inpaint", id="inpaint"):
            gr.Markdown("Upload an image, then paint the part to regenerate. A token cell is regenerated if any "
                        "of its pixels is painted; every other pixel stays as uploaded.")
            with gr.Row():
                # Uploads go through an image box, which reports files over the size limit in the page
                # (the editor's own upload does not), then into the editor.
                upload = gr.Image(type="filepath", sources=["upload", "clipboard"], format="png",
                                  label="1. Upload an image", elem_id="upload", scale=1, height=300)
                brush = gr.Brush(default_size=max(2, f), colors=[("#%02x%02x%02x" % REGENERATED, 0.6)],
                                 color_mode="fixed")
                editor = gr.ImageEditor(type="pil", sources=(), transforms=(), layers=False, format="png",
                                        label="2. Paint the region to regenerate", elem_id="editor", scale=2,
                                        brush=brush, eraser=gr.Eraser(default_size=max(2, f)), height=300)
            with gr.Row():
                icond = _condition_controls(net, meta, cycle=False, prefix="inp")
                inum = gr.Slider(1, max_samples, value=min(4, max_samples), step=1, label="Completions",
                                 elem_id="inp-num")
                dilate = gr.Slider(0, 4, value=0, step=1, label="Grow the painted cells by N cells",
                                   elem_id="inp-dilate")
            ischedule = _schedule_controls("inp")
            irun = gr.Button("Inpaint", variant="primary", elem_id="inp-run")
            istatus = gr.Markdown(elem_id="inp-status")
            with gr.Row():
                cells = gr.Image(label="Regenerated token cells", format="png", type="pil", interactive=False,
                                 elem_id="cells", scale=1, height=240)
                gallery = gr.Gallery(label="Completions", format="png", type="pil", columns=4, elem_id="completions",
                                     scale=3, interactive=False, height=240)
            upload.change(actions.load, upload, editor)  # an upload, a paste, or clearing the box
            irun.click(actions.inpaint, [editor, *icond, inum, dilate, *ischedule], [cells, gallery, istatus],
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
