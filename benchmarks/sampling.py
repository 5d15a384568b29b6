"""Sampling speed of the paper's configurations: seconds per step, per sample, per decode; peak memory; MFU.

For each preset (`tiny`, `ffhq256`, `ffhq1024`) it builds the hourglass generator and the VQ-GAN tokenizer
of the same name, with random weights unless `--generator`/`--tokenizer` checkpoints are given (the table
says which), and measures:

- parameters and analytic FLOPs of one sampling step (`sundae.hourglass.forward_flops`);
- seconds per sampling step at batch 1 and 8 (the SUNDAE sampler itself, no early stop);
- seconds for one full sample at T = `--full-steps` (100, no early stop) at batch `--full-batch`,
  decode included, and its peak memory; with a trained generator also with early stop (steps taken);
- the tokenizer round trip of a real photo (scikit-image's `retina`, cropped to the preset's resolution,
  and for ffhq1024 also the non-square `hubble_deep_field`, 872x1000, padded to f and cropped back);
- the MFU ratio: achieved FLOP/s of the sampling steps divided by this machine's peak FLOP/s, measured in
  the same run by a large matmul in the same dtype (`common.peak_matmul_flops`).

    python benchmarks/sampling.py                                  # CPU, fp32, all presets
    python benchmarks/sampling.py --device cuda --precision bf16 --full-batch 16
    python benchmarks/sampling.py --presets fashion --generator quickstart/generator/generator.pt

Prints a table, writes benchmarks/results/sampling.json and the decoded images (PNG) under --images.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from common import DTYPES, RESULTS, environment, peak_matmul_flops, peak_memory, print_table, timed, write_json
from sundae.checkpoint import load_generator, load_tokenizer
from sundae.pipeline import class_logits_fn
from sundae.hourglass import Hourglass, forward_flops
from sundae.hourglass import PRESETS as HOURGLASS_PRESETS
from sundae.images import save_image
from sundae.sundae import sample
from sundae.vqgan import PRESETS as VQGAN_PRESETS
from sundae.vqgan import VQGAN


def photo(name: str, size: tuple[int, int] | None) -> torch.Tensor:
    """A real photo from scikit-image as `1 3 H W` float in [-1, 1], centre-cropped to `size` if given
    (resized first, bicubic, when the photo is smaller than `size`)."""
    import skimage.data
    image = getattr(skimage.data, name)()[..., :3]
    if size is not None:
        top, left = (image.shape[0] - size[0]) // 2, (image.shape[1] - size[1]) // 2
        if top < 0 or left < 0:
            from PIL import Image
            side = max(size)
            image = np.asarray(Image.fromarray(image).resize((side, side), Image.BICUBIC))
            top, left = (side - size[0]) // 2, (side - size[1]) // 2
        image = image[top:top + size[0], left:left + size[1]]
    return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float() / 127.5 - 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", default="tiny,ffhq256,ffhq1024")
    parser.add_argument("--generator", help="trained generator checkpoint (only with a single preset)")
    parser.add_argument("--tokenizer", help="trained tokenizer checkpoint; default with --generator: the one it "
                        "was trained with")
    parser.add_argument("--precision", choices=tuple(DTYPES), default="fp32")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--step-batches", default="1,8", help="batch sizes for the per-step timing")
    parser.add_argument("--step-repeats", type=int, default=2, help="timed sampler steps per batch size")
    parser.add_argument("--full-steps", type=int, default=100, help="T of the full sample (no early stop)")
    parser.add_argument("--full-batch", type=int, default=1, help="batch of the full sample")
    parser.add_argument("--compile", action="store_true", help="torch.compile the generator")
    parser.add_argument("--out", type=Path, default=RESULTS / "sampling.json")
    parser.add_argument("--images", type=Path, default=RESULTS / "images")
    args = parser.parse_args()
    presets = args.presets.split(",")
    if (args.generator or args.tokenizer) and len(presets) != 1:
        parser.error("--generator/--tokenizer need exactly one preset in --presets")

    device = torch.device(args.device)
    dtype = DTYPES[args.precision]
    env = environment(device)
    peak = peak_matmul_flops(device, dtype)
    print(f"{env['device']}, {args.precision}: peak matmul {peak / 1e12:.3f} TFLOP/s")
    rows = []
    for name in presets:
        torch.manual_seed(0)
        gen = torch.Generator(device).manual_seed(0)
        if args.generator:
            net, meta = load_generator(args.generator, device)
            grid = tuple(meta["grid"])
        else:
            net = Hourglass(HOURGLASS_PRESETS[name]).to(device).eval()
        tokenizer_path = args.tokenizer or (meta.get("tokenizer") if args.generator else None)
        tokenizer = (load_tokenizer(tokenizer_path, device) if tokenizer_path
                     else VQGAN(VQGAN_PRESETS[name]).to(device).eval())
        vq = tokenizer.cfg
        if not args.generator:
            grid = (vq.resolution // vq.f, vq.resolution // vq.f)
        labels = torch.zeros(max(args.full_batch, *map(int, args.step_batches.split(","))), dtype=torch.long,
                             device=device) if net.cfg.num_classes else None
        logits_fn = class_logits_fn(net, labels, args.precision, args.compile)
        row = {"preset": name, "weights": "trained" if args.generator else "random",
               "params_m": sum(p.numel() for p in net.parameters()) / 1e6,
               "grid": f"{grid[0]}x{grid[1]}", "image": f"{grid[0] * vq.f}x{grid[1] * vq.f}",
               "gflops_per_step": forward_flops(net.cfg, *grid) / 1e9}
        print(f"{name}: {row['params_m']:.1f}M parameters, {row['gflops_per_step']:.1f} GFLOP per step at batch 1")

        def run(batch: int, steps: int, min_steps: int) -> tuple[torch.Tensor, torch.Tensor]:
            return sample(logits_fn, (batch, *grid), net.cfg.codebook_size, steps=steps, min_steps=min_steps,
                          temperature=(1.0, 0.7), generator=gen, device=device)

        for b in map(int, args.step_batches.split(",")):
            r = args.step_repeats
            seconds = timed(lambda: run(b, r, r), device, repeats=1, warmup=1) / r
            row[f"step_s_b{b}"] = seconds
            row[f"mfu_b{b}"] = row["gflops_per_step"] * 1e9 * b / seconds / peak
            print(f"  step at batch {b}: {seconds:.3f} s, MFU {row[f'mfu_b{b}']:.2f}")

        def full() -> tuple[torch.Tensor, torch.Tensor, float, float]:
            t0 = time.perf_counter()
            tokens, taken = run(args.full_batch, args.full_steps, args.full_steps)
            t1 = time.perf_counter()
            with torch.inference_mode():
                images = tokenizer.decode(tokens).float().cpu()
            return images, taken, t1 - t0, time.perf_counter() - t1

        (images, _, sample_s, decode_s), peak_bytes = peak_memory(full, device)
        row.update(full_batch=args.full_batch, full_steps=args.full_steps, sample_s=sample_s, decode_s=decode_s,
                   seconds_per_image=(sample_s + decode_s) / args.full_batch, sample_peak_gib=peak_bytes / 2**30)
        save_image(images[0], args.images / f"{name}_{row['weights']}_sample.png")
        print(f"  full sample T={args.full_steps} batch {args.full_batch}: {sample_s:.2f} s + decode {decode_s:.2f} s, "
              f"peak {row['sample_peak_gib']:.2f} GiB")
        if args.generator:
            t0 = time.perf_counter()
            _, taken = run(args.full_batch, args.full_steps, 10)
            row.update(early_stop_s=time.perf_counter() - t0, early_stop_mean_steps=taken.float().mean().item())
            print(f"  with early stop (min_steps 10): {row['early_stop_s']:.2f} s, "
                  f"{row['early_stop_mean_steps']:.1f} steps taken on average")

        for photo_name, size in [("retina", (vq.resolution, vq.resolution))] + (
                [("hubble_deep_field", None)] if name == "ffhq1024" else []):
            x = photo(photo_name, size).to(device)
            if vq.in_channels == 1:
                x = x.mean(1, keepdim=True)

            def round_trip(x: torch.Tensor = x) -> tuple[torch.Tensor, float, float]:
                with torch.inference_mode():
                    t0 = time.perf_counter()
                    tokens = tokenizer.encode(x)
                    t1 = time.perf_counter()
                    out = tokenizer.decode(tokens, size=tuple(x.shape[-2:]))
                    return out, t1 - t0, time.perf_counter() - t1

            (out, enc_s, dec_s), rt_bytes = peak_memory(round_trip, device)
            if out.shape != x.shape:
                raise AssertionError(f"round trip changed the size: {tuple(x.shape)} -> {tuple(out.shape)}")
            key = "round_trip" if photo_name == "retina" else "non_square"
            row.update({f"{key}_size": f"{x.shape[-2]}x{x.shape[-1]}", f"{key}_encode_s": enc_s,
                        f"{key}_decode_s": dec_s, f"{key}_peak_gib": rt_bytes / 2**30})
            save_image(out[0].float().cpu(), args.images / f"{name}_{photo_name}_round_trip.png")
            print(f"  round trip {x.shape[-2]}x{x.shape[-1]}: encode {enc_s:.2f} s, decode {dec_s:.2f} s, "
                  f"peak {rt_bytes / 2**30:.2f} GiB")
        row.update(precision=args.precision, device=env["device"], peak_tflops=peak / 1e12)
        rows.append(row)
        net = tokenizer = logits_fn = None  # free this preset's weights before the next one is built
        if device.type == "cuda":
            torch.cuda.empty_cache()

    print()
    batches = args.step_batches.split(",")
    print_table(rows, [("preset", "preset", "s"), ("weights", "weights", "s"), ("params_m", "params M", ".1f"),
                       ("gflops_per_step", "GFLOP/step", ".1f")]
                + [(f"step_s_b{b}", f"s/step b{b}", ".3f") for b in batches]
                + [(f"mfu_b{b}", f"MFU b{b}", ".2f") for b in batches]
                + [("seconds_per_image", f"s/image T={args.full_steps}", ".2f"), ("decode_s", "decode s", ".2f"),
                   ("early_stop_s", "early-stop s", ".2f"), ("early_stop_mean_steps", "steps taken", ".1f"),
                   ("sample_peak_gib", "peak GiB", ".2f"), ("round_trip_peak_gib", "round trip GiB", ".2f")])
    write_json(args.out, {"environment": env, "precision": args.precision, "peak_tflops": peak / 1e12,
                          "compile": args.compile, "results": rows})


if __name__ == "__main__":
    main()
