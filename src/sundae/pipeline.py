"""`SundaePipeline`: a SUNDAE generator with its VQ-GAN tokenizer, the one place where the two are used together.

    from sundae import SundaePipeline
    pipe = SundaePipeline.from_pretrained("quickstart")            # a bundle, export, run folder or .pt
    images, steps, tokens = pipe(num=10, class_labels=range(10), seed=0)

Generation is the sampler of `sundae.sundae` (McKinney & Willcocks section 3.4) over a logits function built
here from the network and its condition (class labels, text features, classifier-free guidance), then the
tokenizer's decoder; inpainting is the same sampler with a keep-mask (section 3.5), outpainting an inpainting
of a grown canvas, and img2img the sampler started from an image's tokens, a share of them corrupted. Every
sample draws its noise from its own generator seeded `seed + i`, so sample i is the same whether it is drawn
alone (with its seed and its condition) or in any batch, and the batched sample -> decode loop lives here
once for the CLI, the demo, the quickstart, the evaluation protocol, the training loop's sample grids and the
benchmarks.
"""

from __future__ import annotations

import dataclasses
import numbers
import os
from pathlib import Path
from typing import Any, Iterable, Iterator, NamedTuple, Sequence

import torch
from PIL import Image
from torch import Tensor
from tqdm.auto import tqdm

from sundae.checkpoint import (bundle_info, check_pair, load_generator, load_tokenizer, resolve_checkpoint,
                               resolve_tokenizer, stored_sampler)
from sundae.hourglass import Hourglass
from sundae.images import image_to_tensor, outpaint_canvas, tensor_to_image
from sundae.sundae import (GuidanceScale, LogitsFn, SamplerConfig, corrupt_share, fill_masked, guidance_scales,
                           guided_logits_fn, sample, share_count, token_keep_mask)
from sundae.vqgan import VQGAN

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}  # the network's autocast dtype
Text = tuple[Tensor, Tensor, Tensor]  # a text encoder's (features `b n e`, mask `b n` bool, pooled `b e`)


class SundaeOutput(NamedTuple):
    """What a pipeline call returns: `images` (a list of PIL images, or `b c H W` float in [-1, 1] on the CPU
    for output_type "pt"), `steps` (`b` int64: sampler steps each sample took), `tokens` (`b h w` int64)."""

    images: list[Image.Image] | Tensor
    steps: Tensor
    tokens: Tensor


def class_logits_fn(net: torch.nn.Module, labels: Tensor | None, precision: str = "fp32", compile: bool = False,
                    guidance_scale: GuidanceScale = 1.0, steps: int = 1, text: Text | None = None) -> LogitsFn:
    """The sampler's logits function `fn(z, rows, step)` for `net`, conditioned on `labels` (`b` int64) and,
    for a text model, `text` (features `b n e`, mask `b n` bool, pooled `b e`: `sundae.text.TextEncoder.encode`).

    precision "bf16" or "fp16" runs the network under that autocast (fp16 for GPUs without bf16); the sampler
    draws from the logits in float32. compile wraps the network in `torch.compile(dynamic=True)`: the batch
    shrinks as samples finish. guidance_scale: classifier-free guidance (`sundae.sundae.guided_logits_fn`,
    Ho & Salimans 2022), a constant s or (start, end) linear over `steps` sampling steps; s = 1 (the default)
    is plain conditional sampling with one forward per step, any other scale batches the conditional and
    null-condition passes (twice the rows). The function holds no state: it serves any number of runs.
    Raises ValueError for an unknown precision, a non-finite scale, or guidance other than 1 for an
    unconditional network (it has no condition to guide by).
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    forward = torch.compile(net, dynamic=True) if compile else net
    device_type = next(net.parameters()).device.type
    guided = any(s != 1.0 for s in guidance_scales(guidance_scale, steps))
    if guided and not (getattr(net.cfg, "num_classes", 0) or getattr(net.cfg, "text_dim", 0)):
        raise ValueError(f"guidance scale {guidance_scale} needs a conditional generator (classes or text); this "
                         f"one is unconditional: drop --guidance-scale")

    def conditioned_fn(z: Tensor, rows: Tensor, drop: Tensor | None = None) -> Tensor:
        kwargs = {} if drop is None else {"drop": drop}
        if text is not None:
            kwargs["text"] = tuple(t[rows] for t in text)
        with torch.autocast(device_type, dtype=PRECISIONS[precision] or torch.bfloat16,
                            enabled=PRECISIONS[precision] is not None):
            return forward(z, None if labels is None else labels[rows], **kwargs)

    def logits_fn(z: Tensor, rows: Tensor, step: int) -> Tensor:
        return conditioned_fn(z, rows)
    return guided_logits_fn(conditioned_fn, guidance_scale, steps) if guided else logits_fn


INPAINT_PASSES = 2  # the default of `inpaint_images(passes=)`: see its docstring


def inpaint_images(net, tokenizer: VQGAN, image: Tensor, pixel_mask: Tensor, num: int, labels: Tensor | None,
                   generator: torch.Generator | Sequence[torch.Generator], dilate: int = 0, precision: str = "fp32",
                   compile: bool = False, guidance_scale: GuidanceScale = 1.0, text: Text | None = None,
                   sampler: SamplerConfig | None = None, passes: int = INPAINT_PASSES,
                   **overrides: Any) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """`num` completions of one image (`c H W` in [-1, 1], any H, W) where `pixel_mask` (`1 H W`, 1 =
    regenerate) is set (McKinney & Willcocks section 3.5: inpainting is the sampler with a keep-mask).

    The masked pixels are replaced by a fill computed from the visible ones (`fill_masked`) before the image
    is tokenized with the tokenizer's size policy (padded to multiples of f, `VQGAN.encode`), so the kept
    tokens and the completions are a function of the unmasked pixels only: the encoder's receptive field
    would otherwise carry what the mask hides into the kept tokens. Known tokens (`token_keep_mask`: no
    masked pixel in the cell, grown by `dilate` cells) are fixed; the decoded images are cropped back to
    H x W and every pixel outside the regenerated cells is copied from the input.
    `passes` (>= 1): each pass after the first encodes the previous pass's completion (its decoded cells
    with the input's pixels pasted back outside them) and samples the regenerated cells again around those
    kept tokens, which the fill's blur no longer disturbs; still blind to the masked pixels. Measured in
    `benchmarks/inpaint_leak.py` (RESULTS.md): a second pass lowers the completions' classifier-FID from 53
    to 39 on the quickstart, for twice the sampling.
    Completion i depends only on its own generator (with one per completion), not on `num`.
    `sampler` (default `SamplerConfig()`) with `overrides` (steps=, ...) sets the schedule;
    `generator` is one generator or one per completion. Returns (images `num c H W` in [-1, 1], tokens
    `num h w`, keep-mask `num h w` bool, the last pass's input tokens `num h w`), h = ceil(H / f),
    w = ceil(W / f). precision, compile, guidance_scale and text: see `class_logits_fn`.
    Raises ValueError for passes < 1.
    """
    if passes < 1:
        raise ValueError(f"passes must be >= 1, got {passes}")
    sampler = dataclasses.replace(sampler or SamplerConfig(), **overrides)
    f = tokenizer.cfg.f
    height, width = image.shape[-2:]
    device = tokenizer.last_layer.device
    x = image[None].to(device)
    pixel_mask = pixel_mask[None].to(device)
    keep = token_keep_mask(pixel_mask, f, dilate).expand(num, -1, -1)
    keep_px = keep.repeat_interleave(f, 1).repeat_interleave(f, 2)[:, None, :height, :width]
    init = tokenizer.encode(fill_masked(x, pixel_mask)).expand(num, -1, -1)
    fn = class_logits_fn(net, labels, precision, compile, guidance_scale, sampler.steps, text)
    for n in range(passes):
        z, _ = sample(fn, tuple(init.shape), net.cfg.codebook_size, sampler, init=init, keep=keep,
                      generator=generator, device=device)
        # One completion at a time, so that a completion does not depend on how many were asked for (batched
        # convolutions round differently by batch size).
        decoded = torch.cat([tokenizer.decode(z[i:i + 1], size=(height, width)) for i in range(num)])
        completions = torch.where(keep_px, x, decoded)
        if n + 1 < passes:
            init = torch.cat([tokenizer.encode(completions[i:i + 1]) for i in range(num)])
    return completions, z, keep, init


# ---- the pipeline ---------------------------------------------------------------------------------------

MAX_SEED = 2**64 - 1  # torch.Generator.manual_seed's range


class SundaePipeline:
    """A generator (`Hourglass`) with its tokenizer (`VQGAN`): sample, inpaint, img2img, outpaint, encode, decode.

    `meta` is the generator checkpoint's: `grid` (h, w tokens), `image_size` (H, W pixels, when the
    tokenizer padded the training images), `class_names`, `text_encoder`. `precision` ("fp32", or "bf16" /
    "fp16": the network under that autocast, sampling in float32) and `compile` (`torch.compile` the
    network) apply to every call; `sampler` is the calls' default `SamplerConfig` (a bundle stores one; else
    the paper's FFHQ256 setting). `source` and `tokenizer_path` name the files, for messages. Build one with
    `from_pretrained`, or from modules you hold (the training loop does). Raises ValueError for an unknown
    precision.
    """

    def __init__(self, generator: Hourglass, tokenizer: VQGAN, meta: dict[str, Any] | None = None,
                 precision: str = "fp32", compile: bool = False, source: str | None = None,
                 tokenizer_path: str | None = None, sampler: SamplerConfig | None = None):
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        self.generator, self.tokenizer, self.meta = generator, tokenizer, dict(meta or {})
        self.precision, self.compile, self.source = precision, compile, source
        self.tokenizer_path = tokenizer_path
        self.sampler = sampler or SamplerConfig()  # the default of every call: a bundle's, or the paper's
        self._encoder = None
        f = tokenizer.cfg.f
        side = tokenizer.cfg.resolution // f
        self.grid = tuple(self.meta.get("grid") or (side, side))
        size = self.meta.get("image_size")
        self.image_size = tuple(size) if size else (self.grid[0] * f, self.grid[1] * f)

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | torch.device = "cpu", tokenizer: str | Path | None = None,
                        precision: str = "fp32", compile: bool = False, ema: bool = True) -> "SundaePipeline":
        """Load a generator and the tokenizer it was trained with from `path`: a bundle or export folder
        (`sundae export`), a run folder of `sundae train`, a quickstart output folder, or a `.pt` checkpoint.
        `tokenizer` overrides the one the generator names. EMA weights by default, eval mode, on `device`.
        Raises FileNotFoundError or ValueError naming the file: not a generator, a tokenizer that cannot be
        found, or one other than the generator was trained with (sha256 or codebook size)."""
        path = resolve_checkpoint(path, "generator")
        net, meta = load_generator(path, device, ema)
        tokenizer_path = resolve_tokenizer(path, meta, tokenizer)
        vq = load_tokenizer(tokenizer_path, device, ema)  # first: a wrong kind of file says so
        check_pair(net, meta, vq, path, tokenizer_path)
        # The default sampler: a bundle's, else the one the run recorded (the quickstart's tuned settings).
        sampler = stored_sampler(bundle_info(path)) or stored_sampler(meta)
        return cls(net, vq, meta, precision, compile, source=str(path), tokenizer_path=str(tokenizer_path),
                   sampler=sampler)

    @property
    def device(self) -> torch.device:
        return next(self.generator.parameters()).device

    @property
    def num_classes(self) -> int:
        return int(self.generator.cfg.num_classes)

    @property
    def class_names(self) -> list[str]:
        names = list(self.meta.get("class_names") or [])
        return names if len(names) == self.num_classes else [str(i) for i in range(self.num_classes)]

    # ---- conditions ----

    def labels(self, class_labels: int | str | Iterable[int | str] | Tensor | None, num: int) -> Tensor | None:
        """Class labels for `num` samples (`num` int64 on the device), cycled: None cycles through every
        class; an int or a class name (`meta["class_names"]`) or a sequence of them. Raises ValueError for an
        unconditional generator given labels, or a label outside 0..num_classes-1 or an unknown name."""
        if self.num_classes == 0:
            if class_labels is not None:
                what = "text-conditional, pass prompt=" if self.generator.cfg.text_dim else "unconditional"
                raise ValueError(f"class labels given, but the generator has no classes: it is {what}")
            return None
        if class_labels is None:
            values = list(range(self.num_classes))
        else:
            if isinstance(class_labels, (int, str)) or (isinstance(class_labels, Tensor) and class_labels.ndim == 0):
                class_labels = [class_labels]
            values = [self._class_index(v) for v in (class_labels.tolist() if isinstance(class_labels, Tensor)
                                                    else class_labels)]
            if not values:
                raise ValueError("class labels: an empty list")
        return torch.tensor(values, device=self.device).repeat(-(-num // len(values)))[:num]

    def _class_index(self, value: int | str) -> int:
        if isinstance(value, str):
            if value in self.class_names:
                return self.class_names.index(value)
            try:
                value = int(value)
            except ValueError:
                raise ValueError(f"class {value!r}: class labels are integers or the names of the trained classes "
                                 f"({', '.join(self.class_names)})") from None
        if isinstance(value, bool) or int(value) != value or not 0 <= value < self.num_classes:
            raise ValueError(f"class {value} is outside the trained classes 0..{self.num_classes - 1}")
        return int(value)

    def text(self, prompt: str | Sequence[str] | None, num: int) -> Text | None:
        """A text model's conditioning of `num` samples, the prompts cycled (None for other models).
        Raises ValueError when a text model gets no prompt or another model gets one."""
        if not self.generator.cfg.text_dim:
            if prompt is not None:
                raise ValueError(f"a prompt was given, but {self.source or 'the generator'} is not text-conditional")
            return None
        if prompt is None:
            raise ValueError(f"{self.source or 'the generator'} is text-conditional: pass a prompt (\"\" is the "
                             f"empty caption)")
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts:
            raise ValueError("prompt: an empty list")
        if self._encoder is None:
            if not self.meta.get("text_encoder"):
                raise ValueError("this text-conditional generator names no text encoder in its checkpoint")
            from sundae.text import load_text_encoder
            self._encoder = load_text_encoder(self.meta["text_encoder"], str(self.device))
        return self._encoder.encode([prompts[i % len(prompts)] for i in range(num)])

    def logits_fn(self, labels: Tensor | None = None, text: Text | None = None, guidance_scale: GuidanceScale = 1.0,
                  steps: int = 1) -> LogitsFn:
        """`class_logits_fn` with this pipeline's network, precision and compile setting."""
        return class_logits_fn(self.generator, labels, self.precision, self.compile, guidance_scale, steps, text)

    # ---- generation ----

    @staticmethod
    def seeds(seed: int | Sequence[int], num: int) -> list[int]:
        """Per-sample seeds: `seed + i` for an int, or the list itself (its length must be `num`).

        Raises ValueError for a wrong count, or a seed outside [0, 2**64 - 1], the range a torch.Generator
        takes (it would wrap -1 onto 2**64 - 1 and refuse larger values with an overflow).
        """
        if isinstance(seed, (int,)) and not isinstance(seed, bool):
            seeds = [seed + i for i in range(num)]
        else:
            seeds = [int(s) for s in seed]
            if len(seeds) != num:
                raise ValueError(f"{len(seeds)} seeds for {num} samples")
        if seeds and not 0 <= min(seeds) <= max(seeds) <= MAX_SEED:
            raise ValueError(f"seeds must lie in [0, 2**64 - 1], got {min(seeds) if min(seeds) < 0 else max(seeds)}"
                             + (f" (seed + i for {num} samples)" if isinstance(seed, int) and num > 1 else ""))
        return seeds

    def generate(self, num: int = 1, class_labels: Any = None, prompt: str | Sequence[str] | None = None,
                 guidance_scale: GuidanceScale = 1.0, sampler: SamplerConfig | None = None,
                 seed: int | Sequence[int] = 0, batch_size: int = 64, progress: bool = True,
                 desc: str = "sample",
                 text_features: Text | None = None) -> Iterator[tuple[int, Tensor, Tensor, Tensor]]:
        """The batched sample -> decode loop, one batch at a time: yields (index of the batch's first sample,
        images `b c H W` float in [-1, 1] on the CPU, steps taken `b` int64, tokens `b h w` int64 on the CPU).
        Arguments as for `__call__`; `text_features` (a text encoder's output for the `num` samples) can stand
        in for `prompt`. Memory is bounded by `batch_size`, whatever `num`. The progress bar (stderr; off with
        `progress=False`, TQDM_DISABLE or without a terminal) counts sampler steps, T per batch."""
        if num < 1 or batch_size < 1:
            raise ValueError(f"num and batch size must be >= 1, got {num} and {batch_size}")
        sampler = sampler or self.sampler
        seeds = self.seeds(seed, num)
        labels = self.labels(class_labels, num)
        text = text_features if text_features is not None else self.text(prompt, num)
        guidance_scales(guidance_scale, sampler.steps)  # checked before any work
        device = self.device
        starts = range(0, num, batch_size)
        # The bar counts sampler steps over all batches (T per batch), so that one big image shows progress.
        bar = tqdm(total=len(starts) * sampler.steps, desc=desc, unit="step", dynamic_ncols=True,
                   disable=not progress or bool(os.environ.get("TQDM_DISABLE")) or None)
        with torch.inference_mode(), bar:
            for b, start in enumerate(starts):
                part = slice(start, min(start + batch_size, num))
                fn = self.logits_fn(None if labels is None else labels[part],
                                    None if text is None else tuple(t[part] for t in text), guidance_scale,
                                    sampler.steps)
                gens = [torch.Generator(device).manual_seed(s) for s in seeds[part]]
                done = b * sampler.steps  # steps of the batches before this one
                z, taken = sample(fn, (len(gens), *self.grid), self.generator.cfg.codebook_size, sampler,
                                  generator=gens, device=device, progress=lambda n, _: bar.update(done + n - bar.n))
                bar.update(done + sampler.steps - bar.n)  # a batch that stopped early skips its last steps
                bar.set_postfix_str(f"{part.stop}/{num} images", refresh=False)
                # One image at a time: batched convolutions round differently by batch size (about 1e-5 on
                # the CPU), which would make an image depend on its batchmates.
                images = torch.cat([self.decode(z[i:i + 1]).float().cpu() for i in range(len(z))])
                yield start, images, taken.cpu(), z.cpu()

    def __call__(self, num: int = 1, class_labels: Any = None, prompt: str | Sequence[str] | None = None,
                 guidance_scale: GuidanceScale = 1.0, sampler: SamplerConfig | None = None,
                 seed: int | Sequence[int] = 0, batch_size: int = 64, output_type: str = "pil",
                 progress: bool = True) -> SundaeOutput:
        """Generate `num` images.

        class_labels: for a class-conditional generator, an int, a class name or a sequence of them, cycled
        over the samples (None: every class in turn). prompt: for a text model, a string or a list cycled over
        the samples. guidance_scale: classifier-free guidance, a number or (start, end) over the steps
        (1 = none). sampler: `SamplerConfig` (default: the pipeline's `sampler`). seed: sample i uses
        seed + i (or seed[i] for a list), so any one image can be regenerated alone, whatever `num` and
        `batch_size` were. output_type: "pil" (a list of PIL images) or "pt" (`b c H W` float in [-1, 1]).
        Returns `SundaeOutput(images, steps, tokens)`. Raises ValueError for a condition the generator
        cannot take, an invalid sampler setting or scale, or an unknown output_type.
        """
        if output_type not in ("pil", "pt"):
            raise ValueError(f"output_type must be 'pil' or 'pt', got {output_type!r}")
        parts = list(self.generate(num, class_labels, prompt, guidance_scale, sampler, seed, batch_size, progress))
        images = torch.cat([p[1] for p in parts])
        return SundaeOutput(self._output(images, output_type), torch.cat([p[2] for p in parts]),
                            torch.cat([p[3] for p in parts]))

    def inpaint(self, image: Tensor | Image.Image, mask: Tensor, num: int = 4, class_labels: Any = None,
                prompt: str | Sequence[str] | None = None, guidance_scale: GuidanceScale = 1.0,
                sampler: SamplerConfig | None = None, seed: int | Sequence[int] = 0, dilate: int = 0,
                output_type: str = "pil", passes: int = INPAINT_PASSES) -> SundaeOutput:
        """`num` completions of `image` (`c H W` float in [-1, 1], or a PIL image) where `mask` (`1 H W` or
        `H W`, 1 = regenerate) is set; pixels outside the regenerated token cells are the input's. Conditions,
        sampler and seeds as for `__call__`; a class-conditional generator needs `class_labels`. Returns
        `SundaeOutput(images, steps, tokens)` (steps: T x passes for every completion). The masked pixels never reach
        the model, and `passes` (default 2) re-encodes each completion and samples it again: see
        `inpaint_images`. Raises ValueError for a mask that is not a tensor or of another size, an image
        that is not `c H W`, num < 1, dilate < 0, passes < 1 (checked by `inpaint_images`), or a condition the generator cannot take."""
        image = self._image(image, num, class_labels)
        if not isinstance(mask, Tensor) or mask.ndim not in (2, 3):
            raise ValueError(f"the mask must be a tensor `1 H W` or `H W` (nonzero = regenerate), got "
                             f"{type(mask).__name__}; `sundae.images.load_mask(path, (H, W))` reads a mask file")
        mask = mask if mask.ndim == 3 else mask[None]
        if tuple(mask.shape[-2:]) != tuple(image.shape[-2:]):
            raise ValueError(f"the mask is {mask.shape[-2]}x{mask.shape[-1]} (HxW), the image "
                             f"{image.shape[-2]}x{image.shape[-1]}: they must be the same size")
        if dilate < 0:
            raise ValueError(f"dilate must be >= 0 token cells, got {dilate}")
        sampler = sampler or self.sampler
        labels, text = self.labels(class_labels, num), self.text(prompt, num)
        gens = [torch.Generator(self.device).manual_seed(s) for s in self.seeds(seed, num)]
        with torch.inference_mode():
            images, z, _, _ = inpaint_images(self.generator, self.tokenizer, image, mask.float(), num, labels, gens,
                                             dilate, self.precision, self.compile, guidance_scale, text, sampler,
                                             passes)
        return SundaeOutput(self._output(images.float().cpu(), output_type),
                            torch.full((num,), sampler.steps * passes, dtype=torch.long), z.cpu())

    def img2img(self, image: Tensor | Image.Image, strength: float, num: int = 4, class_labels: Any = None,
                prompt: str | Sequence[str] | None = None, guidance_scale: GuidanceScale = 1.0,
                sampler: SamplerConfig | None = None, seed: int | Sequence[int] = 0,
                output_type: str = "pil") -> SundaeOutput:
        """`num` variations of `image` (`c H W` float in [-1, 1] or a PIL image, any H, W): SUNDAE refines any
        token state, so encode it, corrupt a share `strength` of its tokens and sample from there.

        Exactly k = round(strength * h * w) positions (halves up) of each variation take a token drawn
        uniformly from the codebook, chosen by the variation's own generator (`sundae.sundae.corrupt_share`:
        the training corruption at a fixed rate); the sampler then runs the last round(strength * T) steps
        (at least 1 when strength > 0) of `sampler`'s T-step schedule (`SamplerConfig.tail`) over every
        position, as a diffusion model's img2img strength sets both its noise and its steps. strength 0:
        no draw changes anything and no step runs, the images are the reconstruction (the tokens are
        `encode(image)`'s); strength 1: a uniform start and all T steps, nothing of the image is left.
        Variation i depends only on its seed (seed + i), not on `num`. Conditions and seeds as for
        `__call__`; a class-conditional generator needs `class_labels`. Returns `SundaeOutput(images `num c H
        W`, steps run, tokens `num h w`)`. Raises ValueError for a strength outside [0, 1], an image that is
        not `c H W`, num < 1, or a condition the generator cannot take."""
        image = self._image(image, num, class_labels)
        if isinstance(strength, bool) or not isinstance(strength, numbers.Real) or not 0 <= strength <= 1:
            raise ValueError(f"strength must be a number in [0, 1], got {strength!r}")
        sampler = sampler or self.sampler
        labels, text = self.labels(class_labels, num), self.text(prompt, num)
        gens = [torch.Generator(self.device).manual_seed(s) for s in self.seeds(seed, num)]
        steps = 0 if strength == 0 else max(1, share_count(strength, sampler.steps))
        with torch.inference_mode():
            tokens = self.tokenizer.encode(image[None].to(self.device)).expand(num, -1, -1)
            start, _ = corrupt_share(tokens, strength, self.generator.cfg.codebook_size, gens)
            taken = torch.zeros(num, dtype=torch.long)
            if steps:
                fn = self.logits_fn(labels, text, guidance_scale, steps)
                start, taken = sample(fn, tuple(start.shape), self.generator.cfg.codebook_size, sampler.tail(steps),
                                      init=start, generator=gens, device=self.device)
            images = torch.cat([self.decode(start[i:i + 1], tuple(image.shape[-2:])) for i in range(num)])
        return SundaeOutput(self._output(images.float().cpu(), output_type), taken.cpu(), start.cpu())

    def outpaint(self, image: Tensor | Image.Image, extend: tuple[int, int, int, int], num: int = 4,
                 class_labels: Any = None, prompt: str | Sequence[str] | None = None,
                 guidance_scale: GuidanceScale = 1.0, sampler: SamplerConfig | None = None,
                 seed: int | Sequence[int] = 0, output_type: str = "pil", passes: int = INPAINT_PASSES,
                 max_pixels: int | None = None) -> SundaeOutput:
        """`num` completions of `image` (`c H W` in [-1, 1] or a PIL image) grown by `extend` = (left, top,
        right, bottom) pixels: the new border is generated by `inpaint` (its mask is the border,
        `sundae.images.outpaint_canvas`) and the image is kept exactly. Token cells lie on the grown canvas
        from its top-left corner, so where an extent is not a multiple of f the cells along the image's
        edge hold both new and original pixels: they are regenerated, and the original pixels are pasted
        back over them. Returns `SundaeOutput(images `num c H' W'`, steps, tokens)`, H' = top + H + bottom,
        W' = left + W + right. Raises ValueError for an extent that is not four integers >= 0 (not all 0),
        a canvas over `max_pixels` pixels (None: no limit), or what `inpaint` raises."""
        image = self._image(image, num, class_labels)
        canvas, mask = outpaint_canvas(image, extend, max_pixels)
        out = self.inpaint(canvas, mask, num, class_labels, prompt, guidance_scale, sampler, seed,
                           output_type="pt", passes=passes)
        left, top = extend[0], extend[1]
        images = out.images.clone()
        images[:, :, top:top + image.shape[1], left:left + image.shape[2]] = image  # exact, whatever the cells
        return SundaeOutput(self._output(images, output_type), out.steps, out.tokens)

    def _pil(self, image: Image.Image) -> Tensor:
        """A PIL image -> `c H W` float in [-1, 1] with the tokenizer's channels (grey or RGB)."""
        return image_to_tensor(image.convert("L" if self.tokenizer.cfg.in_channels == 1 else "RGB"))

    def _image(self, image: Tensor | Image.Image, num: int, class_labels: Any) -> Tensor:
        """A PIL image or tensor -> `c H W` float for the tokenizer's channels; the checks `inpaint` makes."""
        if isinstance(image, Image.Image):
            image = self._pil(image)
        if not isinstance(image, Tensor) or image.ndim != 3:
            raise ValueError(f"the image must be one `c H W` tensor, got {getattr(image, 'shape', type(image))}")
        if num < 1:
            raise ValueError(f"num must be >= 1, got {num}")
        if self.num_classes and class_labels is None:
            raise ValueError(f"{self.source or 'the generator'} is class-conditional: pass class labels "
                             f"(0..{self.num_classes - 1})")
        return image

    # ---- the tokenizer ----

    def encode(self, images: Tensor | Image.Image | Sequence[Image.Image]) -> Tensor:
        """`b c H W` float in [-1, 1] (any H, W), or PIL images (one, or a list of one size, converted to the
        tokenizer's channels) -> tokens `b h w` int64, h = ceil(H / f), w = ceil(W / f).
        Raises ValueError for a list of PIL images of different sizes."""
        if isinstance(images, Image.Image):
            images = [images]
        if isinstance(images, (list, tuple)):
            if len({image.size for image in images}) > 1:
                raise ValueError(f"encode takes PIL images of one size, got {sorted({i.size for i in images})}")
            images = torch.stack([self._pil(image) for image in images])
        with torch.inference_mode():
            return self.tokenizer.encode(images.to(self.device))

    def decode(self, tokens: Tensor, size: tuple[int, int] | None = None) -> Tensor:
        """Tokens `b h w` int64 -> images `b c H W` float in [-1, 1] on the device, cropped to `size` (H, W
        pixels; default the generator's training image size)."""
        with torch.inference_mode():
            return self.tokenizer.decode(tokens.to(self.device), size=size or self.image_size)

    def reconstruct(self, images: Tensor) -> Tensor:
        """Round trip through the tokenizer: `b c H W` in [-1, 1] -> the same shape, decoded (on the CPU)."""
        with torch.inference_mode():
            return self.tokenizer.decode(self.encode(images), size=tuple(images.shape[-2:])).float().cpu()

    @staticmethod
    def _output(images: Tensor, output_type: str) -> list[Image.Image] | Tensor:
        if output_type == "pt":
            return images
        if output_type != "pil":
            raise ValueError(f"output_type must be 'pil' or 'pt', got {output_type!r}")
        return [tensor_to_image(x) for x in images]
