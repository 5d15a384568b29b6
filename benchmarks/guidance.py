"""Class accuracy of Fashion-MNIST samples vs the classifier-free guidance scale (issue 7).

Trains (or reuses) the quickstart's pieces with condition dropout, then samples `--per-class` images of every
class at each guidance scale and lets the quickstart's judge classifier (trained on the real training set)
say which class each sample shows. Class accuracy = share of samples the judge assigns to the class they
were conditioned on; the judge's own test accuracy bounds what a perfect generator can score.

    python benchmarks/guidance.py                                   # the whole run (~15 min on 2 CPU cores)
    python benchmarks/guidance.py --tokenizer quickstart/tokenizer/tokenizer.pt --tokens quickstart/tokens

Stage 1 is reused when `--tokenizer` and `--tokens` are given (a quickstart's folders); the generator is
always trained here, with `--cond-dropout` (the quickstart's fashion recipe otherwise), because guidance
needs the null class trained. Prints a table and writes benchmarks/results/guidance_fashion.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import torch

from common import RESULTS, device_name, print_table, write_json  # noqa: E402  (puts src/ on the path)

from sundae.apps.quickstart import QUICKSTART_PRESETS
from sundae.checkpoint import load_tokenizer
from sundae.data import FASHION_MNIST_CLASSES, FASHION_MNIST_DIR, IdxImages
from sundae.eval.classifier import accuracy, train_classifier
from sundae.images import save_grid
from sundae.pipeline import SundaePipeline
from sundae.sundae import SamplerConfig
from sundae.tokens import TokenDataset, tokenize
from sundae.train import train_generator, train_vqgan


def _scale(text: str) -> tuple[float, float]:
    parts = [float(v) for v in text.split(":")]
    return (parts[0], parts[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default=str(FASHION_MNIST_DIR))
    parser.add_argument("--out", default="guidance_run", help="run folder (tokenizer/, tokens/, generator/)")
    parser.add_argument("--tokenizer", help="reuse this fashion tokenizer (with --tokens) instead of training one")
    parser.add_argument("--tokens", help="its token folder of the Fashion-MNIST training set")
    parser.add_argument("--gen-steps", type=int, default=900, help="generator steps (the quickstart's 900)")
    parser.add_argument("--cond-dropout", type=float, default=0.1)
    parser.add_argument("--scales", default="1,1.5,2,3,4,1:3",
                        help="comma-separated guidance scales; S:E is a linear schedule from S to E")
    parser.add_argument("--per-class", type=int, default=100)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--smoke", action="store_true", help="a seconds-long check of the script (2,000 judge "
                        "images, 2 generator steps, 2 samples per class); writes no results")
    args = parser.parse_args()
    if args.smoke:
        args.gen_steps, args.per_class, args.steps = 2, 2, 2
    device, out = torch.device(args.device), Path(args.out)
    cfg = QUICKSTART_PRESETS["fashion"]
    torch.manual_seed(args.seed)
    t0 = time.time()

    train = IdxImages(args.data, "train", cfg.image_size)
    test = IdxImages(args.data, "test", cfg.image_size)
    n = 2000 if args.smoke else len(train)
    # Two epochs, as in the published run (the quickstart's own judge now trains one).
    judge = train_classifier(train.images[:n], train.labels[:n], 10, 1 if args.smoke else 2, seed=args.seed)
    judge_acc = accuracy(judge, test.images, test.labels)
    print(f"judge test accuracy {judge_acc:.4f}")

    if args.tokenizer and args.tokens:
        tok_path, tokens_dir = Path(args.tokenizer), Path(args.tokens)
    else:
        tok_path = train_vqgan(cfg.vqgan, cfg.vqgan_train, train, out / "tokenizer", device, resume=True)
        tokens_dir = tokenize(tok_path, train, out / "tokens", device, class_names=FASHION_MNIST_CLASSES)
    tokenizer = load_tokenizer(tok_path, device)
    tokens = TokenDataset(tokens_dir)
    gen_cfg = dataclasses.replace(cfg.generator_train, steps=args.gen_steps, cond_dropout=args.cond_dropout)
    hg_cfg = dataclasses.replace(cfg.hourglass, codebook_size=tokenizer.cfg.codebook_size, num_classes=10)
    meta = {k: tokens.meta.get(k)
            for k in ("grid", "codebook_size", "f", "tokenizer", "tokenizer_sha256", "class_names")}
    t = time.time()
    gen_path = train_generator(hg_cfg, gen_cfg, tokens, out / "generator", meta, tokenizer, device, resume=True)
    train_seconds = time.time() - t
    pipe = SundaePipeline.from_pretrained(gen_path, device)

    labels = torch.arange(10).repeat_interleave(args.per_class)
    rows = []
    for text in args.scales.split(","):
        scale = _scale(text)
        t = time.time()
        images = pipe(len(labels), labels, guidance_scale=scale, sampler=SamplerConfig(steps=args.steps),
                      seed=args.seed, batch_size=250, output_type="pt").images
        acc = accuracy(judge, images, labels)
        per_class = [accuracy(judge, images[c * args.per_class:(c + 1) * args.per_class],
                              labels[c * args.per_class:(c + 1) * args.per_class]) for c in range(10)]
        rows.append({"guidance_scale": list(scale), "class_accuracy": acc, "min_class_accuracy": min(per_class),
                     "per_class_accuracy": per_class, "seconds_sampling": time.time() - t})
        print(f"scale {text}: class accuracy {acc:.4f}")
        save_grid(images.view(10, args.per_class, *images.shape[1:])[:, :10].flatten(0, 1),
                  out / f"samples_scale_{text.replace(':', '-')}.png", nrow=10)

    for r in rows:
        r["scale"] = ":".join(f"{v:g}" for v in dict.fromkeys(r["guidance_scale"]))
    print_table(rows, [("scale", "guidance scale", "s"), ("class_accuracy", "class accuracy", ".4f"),
                       ("min_class_accuracy", "worst class", ".2f"), ("seconds_sampling", "sampling s", ".0f")])
    if args.smoke:
        return
    write_json(RESULTS / "guidance_fashion.json", {
        "judge_test_accuracy": judge_acc, "samples_per_class": args.per_class, "sampling_steps": args.steps,
        "generator_steps": args.gen_steps, "cond_dropout": args.cond_dropout, "generator_train_seconds": train_seconds,
        "tokenizer": str(tok_path), "results": rows, "device": device_name(device), "torch": torch.__version__,
        "seconds_total": time.time() - t0})


if __name__ == "__main__":
    main()
