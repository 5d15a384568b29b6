"""Verbs that use a trained generator with its tokenizer: sample, inpaint, export, demo. Each is parsing, one
`SundaePipeline` call, and the output policy."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from sundae.checkpoint import export, export_bundle, load_checkpoint, resolve_checkpoint
from sundae.cli.args import (GENERATOR_HELP, TOKENIZER_HELP, UsageError, add_common, add_debug, add_guidance,
                             add_precision, add_sampler, check_guidance, pixels, port, positive, sampler_from_args)
from sundae.cli.outputs import claim_outputs, clear_outputs
from sundae.images import check_text, load_image, load_mask, save_grid, save_image
from sundae.io import atomic_write, log
from sundae.pipeline import INPAINT_PASSES, SundaePipeline
from sundae.vqgan import token_grid


def load_pipeline(args: argparse.Namespace) -> SundaePipeline:
    """The --generator (any kind: see GENERATOR_HELP) with --tokenizer or the one it was trained with, and
    the --guidance-scale checked against it."""
    pipe = SundaePipeline.from_pretrained(args.generator, args.device, args.tokenizer,
                                          getattr(args, "precision", "fp32"), getattr(args, "compile", False))
    if hasattr(args, "guidance_scale"):
        cfg = pipe.generator.cfg
        check_guidance(args.guidance_scale, bool(cfg.num_classes or cfg.text_dim), args.generator)
    return pipe


def class_values(text: str | None, pipe: SundaePipeline) -> list[str] | None:
    """--class "1,3" or "Trouser,Bag" -> the labels to cycle over (None: every class), checked by the pipeline
    (`SundaePipeline.labels`); raises UsageError in the command line's words."""
    cfg = pipe.generator.cfg
    if cfg.num_classes == 0:
        if text is not None and cfg.text_dim:
            raise UsageError("--class given, but the generator has no classes: it is text-conditional, use --prompt")
        if text is not None:
            raise UsageError("--class given, but the generator is unconditional")
        return None
    if text is None:
        return None
    values = [item.strip() for item in text.split(",")]
    try:
        pipe.labels(values, len(values))
    except ValueError as err:  # "class 7 is outside ..." -> "--class 7 is outside ..."
        raise UsageError(f"--{err}") from None
    return values


def prompts(args: argparse.Namespace, pipe: SundaePipeline) -> list[str] | None:
    """--prompt for a text model (None otherwise); UsageError when a text model gets none or another gets one."""
    if not pipe.generator.cfg.text_dim:
        if args.prompt:
            raise UsageError(f"--prompt given, but {args.generator} is not text-conditional")
        return None
    if not args.prompt:
        raise UsageError(f"{args.generator} is text-conditional: pass --prompt TEXT (repeatable; \"\" is the empty "
                         f"caption)")
    for prompt in args.prompt:
        check_text(prompt, f"--prompt {prompt!r}")
    return list(args.prompt)


GRID_MAX = 256  # images in `sample`'s grid.png: every sample is in samples/, the grid only previews them


def cmd_sample(args: argparse.Namespace) -> None:
    old = claim_outputs(args.out, ["grid.png", "samples", "samples.jsonl"], args.overwrite)
    pipe = load_pipeline(args)
    labels, texts = class_values(args.class_, pipe), prompts(args, pipe)
    sampler = sampler_from_args(args, base=pipe.sampler)
    clear_outputs(old)
    out, t0 = Path(args.out), time.time()
    images, taken, lines = [], [], []  # images: only the first GRID_MAX, for grid.png; memory stays bounded
    conditions = pipe.labels(labels, args.num)
    seeds = pipe.seeds(args.seed, args.num)
    for start, batch, steps, _ in pipe.generate(args.num, labels, texts, tuple(args.guidance_scale), sampler,
                                                args.seed, args.batch_size):
        for j, (image, n) in enumerate(zip(batch, steps.tolist())):  # written as they come
            i = start + j
            save_image(image, out / "samples" / f"{i:05d}.png")
            record = {"file": f"samples/{i:05d}.png", "seed": seeds[i], "steps": n,
                      "guidance_scale": list(args.guidance_scale)}
            if conditions is not None:
                record.update({"class": int(conditions[i]), "class_name": pipe.class_names[int(conditions[i])]})
            if texts:
                record["prompt"] = texts[i % len(texts)]
            lines.append(json.dumps(record) + "\n")
        # Rewritten whole after every batch, atomically: a run stopped midway leaves the records of its
        # finished batches, never a torn line.
        text = "".join(lines)
        atomic_write(out / "samples.jsonl", lambda tmp: Path(tmp).write_text(text))
        images.append(batch[:max(0, GRID_MAX - start)])
        taken.append(steps)
    images = torch.cat(images)
    save_grid(images, out / "grid.png", nrow=args.nrow or int(np.ceil(np.sqrt(len(images)))))
    shown = "" if args.num <= GRID_MAX else f"; grid.png shows the first {GRID_MAX}"
    print(f"{args.num} sample{'s' if args.num != 1 else ''} in {time.time() - t0:.1f} s (mean "
          f"{torch.cat(taken).float().mean():.1f} steps) written to {out}{shown}")


def cmd_inpaint(args: argparse.Namespace) -> None:
    old = claim_outputs(args.out, ["figure.png", "completion_*.png"], args.overwrite)
    pipe = load_pipeline(args)
    sampler = sampler_from_args(args, base=pipe.sampler)
    if pipe.num_classes and args.class_ is None:
        raise UsageError(f"{args.generator} is class-conditional: pass --class (0..{pipe.num_classes - 1})")
    labels = class_values(args.class_, pipe)
    if args.dilate < 0:
        raise UsageError(f"--dilate must be >= 0 token cells, got {args.dilate}")
    if args.passes < 1:
        raise UsageError(f"--passes must be >= 1, got {args.passes}")
    image = load_image(args.image, pipe.tokenizer.cfg.in_channels)
    mask = load_mask(args.mask, tuple(image.shape[1:]))
    if not mask.any():
        log.warning("mask %s marks no pixel to regenerate (white or transparent = regenerate): the completions "
                    "will equal the image", args.mask)
    elif mask.all():
        log.warning("mask %s marks every pixel (white or transparent = regenerate): nothing of the image is kept",
                    args.mask)
    grid = list(token_grid(image.shape[1], image.shape[2], pipe.tokenizer.cfg.f))
    if pipe.meta.get("grid") and grid != list(pipe.meta["grid"]):
        log.warning("%s gives a %dx%d token grid; %s was trained on %dx%d: completions may be poor",
                    args.image, *grid, args.generator, *pipe.meta["grid"])
    texts = prompts(args, pipe)
    clear_outputs(old)
    result = pipe.inpaint(image, mask, args.num, labels, texts, tuple(args.guidance_scale), sampler, args.seed,
                          args.dilate, output_type="pt", passes=args.passes)
    out = Path(args.out)
    for i, img in enumerate(result.images):
        save_image(img, out / f"completion_{i:02d}.png")
    masked = image * (1 - mask) + mask  # regenerate area shown white
    save_grid(torch.cat([image[None], masked[None], result.images]), out / "figure.png", nrow=args.num + 2)
    print(f"{args.num} completions written to {out}")


def cmd_export(args: argparse.Namespace) -> None:
    source = Path(args.checkpoint)
    if source.is_dir() and not (source / "config.json").is_file():  # a run folder: its last checkpoint
        found = [source / f"{kind}.pt" for kind in ("generator", "tokenizer") if (source / f"{kind}.pt").is_file()]
        if len(found) == 2:
            raise UsageError(f"{source} holds both generator.pt and tokenizer.pt: pass the one to export")
        found = found or [p for p in (resolve_checkpoint(source, "generator"),) if p.is_file()]  # a quickstart folder
        if not found:
            raise UsageError(f"{source} holds no generator.pt or tokenizer.pt: pass a run folder of `sundae "
                             f"train` or `sundae train-vqgan`, or the checkpoint file")
        source = found[0]
    out = Path(args.out)
    if (out / "config.json").is_file() and not args.overwrite:
        raise UsageError(f"{out} already holds an export: pass --overwrite to replace it, or choose another folder")
    if load_checkpoint(source, None)["kind"] == "generator":
        export_bundle(source, out, args.tokenizer, ema=not args.no_ema)
        print(f"{source} and its tokenizer exported to {out} (config.json + model.safetensors, tokenizer/, "
              f"README.md)")
        return
    if args.tokenizer:
        raise UsageError(f"--tokenizer is for bundling a generator; {source} is a tokenizer")
    export(source, out, ema=not args.no_ema)
    print(f"{source} exported to {out}/config.json and {out}/model.safetensors")


def cmd_demo(args: argparse.Namespace) -> None:
    if args.run and args.generator:
        raise UsageError("pass either --run or --generator, not both")
    if not (args.run or args.generator):
        raise UsageError("pass --generator (a bundle, export, run folder or checkpoint) or --run QUICKSTART_DIR")
    args.generator = args.generator or args.run
    try:
        from sundae.apps.demo import build_app, serve, upload_limit
    except ImportError as err:
        raise UsageError(f"the demo needs gradio ({err}): pip install -e \".[demo]\"") from None
    app = build_app(load_pipeline(args), max_pixels=args.max_pixels)
    print(f"starting the SUNDAE demo on http://{args.host}:{args.port}" + (" and a public share link" if args.share
                                                                           else "") + "; Ctrl-C stops it")
    serve(app, args.host, args.port, args.share, upload_limit(args.max_pixels))


def add_sampling_args(p: argparse.ArgumentParser, steps_type=None) -> None:
    """--generator/--tokenizer, the condition, the sampler's flags (from SamplerConfig), seed and precision."""
    p.add_argument("--generator", required=True, help=GENERATOR_HELP)
    p.add_argument("--tokenizer", help=TOKENIZER_HELP)
    add_sampler(p, steps_type)
    add_guidance(p)
    add_precision(p)


def add_parsers(sub: argparse._SubParsersAction) -> None:
    for verb, text in (("sample", "generate images"), ("inpaint", "regenerate the masked part of an image, several "
                                                                  "times")):
        p = sub.add_parser(verb, help=text)
        add_sampling_args(p)
        p.add_argument("--num", type=positive, default=16 if verb == "sample" else 4, help="number of images")
        p.add_argument("--class", dest="class_", help="class label(s) or class name(s), comma-separated, cycled over "
                       "the images; `sample` cycles through all classes when omitted, `inpaint` needs it for a "
                       "class-conditional generator")
        p.add_argument("--prompt", action="append", default=[], help="text-conditional generators: the caption "
                       "(repeat the flag for several, cycled over the images)")
        p.add_argument("--seed", type=int, default=0, help="image i uses seed + i, so any one can be redrawn alone")
        add_common(p)
    p = sub.choices["sample"]
    p.add_argument("--out", required=True, help="folder: grid.png, samples/NNNNN.png and samples.jsonl (one JSON "
                   "line per image: file, seed, class and class_name or prompt, guidance_scale, steps taken)")
    p.add_argument("--batch-size", type=positive, default=64, help="images sampled at once (default 64); the "
                   "images do not depend on it")
    p.add_argument("--nrow", type=positive, default=None, help="images per grid row; default: square")
    p.add_argument("--overwrite", action="store_true", help="replace the samples of an earlier run in OUT")
    p.set_defaults(func=cmd_sample)

    p = sub.choices["inpaint"]
    p.add_argument("--image", required=True, help="the image file to complete (any size; PNG, JPEG, ...)")
    p.add_argument("--mask", required=True, help="same size as the image; white (or transparent) = regenerate")
    p.add_argument("--dilate", type=int, default=0, help="grow the regenerated token cells by this many cells "
                   "(8-neighbourhood: a 3x3 square of cells per step; default 0)")
    p.add_argument("--passes", type=int, default=INPAINT_PASSES, help="sampling passes: each one after the first "
                   f"re-encodes the last completion and samples the masked cells again (default {INPAINT_PASSES})")
    p.add_argument("--out", required=True, help="folder: completion_NN.png and figure.png")
    p.add_argument("--overwrite", action="store_true", help="replace the completions of an earlier run in OUT")
    p.set_defaults(func=cmd_inpaint)

    p = sub.add_parser("export", help="write a generator and its tokenizer as a bundle (config.json + "
                       "model.safetensors each, a model card), or a tokenizer alone, for sharing")
    p.add_argument("checkpoint", help="a run folder, a quickstart folder or a .pt checkpoint (generator or tokenizer)")
    p.add_argument("out", help="folder; every command accepts it where it accepts the checkpoint, wherever it moves")
    p.add_argument("--tokenizer", help="the generator's tokenizer checkpoint; default: the one it was trained with")
    p.add_argument("--no-ema", action="store_true", help="export the raw weights instead of the EMA weights")
    p.add_argument("--overwrite", action="store_true", help="replace an export already in OUT")
    add_debug(p)
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("demo", help="a local web app: watch sampling step by step, inpaint with a brush")
    p.add_argument("--generator", help=GENERATOR_HELP)
    p.add_argument("--tokenizer", help=TOKENIZER_HELP)
    p.add_argument("--run", help="a quickstart output folder (the same as --generator with that folder)")
    p.add_argument("--host", default="127.0.0.1", help="address to serve on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=port, default=7860, help="port (default 7860)")
    p.add_argument("--share", action="store_true", help="also open a public Gradio share link (off by default)")
    p.add_argument("--max-pixels", type=pixels, default=2048 * 2048,
                   help="largest image to inpaint, in pixels: a count or HxW (default 2048x2048); uploads are limited "
                   "to 5 bytes per pixel of it")
    add_common(p)
    p.set_defaults(func=cmd_demo)
