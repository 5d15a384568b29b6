"""Text-image agreement of an emoji text-to-image run, with and without classifier-free guidance (issue 7).

The measure: caption retrieval. For each of `--captions` captions of the emoji set (evenly spaced over the
font, so every block is represented) the generator draws `--per-caption` images from that caption alone.
Each sample is compared with all real emoji (mean squared pixel difference after a 2x2 average pool, which
forgives single-pixel token noise); the sample *agrees* with its caption when the caption's own emoji is
among the `k` nearest real emoji. top-1 and top-5 agreement are reported beside chance (k / N) and beside
the tokenizer's ceiling (the same retrieval for the tokenizer's reconstruction of the real emoji, i.e. what
a generator that reproduced each emoji exactly through this tokenizer would score).

Why this measure: the set has one image per caption, so "does the sample look like the emoji the text
names" is exactly the question, with no second model whose own errors would enter the number. Its limit:
the captions are training captions, so it measures how well the text picks out a known emoji (the
conditioning path and guidance), not generalisation to new captions.

    python benchmarks/emoji_agreement.py --run emoji_run        # a `sundae quickstart --dataset emoji` folder

Prints a table and writes benchmarks/results/emoji_agreement.json.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from common import RESULTS, device_name, print_table, write_json  # noqa: E402  (puts src/ on the path)

from sundae.data import ImageFolder
from sundae.images import save_grid
from sundae.pipeline import SundaePipeline
from sundae.sundae import SamplerConfig


def _features(images: torch.Tensor) -> torch.Tensor:
    return F.avg_pool2d(images.float(), 2).flatten(1)


def retrieval(samples: torch.Tensor, targets: torch.Tensor, real: torch.Tensor, k: int) -> float:
    """Share of `samples` (`b c H W`) whose target index (`b`) is among the `k` real images (`N c H W`) nearest
    by mean squared difference of 2x2-pooled pixels."""
    dist = torch.cdist(_features(samples), _features(real))
    nearest = dist.topk(k, largest=False).indices
    return (nearest == targets[:, None]).any(1).float().mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", required=True, help="an emoji quickstart folder (emoji/, tokenizer/, generator/)")
    parser.add_argument("--captions", type=int, default=200)
    parser.add_argument("--per-caption", type=int, default=2)
    parser.add_argument("--scales", default="1,2,3,5")
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device, run = torch.device(args.device), Path(args.run)
    pipe = SundaePipeline.from_pretrained(run, device)
    tokenizer = pipe.tokenizer
    folder = ImageFolder(run / "emoji", tokenizer.cfg.resolution, tokenizer.cfg.in_channels)
    real = torch.stack([folder[i][0] for i in range(len(folder))])
    n = len(real)
    picked = torch.linspace(0, n - 1, min(args.captions, n)).round().long()
    targets = picked.repeat_interleave(args.per_caption)
    captions = [folder.captions[i] for i in targets.tolist()]
    with torch.inference_mode():
        recon = torch.cat([tokenizer.decode(tokenizer.encode(real[i:i + 256].to(device))).cpu()
                           for i in range(0, n, 256)])
    ceiling = {k: retrieval(recon[picked], picked, real, k) for k in (1, 5)}
    rows = []
    for scale_text in args.scales.split(","):
        scale = float(scale_text)
        t = time.time()
        images = pipe(len(captions), prompt=captions, guidance_scale=scale, sampler=SamplerConfig(steps=args.steps),
                      seed=args.seed, batch_size=200, output_type="pt").images
        rows.append({"guidance_scale": scale, "top1": retrieval(images, targets, real, 1),
                     "top5": retrieval(images, targets, real, 5), "seconds": time.time() - t})
        save_grid(images[:80], run / f"agreement_samples_scale_{scale_text}.png", nrow=args.per_caption * 8)
        print(f"scale {scale:g}: top-1 {rows[-1]['top1']:.3f}, top-5 {rows[-1]['top5']:.3f}")
    print(f"{n} real emoji; chance top-1 {1 / n:.4f}, top-5 {5 / n:.4f}; tokenizer ceiling top-1 "
          f"{ceiling[1]:.3f}, top-5 {ceiling[5]:.3f}")
    print_table(rows, [("guidance_scale", "guidance scale", "g"), ("top1", "top-1 agreement", ".3f"),
                       ("top5", "top-5 agreement", ".3f"), ("seconds", "sampling s", ".0f")])
    write_json(RESULTS / "emoji_agreement.json", {
        "run": str(run), "real_images": n, "captions": len(picked), "samples_per_caption": args.per_caption,
        "sampling_steps": args.steps, "chance": {"top1": 1 / n, "top5": 5 / n},
        "tokenizer_ceiling": {"top1": ceiling[1], "top5": ceiling[5]}, "results": rows,
        "device": device_name(device), "torch": torch.__version__})


if __name__ == "__main__":
    main()
