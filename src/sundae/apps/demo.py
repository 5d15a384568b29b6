"""`sundae demo`: a local Gradio web app to watch the SUNDAE sampler denoise, inpaint with a brush, redraw an
image (img2img) and grow its canvas (outpaint).

A thin client of one `sundae.pipeline.SundaePipeline`, in four tabs. *Generate*: the sampler of
`sundae.sundae.sample` (McKinney & Willcocks section 3.4) over the pipeline's logits function, the image grid
redrawn every few steps while it runs, and the steps each sample actually took (early stop); sample i draws
from its own generator seeded seed + i, so the grid holds exactly the images of `pipe(num, class_labels,
seed=seed, sampler=...)`. *Inpaint*: upload an image, paint the region to regenerate, get several completions
(section 3.5, `SundaePipeline.inpaint`); pixels outside the regenerated token cells are the input's.
*Image to image*: `SundaePipeline.img2img` at a strength (the share of tokens corrupted and of the sampler's
steps run). *Outpaint*: `SundaePipeline.outpaint` by four extents, the upload's pixels kept exactly.

The inputs (conditioning, sampler schedule, uploads) and their checks live in `sundae.apps.demo_inputs`.
Nothing here samples on its own: live previews come from wrapping the logits function, which sees the
current tokens `z` (`b' h w`), the rows still in the batch and the step at every step. Bad input becomes a
message in the page (`gr.Error`), never a traceback. Gradio is an optional dependency (`pip install -e
".[demo]"`); analytics are off and the page loads nothing from outside the machine.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from typing import Any, Iterator

os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"  # before gradio is imported: no telemetry, no phoning home

import gradio as gr
import numpy as np
import torch
from PIL import Image

from sundae.apps.demo_inputs import (ALL_CLASSES, REGENERATED, SAMPLER_INPUTS, _condition,  # noqa: F401 (API)
                                     _condition_controls, _editor_image_and_mask, _editor_paths, _fail, _grid,
                                     _read_upload, _sampler, _sampler_controls, _seed, _upload_path, sampler_values,
                                     upload_limit)
from sundae.images import image_to_tensor, tensor_to_image
from sundae.io import error_line
from sundae.pipeline import SundaePipeline
from sundae.sundae import LogitsFn, SamplerConfig, sample, share_count, token_keep_mask

# Small images are a few dozen pixels: scale them up to the panel, without blurring.
CSS = ("#grid img, #cells img, #upload img { width: 100%; height: 100%; object-fit: contain; }\n"
       "#grid img, #cells img, #upload img, #completions img { image-rendering: pixelated; }")


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
        image = _read_upload(path, self.pipe.tokenizer.cfg.in_channels, self.max_pixels)
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

    def _edit_inputs(self, path: str | None, values: tuple, count: int) -> tuple:
        """(upload path, (*conditioning, num, *`count` values, seed, *sampler inputs)) -> (image `c H W`,
        num, the `count` values, class label, prompts, guidance scale, seed, sampler), checked."""
        n = len(SAMPLER_INPUTS)
        cond, (num, *rest, seed), sampler = values[:-n - count - 2], values[-n - count - 2:-n], _sampler(values[-n:])
        num = self._count(num, "images")
        image = image_to_tensor(_read_upload(path, self.pipe.tokenizer.cfg.in_channels, self.max_pixels))
        label, prompts, scale = _condition(self.pipe, cond)
        return image, num, rest, label, prompts, scale, _seed(seed, num), sampler

    def img2img(self, path: str | None, *values) -> tuple[list[Image.Image], str]:
        """(upload path, *conditioning, images, strength, seed, *sampler inputs) -> (`pipe.img2img`'s images,
        status text). Conditioning: see the class docstring; a class-conditional generator needs a class."""
        image, num, (strength,), label, prompts, scale, seed, sampler = self._edit_inputs(path, values, 1)
        if strength is None:
            raise _fail("strength is empty: enter a number in [0, 1]")
        start = time.time()
        try:
            out = self.pipe.img2img(image, float(strength), num, label, prompts, scale, sampler, seed)
        except (ValueError, RuntimeError) as err:  # a strength outside [0, 1], a size the networks cannot take
            raise _fail(f"cannot redraw this {image.shape[2]}x{image.shape[1]} image: {error_line(err)}") from None
        cells = out.tokens[0].numel()
        return out.images, (f"{num} images in {time.time() - start:.1f} s: {share_count(strength, cells)} of "
                            f"{cells} tokens replaced by random codes in each, then the last "
                            f"{int(out.steps.max())} of {sampler.steps} sampler steps")

    def outpaint(self, path: str | None, *values) -> tuple[list[Image.Image], str]:
        """(upload path, *conditioning, images, left, top, right, bottom, seed, *sampler inputs) ->
        (`pipe.outpaint`'s images, status text); the grown canvas is limited to `max_pixels`."""
        image, num, extend, label, prompts, scale, seed, sampler = self._edit_inputs(path, values, 4)
        if any(v is None for v in extend):
            raise _fail("an extent is empty: enter the pixels to add on each side (0 for none)")
        start = time.time()
        try:
            out = self.pipe.outpaint(image, tuple(int(v) if float(v).is_integer() else v for v in extend), num,
                                     label, prompts, scale, sampler, seed, max_pixels=self.max_pixels)
        except (ValueError, RuntimeError) as err:
            raise _fail(f"cannot outpaint this {image.shape[2]}x{image.shape[1]} image: {error_line(err)}") from None
        width, height = out.images[0].size
        return out.images, (f"{num} images of {width}x{height} pixels in {time.time() - start:.1f} s; the "
                            f"upload's pixels are kept exactly")


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
        for tab, prefix, action, text in (
                ("Image to image", "i2i", actions.img2img, "Upload an image: a share of its tokens (the strength) "
                 "is replaced by random codes and the sampler runs that share of its steps from there. Strength 0 "
                 "gives the tokenizer's reconstruction, 1 ignores the image."),
                ("Outpaint", "out", actions.outpaint, "Upload an image and choose how many pixels to add on each "
                 "side: the new border is generated (as an inpainting), the image's pixels are kept exactly.")):
            with gr.Tab(tab, id=prefix):
                gr.Markdown(text)
                with gr.Row():
                    box = gr.Image(type="filepath", sources=["upload", "clipboard"], format="png", height=240,
                                   label="Upload an image", elem_id=f"{prefix}-upload", scale=1)
                    box.preprocess = _upload_path  # our checks open the file, not Gradio
                    out = gr.Gallery(label="Images", format="png", type="pil", columns=4, elem_id=f"{prefix}-images",
                                     scale=3, interactive=False, height=240)
                with gr.Row():
                    econd = _condition_controls(pipe, cycle=False, prefix=prefix)
                    enum = gr.Slider(1, max_samples, value=min(4, max_samples), step=1, precision=0, label="Images",
                                     elem_id=f"{prefix}-num")
                    if prefix == "i2i":
                        extra = [gr.Slider(0.0, 1.0, value=0.5, step=0.01, label="Strength", elem_id="i2i-strength")]
                    else:
                        extra = [gr.Number(value, precision=0, label=f"{side} (pixels)", elem_id=f"out-{side.lower()}")
                                 for side, value in (("Left", 0), ("Top", 0), ("Right", 4 * f), ("Bottom", 0))]
                eseed, *esampler = _sampler_controls(pipe.sampler, prefix)
                erun = gr.Button(tab, variant="primary", elem_id=f"{prefix}-run")
                estatus = gr.Markdown(elem_id=f"{prefix}-status")
                erun.click(action, [box, *econd, enum, *extra, eseed, *esampler], [out, estatus],
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
