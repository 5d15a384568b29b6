"""Verbs that edit an image with a trained generator: img2img (refine a partly corrupted encoding) and outpaint
(grow the canvas, generate the border). Each is parsing, one `SundaePipeline` call, and the output policy of
`sundae inpaint` (output_NN.png and figure.png in --out)."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch

from sundae.cli.args import UsageError, add_common, pixels, positive, sampler_from_args
from sundae.cli.outputs import claim_outputs, clear_outputs
from sundae.cli.sampling import add_sampling_args, class_values, load_pipeline, prompts
from sundae.images import load_image, save_grid, save_image
from sundae.pipeline import INPAINT_PASSES, SundaePipeline

MAX_CANVAS = 2048 * 2048  # outpaint's default --max-pixels, the demo's upload limit


def strength(text: str) -> float:
    """--strength: a number in [0, 1]."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 <= value <= 1:  # also NaN
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text!r}")
    return value


def extent(text: str) -> tuple[int, int, int, int]:
    """--extend "L,T,R,B": four integers >= 0, pixels added on the left, top, right and bottom."""
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 4 or min(values) < 0:
        raise argparse.ArgumentTypeError(f"expected four integers >= 0 LEFT,TOP,RIGHT,BOTTOM (pixels), got {text!r}")
    if not any(values):
        raise argparse.ArgumentTypeError(f"{text!r} adds no pixels: give at least one side a size")
    return values


def _prepared(args: argparse.Namespace, outputs: list[str]) -> tuple[list[Path], SundaePipeline, dict]:
    """Claim --out, load the pipeline and read the image and the condition: what both verbs share."""
    old = claim_outputs(args.out, outputs, args.overwrite)
    pipe = load_pipeline(args)
    sampler = sampler_from_args(args, base=pipe.sampler)
    if pipe.num_classes and args.class_ is None:
        raise UsageError(f"{args.generator} is class-conditional: pass --class (0..{pipe.num_classes - 1})")
    labels, texts = class_values(args.class_, pipe), prompts(args, pipe)
    image = load_image(args.image, pipe.tokenizer.cfg.in_channels)
    return old, pipe, dict(image=image, num=args.num, class_labels=labels, prompt=texts,
                           guidance_scale=tuple(args.guidance_scale), sampler=sampler, seed=args.seed,
                           output_type="pt")


def cmd_img2img(args: argparse.Namespace) -> None:
    old, pipe, call = _prepared(args, ["figure.png", "output_*.png"])
    clear_outputs(old)
    result = pipe.img2img(strength=args.strength, **call)
    out = Path(args.out)
    for i, img in enumerate(result.images):
        save_image(img, out / f"output_{i:02d}.png")
    save_grid(torch.cat([call["image"][None], result.images]), out / "figure.png", nrow=args.num + 1)
    steps = int(result.steps.max())
    print(f"{args.num} variation{'s' * (args.num != 1)} at strength {args.strength} (at most {steps} sampler "
          f"step{'s' * (steps != 1)} run) written to {out}")


def cmd_outpaint(args: argparse.Namespace) -> None:
    old, pipe, call = _prepared(args, ["figure.png", "output_*.png"])
    if args.passes < 1:
        raise UsageError(f"--passes must be >= 1, got {args.passes}")
    image = call["image"]
    left, top, right, bottom = args.extend
    height, width = image.shape[1] + top + bottom, image.shape[2] + left + right
    if height * width > args.max_pixels:
        raise UsageError(f"--extend {','.join(map(str, args.extend))} grows {args.image} to {width}x{height} = "
                         f"{height * width} pixels; the limit is {args.max_pixels} (--max-pixels)")
    clear_outputs(old)
    result = pipe.outpaint(extend=args.extend, passes=args.passes, **call)
    out = Path(args.out)
    for i, img in enumerate(result.images):
        save_image(img, out / f"output_{i:02d}.png")
    shown = torch.ones_like(result.images[0])  # the input on a white canvas: the border is what is generated
    shown[:, top:top + image.shape[1], left:left + image.shape[2]] = image
    save_grid(torch.cat([shown[None], result.images]), out / "figure.png", nrow=args.num + 1)
    print(f"{args.num} outpainting{'s' * (args.num != 1)} of {width}x{height} pixels written to {out}")


def add_parsers(sub: argparse._SubParsersAction) -> None:
    for verb, text in (("img2img", "redraw an image: corrupt a share of its tokens and sample from there"),
                       ("outpaint", "grow an image's canvas and generate the new border, the image kept exactly")):
        p = sub.add_parser(verb, help=text)
        add_sampling_args(p)
        p.add_argument("--image", required=True, help="the image file to start from (any size; PNG, JPEG, ...)")
        p.add_argument("--num", type=positive, default=4, help="number of images (default 4)")
        p.add_argument("--class", dest="class_", help="class label or class name for a class-conditional "
                       "generator (comma-separated: cycled over the images)")
        p.add_argument("--prompt", action="append", default=[], help="text-conditional generators: the caption "
                       "(repeat the flag for several, cycled over the images)")
        p.add_argument("--seed", type=int, default=0, help="image i uses seed + i, so any one can be redrawn alone")
        p.add_argument("--out", required=True, help="folder: output_NN.png and figure.png (the input, then the "
                       "outputs)")
        p.add_argument("--overwrite", action="store_true", help="replace the outputs of an earlier run in OUT")
        add_common(p)

    p = sub.choices["img2img"]
    p.add_argument("--strength", type=strength, required=True, help="share of the image's tokens replaced by "
                   "random codes, in [0, 1], and of the sampler's steps run (the last ones of its schedule): 0 "
                   "gives the reconstruction, 1 ignores the image")
    p.set_defaults(func=cmd_img2img)

    p = sub.choices["outpaint"]
    p.add_argument("--extend", type=extent, required=True, help="pixels to add: LEFT,TOP,RIGHT,BOTTOM (e.g. "
                   "0,0,32,0 widens to the right); the image's pixels are kept exactly")
    p.add_argument("--passes", type=int, default=INPAINT_PASSES, help="sampling passes, as for `sundae inpaint` "
                   f"(default {INPAINT_PASSES})")
    p.add_argument("--max-pixels", type=pixels, default=MAX_CANVAS, help="largest grown canvas, in pixels: a "
                   "count or HxW (default 2048x2048)")
    p.set_defaults(func=cmd_outpaint)
