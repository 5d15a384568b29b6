"""`sundae quickstart`: the whole pipeline on Fashion-MNIST, with numbers that say whether it worked.

Steps: train a small judge classifier on real training images; train the tokenizer; measure its PSNR and
codebook usage on the test set; tokenize the training set; train a class-conditional hourglass with the
SUNDAE loss; sample 100 images per class and let the judge classify them; inpaint test images. Writes
into `out`: `reconstructions.png`, `samples_by_class.png` (a row per class), `inpainting.png` (per row: the
image, the masked image, several completions), `metrics.json`, and the tokenizer/generator run folders.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sundae.checkpoint import load_tokenizer
from sundae.data import FASHION_MNIST_CLASSES, IdxImages, ImageFolder
from sundae.eval.classifier import accuracy, train_classifier
from sundae.eval.metrics import codebook_usage, psnr
from sundae.hourglass import HourglassConfig
from sundae.hourglass import PRESETS as HOURGLASS_PRESETS
from sundae.images import save_grid
from sundae.io import atomic_write, write_json
from sundae.pipeline import SundaePipeline, inpaint_images
from sundae.sundae import SamplerConfig
from sundae.tokens import TokenDataset, encode_dataset, tokenize
from sundae.train import (GENERATOR_TRAIN_PRESETS, VQGAN_TRAIN_PRESETS, GeneratorTrainConfig, VQGANTrainConfig,
                          train_generator, train_vqgan)
from sundae.vqgan import PRESETS as VQGAN_PRESETS
from sundae.vqgan import VQGANConfig


@dataclass(frozen=True)
class QuickstartConfig:
    """What the quickstart trains and measures. `*_limit` 0 = the whole split."""

    vqgan: VQGANConfig = VQGAN_PRESETS["fashion"]
    # Trained under bf16 autocast (codebook distances stay float32): 120-step commands 2.3x faster than fp32 with
    # the discriminator, 1.6x without (benchmarks/RESULTS.md, "The quickstart, fourth round", for its rFID).
    vqgan_train: VQGANTrainConfig = dataclasses.replace(VQGAN_TRAIN_PRESETS["fashion"], precision="bf16")
    # The `fashion` preset with a deeper valley, (1, 6, 1) blocks: the 4x4 valley blocks cost a quarter of a full
    # 8x8 one, so four more cost 23% more per step; trained at unroll 1 with lr 2e-3 falling on a half cosine,
    # sampled at temperature 1.0 with the update proportion falling 1.0 -> 0.5. At 1460 steps (fp32):
    # classifier-FID 47.9 +- 2.0 (two sampling seeds) against 53.3 +- 0.3 for (1, 2, 1) with the same lr schedule
    # and 61.0 +- 4.7 for the constant lr 1e-3 used before (benchmarks/RESULTS.md, "The quickstart's
    # generator"). Trained under bf16 autocast (attention stays float32 on CPU): 0.34 s a step against 0.42,
    # and 45.2 +- 1.1 against fp32's 47.9 +- 2.0 for the same training seed (a tie). 2000 steps instead of 1460
    # (the time the bf16 tokenizer saves): 40.0 +- 3.1 against 45.8 +- 1.3 (three sampling seeds each);
    # AdamW betas (0.9, 0.95): 45.1 +- 0.6.
    hourglass: HourglassConfig = dataclasses.replace(HOURGLASS_PRESETS["fashion"], depth=(1, 6, 1))
    generator_train: GeneratorTrainConfig = dataclasses.replace(
        GENERATOR_TRAIN_PRESETS["fashion"], unroll_steps=1, steps=2000, lr=2e-3, lr_schedule="cosine",
        precision="bf16", sample_every=1000, save_every=1000)
    train_limit: int = 0
    test_limit: int = 0
    classifier_epochs: int = 1  # test accuracy 0.890 (2 epochs: 0.905) in half the time
    # The judge's training images: the first 30,000 (0: all) give test accuracy 0.875 in half the time of all
    # 60,000 (0.890). It scores only the quickstart's own metrics.json; `sundae evaluate` trains its own.
    classifier_images: int = 30_000
    samples_per_class: int = 100
    sample_batch_size: int = 250
    sampler: SamplerConfig = SamplerConfig(steps=32, temperature=1.0, update_proportion=(1.0, 0.5))
    inpaint_images: int = 4
    inpaint_completions: int = 4
    seed: int = 0
    image_size: int = 32

    def __post_init__(self) -> None:
        if min(self.train_limit, self.test_limit, self.classifier_images) < 0:
            raise ValueError("train_limit, test_limit and classifier_images must be >= 0 (0 = all)")


QUICKSTART_PRESETS: dict[str, QuickstartConfig] = {
    "fashion": QuickstartConfig(),
    "tiny": QuickstartConfig(
        vqgan=dataclasses.replace(VQGAN_PRESETS["tiny"], in_channels=1),
        vqgan_train=VQGAN_TRAIN_PRESETS["tiny"],
        hourglass=HOURGLASS_PRESETS["tiny"],
        generator_train=GENERATOR_TRAIN_PRESETS["tiny"],
        train_limit=256, test_limit=128, classifier_epochs=1, classifier_images=128, samples_per_class=2,
        sample_batch_size=10,
        sampler=SamplerConfig(steps=4, min_steps=2), inpaint_images=2, inpaint_completions=3),
}


def stage(number: int, what: str, of: int = 5) -> None:
    """Print the stage heading `[i/n] what` to stdout (the progress bars go to stderr and may be off)."""
    print(f"[{number}/{of}] {what}", flush=True)


def _subset(ds: IdxImages, limit: int) -> IdxImages:
    if limit:
        ds.images, ds.labels = ds.images[:limit], ds.labels[:limit]
    return ds


def quickstart(cfg: QuickstartConfig, data_dir: str | Path, out: str | Path,
               device: torch.device = torch.device("cpu")) -> dict[str, Any]:
    """Run the quickstart; returns the metrics it also writes to `out/metrics.json`."""
    out = Path(out)
    t_start = time.time()
    torch.manual_seed(cfg.seed)
    train = _subset(IdxImages(data_dir, "train", cfg.image_size), cfg.train_limit)
    test = _subset(IdxImages(data_dir, "test", cfg.image_size), cfg.test_limit)
    num_classes = len(FASHION_MNIST_CLASSES)
    seconds: dict[str, float] = {}

    t = time.time()
    stage(1, "judge classifier on the real training images")
    n = min(len(train), cfg.classifier_images or len(train))
    judge = train_classifier(train.images[:n], train.labels[:n], num_classes, cfg.classifier_epochs, seed=cfg.seed)
    judge_acc = accuracy(judge, test.images, test.labels)
    seconds["classifier"] = time.time() - t

    t = time.time()
    stage(2, f"tokenizer ({cfg.vqgan_train.steps} steps), then its reconstructions of the test images")
    # resume=True: a rerun into the same folder continues (or reuses) the runs instead of starting over.
    tok_path = train_vqgan(cfg.vqgan, cfg.vqgan_train, train, out / "tokenizer", device, resume=True)
    tokenizer = load_tokenizer(tok_path, device)
    test_tokens, _ = encode_dataset(tokenizer, test, 500, device, desc="encode test")
    with torch.inference_mode():
        recon = torch.cat([tokenizer.decode(torch.from_numpy(test_tokens[i:i + 500].astype("int64")).to(device)).cpu()
                           for i in range(0, len(test_tokens), 500)])
    save_grid(torch.cat([test.images[:16], recon[:16]]), out / "reconstructions.png", nrow=16)
    tokenizer_metrics = {"psnr_db": psnr(recon, test.images), "codebook_usage": codebook_usage(
        torch.from_numpy(test_tokens.astype("int64")), cfg.vqgan.codebook_size),
        "classifier_accuracy_on_reconstructions": accuracy(judge, recon, test.labels)}
    seconds["tokenizer"] = time.time() - t

    t = time.time()
    stage(3, f"tokenize the {len(train)} training images")
    tokens_dir = tokenize(tok_path, train, out / "tokens", device, class_names=FASHION_MNIST_CLASSES)
    seconds["tokenize"] = time.time() - t

    t = time.time()
    stage(4, f"class-conditional generator ({cfg.generator_train.steps} steps)")
    tokens = TokenDataset(tokens_dir)
    hg_cfg = dataclasses.replace(cfg.hourglass, codebook_size=cfg.vqgan.codebook_size, num_classes=num_classes)
    meta = {k: tokens.meta[k]
            for k in ("grid", "codebook_size", "f", "tokenizer", "tokenizer_sha256", "class_names")}
    meta["sampler"] = dataclasses.asdict(cfg.sampler)  # the default of `sundae sample/evaluate` and the demo
    gen_path = train_generator(hg_cfg, cfg.generator_train, tokens, out / "generator", meta, tokenizer, device,
                               resume=True)
    pipe = SundaePipeline.from_pretrained(gen_path, device)
    net = pipe.generator
    seconds["generator"] = time.time() - t

    # Class-conditional samples, judged by the classifier.
    h, w = pipe.grid
    labels = torch.arange(num_classes).repeat_interleave(cfg.samples_per_class)
    t = time.time()
    stage(5, f"sample {cfg.samples_per_class} images per class (T={cfg.sampler.steps}), judge them, inpaint")
    images, taken, _ = pipe(len(labels), labels, sampler=cfg.sampler, seed=cfg.seed,
                            batch_size=cfg.sample_batch_size, output_type="pt")
    sample_seconds = time.time() - t
    per_class = min(10, cfg.samples_per_class)
    by_class = torch.cat([images[c * cfg.samples_per_class:c * cfg.samples_per_class + per_class]
                          for c in range(num_classes)])
    save_grid(by_class, out / "samples_by_class.png", nrow=per_class)
    sample_acc = accuracy(judge, images, labels)

    # Inpainting: a centre square of test images regenerated, several completions each.
    f = cfg.vqgan.f
    mask = torch.zeros(1, cfg.image_size, cfg.image_size)
    lo, hi = cfg.image_size // 4, 3 * cfg.image_size // 4
    mask[:, lo:hi, lo:hi] = 1.0
    rows, kept_exactly, diffs = [], True, []
    with torch.inference_mode():
        for i in range(cfg.inpaint_images):
            image, label = test[i * 7]
            lab = torch.full((cfg.inpaint_completions,), label, device=device)
            gens = [torch.Generator(device).manual_seed(s) for s in pipe.seeds(cfg.seed + 100 * i, len(lab))]
            completions, z, keep, init = inpaint_images(net, tokenizer, image, mask, len(lab), lab, gens,
                                                        sampler=cfg.sampler)
            kept_exactly &= bool((z[keep] == init[keep]).all())
            inside = mask.bool().expand_as(completions[0]).to(device)
            flat = completions[:, inside]
            diffs.append(torch.cdist(flat, flat).sum().item() / max(1, len(flat) * (len(flat) - 1)))
            rows.append(torch.cat([image[None], (image * (1 - mask) + mask)[None], completions.cpu()]))
    save_grid(torch.cat(rows), out / "inpainting.png", nrow=cfg.inpaint_completions + 2)

    metrics = {
        "dataset": {"name": "Fashion-MNIST", "path": str(data_dir), "train_images": len(train),
                    "test_images": len(test), "image_size": cfg.image_size},
        "classifier": {"test_accuracy": judge_acc, "epochs": cfg.classifier_epochs,
                       "train_images": n},
        "tokenizer": {**tokenizer_metrics, "codebook_size": cfg.vqgan.codebook_size, "f": f, "grid": [h, w],
                      "parameters": sum(p.numel() for p in tokenizer.parameters())},
        "generator": {"parameters": sum(p.numel() for p in net.parameters()),
                      "train_steps": cfg.generator_train.steps, "unroll_steps": cfg.generator_train.unroll_steps},
        "samples": {"count": len(images), "class_accuracy": sample_acc,
                    "seconds_per_image": sample_seconds / len(images), "mean_steps": taken.float().mean().item(),
                    **{k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(cfg.sampler).items()}},
        "inpainting": {"images": cfg.inpaint_images, "completions": cfg.inpaint_completions,
                       "known_tokens_kept": kept_exactly, "mean_pairwise_l2_inside_mask": sum(diffs) / len(diffs)},
        "seconds": {**seconds, "sampling": sample_seconds},
        "seconds_total": time.time() - t_start,
        "device": str(device), "torch": torch.__version__, "threads": torch.get_num_threads(),
    }
    write_json(out / "metrics.json", metrics)
    return metrics


# ---- text-to-image on the emoji of Noto Color Emoji ----------------------------------------------------

EMOJI_PROMPTS = ("grinning face", "red apple", "rocket", "fire", "snowman", "dog face", "christmas tree", "ghost",
                 "rainbow", "four leaf clover")


@dataclass(frozen=True)
class EmojiQuickstartConfig:
    """What `sundae quickstart --dataset emoji` trains: a 32x32 RGB tokenizer (f=4, 8x8 tokens) and a
    text-conditional hourglass over the captions' all-MiniLM-L6-v2 features. `limit` > 0 renders only about
    that many emoji (tests)."""

    vqgan: VQGANConfig = dataclasses.replace(VQGAN_PRESETS["fashion"], in_channels=3)
    vqgan_train: VQGANTrainConfig = dataclasses.replace(VQGAN_TRAIN_PRESETS["fashion"], steps=1200, disc_start=1000)
    hourglass: HourglassConfig = dataclasses.replace(HOURGLASS_PRESETS["fashion"], num_classes=0)
    generator_train: GeneratorTrainConfig = dataclasses.replace(GENERATOR_TRAIN_PRESETS["fashion"], cond_dropout=0.15)
    text_encoder: str = "all-MiniLM-L6-v2"
    limit: int = 0
    prompts: tuple[str, ...] = EMOJI_PROMPTS
    samples_per_prompt: int = 6
    guidance_scale: tuple[float, float] = (3.0, 3.0)
    sampler: SamplerConfig = SamplerConfig(steps=32)
    seed: int = 0


EMOJI_PRESETS: dict[str, EmojiQuickstartConfig] = {
    "emoji": EmojiQuickstartConfig(),
    "tiny": EmojiQuickstartConfig(
        vqgan=VQGAN_PRESETS["tiny"], vqgan_train=dataclasses.replace(VQGAN_TRAIN_PRESETS["tiny"], steps=2),
        hourglass=dataclasses.replace(HOURGLASS_PRESETS["tiny"], num_classes=0),
        generator_train=dataclasses.replace(GENERATOR_TRAIN_PRESETS["tiny"], steps=2, batch_size=8),
        limit=24, prompts=("grinning face", "rocket"), samples_per_prompt=2,
        sampler=SamplerConfig(steps=4, min_steps=2)),
}


def quickstart_emoji(cfg: EmojiQuickstartConfig, out: str | Path, device: torch.device = torch.device("cpu"),
                     font: str | Path | None = None) -> dict[str, Any]:
    """Text-to-image end to end: render the emoji into `out/emoji` (captioned folder, `sundae.emoji`), train
    the tokenizer, tokenize with the text encoder, train the text-conditional generator with condition
    dropout, then sample every prompt with and without classifier-free guidance. Writes `out/prompts.png`
    (a row per prompt: the real emoji of that caption when there is one, else white, then the guided
    samples), `out/prompts_unguided.png` (the same without guidance), `out/prompts.txt` (the rows' prompts)
    and `out/metrics.json`; returns the metrics. Raises FileNotFoundError when the font is missing,
    ImportError when the text encoder's packages are.
    """
    from sundae.emoji import FONT, write_emoji_folder
    out = Path(out)
    t_start, seconds = time.time(), {}
    torch.manual_seed(cfg.seed)
    folder = out / "emoji"
    t = time.time()
    count = write_emoji_folder(folder, cfg.vqgan.resolution, cfg.limit, font or FONT, overwrite=True)
    images = ImageFolder(folder, cfg.vqgan.resolution, cfg.vqgan.in_channels)
    seconds["render"] = time.time() - t

    t = time.time()
    tok_path = train_vqgan(cfg.vqgan, cfg.vqgan_train, images, out / "tokenizer", device, resume=True)
    tokenizer = load_tokenizer(tok_path, device)
    seconds["tokenizer"] = time.time() - t
    t = time.time()
    tokens_dir = tokenize(tok_path, images, out / "tokens", device, text_encoder=cfg.text_encoder)
    tokens = TokenDataset(tokens_dir)
    seconds["tokenize"] = time.time() - t

    t = time.time()
    hg_cfg = dataclasses.replace(cfg.hourglass, codebook_size=cfg.vqgan.codebook_size, num_classes=0,
                                 text_dim=tokens.text_dim)
    meta = {k: tokens.meta.get(k) for k in ("grid", "codebook_size", "f", "tokenizer", "tokenizer_sha256",
                                            "image_size", "text_encoder")}
    meta["sampler"] = dataclasses.asdict(cfg.sampler)
    gen_path = train_generator(hg_cfg, cfg.generator_train, tokens, out / "generator", meta, tokenizer, device,
                               resume=True)
    pipe = SundaePipeline.from_pretrained(gen_path, device)
    net, meta = pipe.generator, pipe.meta
    seconds["generator"] = time.time() - t

    t = time.time()
    n, k = len(cfg.prompts), cfg.samples_per_prompt
    prompts = [p for p in cfg.prompts for _ in range(k)]  # k samples of each prompt in a row
    real = {caption: images[i][0] for i, caption in enumerate(images.captions)}
    blank = torch.ones(cfg.vqgan.in_channels, cfg.vqgan.resolution, cfg.vqgan.resolution)
    for name, scale in (("prompts", cfg.guidance_scale), ("prompts_unguided", (1.0, 1.0))):
        samples = pipe(n * k, prompt=prompts, guidance_scale=scale, sampler=cfg.sampler, seed=cfg.seed,
                       output_type="pt").images.view(n, k, *blank.shape)
        rows = [torch.cat([real.get(p, blank)[None], samples[i]]) for i, p in enumerate(cfg.prompts)]
        save_grid(torch.cat(rows), out / f"{name}.png", nrow=k + 1)
    atomic_write(out / "prompts.txt", lambda tmp: Path(tmp).write_text("\n".join(cfg.prompts) + "\n"))
    seconds["sampling"] = time.time() - t

    metrics = {
        "dataset": {"name": "Noto Color Emoji", "images": count, "image_size": cfg.vqgan.resolution},
        "text_encoder": meta["text_encoder"], "text_len": tokens.meta.get("text_len"),
        "generator": {"parameters": sum(p.numel() for p in net.parameters()),
                      "train_steps": cfg.generator_train.steps, "cond_dropout": cfg.generator_train.cond_dropout},
        "prompts": list(cfg.prompts), "guidance_scale": list(cfg.guidance_scale),
        "seconds": seconds, "seconds_total": time.time() - t_start,
        "device": str(device), "torch": torch.__version__, "threads": torch.get_num_threads(),
    }
    write_json(out / "metrics.json", metrics)
    return metrics
