"""Verbs that measure and demonstrate: evaluate, plot, quickstart."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

import torch

from sundae.cli.args import (UsageError, add_common, add_debug, add_strict, add_workers, non_negative, positive,
                             preset, sampler_from_args, steps_list)
from sundae.cli.outputs import claim_outputs, clear_outputs
from sundae.cli.sampling import add_sampling_args, load_pipeline
from sundae.data import FASHION_MNIST_DIR
from sundae.images import save_grid
from sundae.io import file_digest, log, write_json


def _inception(args: argparse.Namespace, has_classes: bool, skipped: dict[str, str]):
    """(features function, record) of the FID Inception network named by --inception or the default path; (None,
    None) with the reason in `skipped` when the file is absent and the reference has classes to measure with."""
    from sundae.eval.inception import inception_features, load_fid_inception
    from sundae.eval.protocol import INCEPTION_ENV, INCEPTION_FILE, default_inception_path

    path = Path(args.inception) if args.inception else default_inception_path()
    if path.is_file():
        model = load_fid_inception(path, args.device)
        return (lambda x: inception_features(model, x)), {
            "weights": str(path.resolve()), "sha256": file_digest(path), "features": "pool3 (2048)",
            "resize": "bilinear, align_corners=False, to 299x299", "grayscale": "replicated to 3 channels"}
    if args.inception and path.is_dir():
        raise UsageError(f"--inception {args.inception} is a directory, expected the .pth file ({INCEPTION_FILE})")
    if args.inception:
        raise UsageError(f"--inception {args.inception} does not exist")
    if not has_classes:
        raise UsageError(f"no sample metric can be measured: the reference {args.reference} has no class labels "
                         f"(for classifier-FID, pass a reference with class sub-folders) and there are no Inception "
                         f"weights at {path} (put {INCEPTION_FILE} there, set ${INCEPTION_ENV}, or "
                         f"pass --inception PATH)")
    skipped["fid_inception"] = (f"no Inception weights at {path}: put the standard FID Inception-V3 weights "
                                f"{INCEPTION_FILE} (pytorch-fid / torch-fidelity release) there, set ${INCEPTION_ENV}, "
                                f"or pass --inception PATH")
    log.warning("Inception FID skipped: %s", skipped["fid_inception"])
    return None, None


def cmd_evaluate(args: argparse.Namespace) -> None:
    from sundae.eval.protocol import evaluate, load_or_train_classifier, load_reference, tool_versions
    from sundae.plots import plot_curves

    out = Path(args.out)
    old = claim_outputs(out, ["evaluation.json", "samples.png", "curves.png"], args.overwrite)
    pipe = load_pipeline(args)
    net = pipe.generator
    if net.cfg.text_dim:
        raise UsageError(f"{args.generator} is text-conditional; evaluate measures unconditional and "
                         f"class-conditional generators (for text, see benchmarks/emoji_agreement.py)")
    samplers = [sampler_from_args(args, steps, pipe.sampler) for steps in args.steps or [pipe.sampler.steps]]
    size = pipe.image_size
    if size[0] != size[1]:
        raise UsageError(f"{args.generator} makes {size[0]}x{size[1]} images; evaluate compares square images only")
    if args.k < 1:
        raise UsageError(f"--k must be >= 1, got {args.k}")
    if args.num <= args.k:
        raise UsageError(f"--num {args.num}: precision/recall need more than --k {args.k} samples")
    ref = load_reference(args.reference, size[0], pipe.tokenizer.cfg.in_channels, args.reference_limit,
                         args.classifier_train_limit, args.strict, args.workers)
    if len(ref.images) <= args.k:
        raise UsageError(f"--reference {args.reference}: {len(ref.images)} reference images, precision/recall "
                         f"need more than --k {args.k}")
    skipped: dict[str, str] = {}
    inception, inception_record = _inception(args, ref.num_classes >= 2, skipped)
    classifier = record = None
    if ref.num_classes >= 2:
        classifier, record = load_or_train_classifier(Path(args.classifier or out / "classifier.pt"), ref,
                                                      args.classifier_epochs, args.seed)
        record["features"] = "SmallClassifier penultimate layer (128, after ReLU)"
    else:
        skipped["classifier"] = (f"the reference {args.reference} has no class labels (sub-folders): no classifier-FID "
                                 f"and no class accuracy")
    clear_outputs(old)  # a --classifier file that is not one has been refused by now
    results, images = evaluate(pipe, ref, samplers, args.num, args.batch_size, args.seed, classifier, record,
                               inception, inception_record, args.k, tuple(args.guidance_scale))
    results.setdefault("skipped", {}).update(skipped)
    conditional = bool(net.cfg.num_classes)
    schedule = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(samplers[0]).items()
                if k != "steps"}
    protocol = {
        "generator": str(Path(pipe.source).resolve()), "generator_sha256": file_digest(pipe.source),
        "tokenizer": str(Path(pipe.tokenizer_path).resolve()), "tokenizer_sha256": file_digest(pipe.tokenizer_path),
        "samples": args.num, "steps": [sampler.steps for sampler in samplers], **schedule,
        "labels": f"balanced: sample i has class i mod {net.cfg.num_classes}" if conditional else "unconditional",
        "guidance_scale": list(args.guidance_scale), "seed": args.seed,
        "seeds": "sample i is drawn from its own generator seeded seed + i", "batch_size": args.batch_size,
        "precision": args.precision, "image_size": list(size), "reference": ref.info, "precision_recall_k": args.k,
        "feature_extractors": {"classifier": record is not None, "inception": inception_record is not None},
        "fid": "Frechet distance of Gaussians fitted to the features (mean, unbiased covariance), float64",
        "tools": tool_versions(), "device": str(args.device), "threads": torch.get_num_threads(),
    }
    result = {"protocol": protocol, **results}
    write_json(out / "evaluation.json", result)
    nrow = net.cfg.num_classes if conditional else 8
    save_grid(images[:nrow * max(1, 64 // nrow)], out / "samples.png", nrow=nrow)
    if len(samplers) > 1:
        keys = [k for k in ("fid_classifier", "fid_inception", "class_accuracy", "precision_classifier",
                            "recall_classifier") if k in results["samples"][0]]
        plot_curves([sampler.steps for sampler in samplers], {k: [row[k] for row in results["samples"]] for k in keys}, "sampling steps T",
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
        cfg = preset(EMOJI_PRESETS, args.preset or "emoji", "emoji quickstart")
        metrics = quickstart_emoji(cfg, args.out, args.device)
        print(f"quickstart done in {metrics['seconds_total']:.0f} s; prompts and their samples in "
              f"{Path(args.out) / 'prompts.png'}")
        return
    cfg = preset(QUICKSTART_PRESETS, args.preset or "fashion", "quickstart")
    metrics = quickstart(cfg, args.data or str(FASHION_MNIST_DIR), args.out, args.device)
    tok, samples = metrics["tokenizer"], metrics["samples"]
    print(f"judge accuracy on the test images {metrics['classifier']['test_accuracy']:.3f}; tokenizer PSNR "
          f"{tok['psnr_db']:.1f} dB, codebook usage {tok['codebook_usage']:.0%}; samples judged their class "
          f"{samples['class_accuracy']:.3f}, {samples['seconds_per_image']:.3f} s/image")
    print(f"quickstart done in {metrics['seconds_total']:.0f} s; results in {args.out} (metrics.json, "
          f"samples_by_class.png, inpainting.png)")


def cmd_plot(args: argparse.Namespace) -> None:
    from sundae.plots import plot_run
    print(f"curves written to {plot_run(args.run)}")


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="FID, classifier-FID, precision/recall, class accuracy and tokenizer "
                       "metrics of a generator against reference images; writes evaluation.json")
    add_sampling_args(p, steps_type=steps_list)
    p.add_argument("--reference", default="fashion-mnist", help="fashion-mnist[:test|:train] (the installed idx "
                   "files; default split test), an idx folder DIR[:test|:train], or an image folder (sub-folders "
                   "= classes); default fashion-mnist")
    p.add_argument("--reference-limit", type=non_negative, default=0, help="use the first N reference images "
                   "(default 0: all)")
    p.add_argument("--out", required=True, help="folder: evaluation.json, samples.png, curves.png (sweeps), "
                   "classifier.pt")
    p.add_argument("--num", type=positive, default=10000, help="samples per sampling setting (default 10000)")
    p.add_argument("--seed", type=int, default=0, help="seeds the samples (sample i: seed + i) and a newly "
                   "trained classifier")
    p.add_argument("--batch-size", type=positive, default=250, help="samples drawn at once (default 250); "
                   "the results do not depend on it")
    p.add_argument("--classifier", help="classifier file for classifier-FID and class accuracy: read if it exists, "
                   "else trained on the labelled reference data and written there (default OUT/classifier.pt)")
    p.add_argument("--classifier-epochs", type=positive, default=2, help="epochs of a newly trained classifier "
                   "(default 2)")
    p.add_argument("--classifier-train-limit", type=non_negative, default=0,
                   help="train a new classifier on the first N images only (default 0: all)")
    p.add_argument("--inception", help="the FID Inception-V3 weights (pt_inception-2015-12-05-6726825d.pth); "
                   "default $SUNDAE_INCEPTION or ~/.cache/sundae/pt_inception-2015-12-05-6726825d.pth; never "
                   "downloaded: without the file, Inception FID is skipped")
    p.add_argument("--k", type=int, default=3, help="neighbours for precision/recall (default 3)")
    p.add_argument("--overwrite", action="store_true", help="replace the results of an earlier run in OUT")
    add_strict(p)
    add_workers(p)
    add_common(p)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("plot", help="draw a training run's log.jsonl (losses, lr, speed, PSNR, codebook usage, ...) "
                       "to RUN/curves.png, one panel per quantity")
    p.add_argument("run", help="run folder of `sundae train` or `sundae train-vqgan` (while it trains, too)")
    add_debug(p)
    p.set_defaults(func=cmd_plot)

    p = sub.add_parser("quickstart", help="the whole pipeline on Fashion-MNIST (or, with --dataset emoji, "
                       "text-to-image on emoji): tokenizer, generator, samples, metrics")
    p.add_argument("--dataset", choices=("fashion", "emoji"), default="fashion", help="fashion: class-conditional "
                   "Fashion-MNIST (default); emoji: text-conditional on the Noto Color Emoji font "
                   "(apt-get install fonts-noto-color-emoji; pip install -e \".[text]\")")
    p.add_argument("--data", help=f"fashion: folder with the Fashion-MNIST idx files (default {FASHION_MNIST_DIR})")
    p.add_argument("--out", default="quickstart", help="output folder")
    p.add_argument("--preset", help="fashion: fashion (the real run, default) or tiny (a smoke test); emoji: emoji "
                   "(default) or tiny")
    add_common(p)
    p.set_defaults(func=cmd_quickstart)
