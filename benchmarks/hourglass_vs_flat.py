"""Hourglass vs a flat transformer of the same width and depth: time and peak memory, side by side.

The flat baseline is what the hourglass replaces: the same `Block`s (same width, heads, MLP, 2D rotary),
as many of them as the hourglass has (pre + valley + post), all at full resolution, with the same
embedding and logits head. All run the same random `b h w` token grid, their timed calls taken in turn
(flat, hourglass s=2, hourglass s=4, flat, ...) so that machine noise hits them alike, in two passes:
- inference: one forward pass under `torch.inference_mode` (what a sampling step costs);
- training: forward + backward of the token cross-entropy (every block's activations are kept).
The hourglass saves compute because its valley blocks see 1/s^2 of the tokens (s x s patches merged;
McKinney & Willcocks section 3.2). s = 2 is the paper's; the default `--shorten-factors 2,4` also
measures 4x4 patches. The "FLOPs ratio" (analytic, `forward_flops`) bounds the speedup unless the hourglass
also runs at a higher FLOP rate, which the per-model GFLOP/s in the JSON show.
The default run (3 timed forwards and 1 timed training pass per model and grid) takes about 8 minutes on
a 2-core CPU.

    python benchmarks/hourglass_vs_flat.py                 # ffhq256 width, grids 16, 32, 64, on the CPU
    python benchmarks/hourglass_vs_flat.py --device cuda --precision bf16 --batch 8

Prints a table and writes benchmarks/results/hourglass_vs_flat.json: a list of {"grid": "32x32",
"speedup": flat_seconds / hourglass_seconds, "memory_ratio": flat_peak / hourglass_peak, ...} for the
forward pass, plus "train_speedup" and "train_memory_ratio" for the training pass, "shorten_factor",
"flops_ratio" and each model's seconds, peak bytes and GFLOP/s.
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from common import DTYPES, RESULTS, environment, peak_memory, print_table, timed, write_json

from sundae.hourglass import PRESETS, Block, Hourglass, HourglassConfig, forward_flops, rotary_angles


class FlatTransformer(nn.Module):
    """`sum(cfg.depth)` hourglass `Block`s at full resolution: `b h w` tokens -> `b h w v` float32 logits."""

    def __init__(self, cfg: HourglassConfig):
        super().__init__()
        self.cfg = cfg
        self.token_embedding = nn.Embedding(cfg.codebook_size, cfg.dim)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(sum(cfg.depth)))
        self.norm = nn.LayerNorm(cfg.dim)
        self.to_logits = nn.Linear(cfg.dim, cfg.codebook_size)

    def forward(self, tokens: Tensor) -> Tensor:
        _, h, w = tokens.shape
        angles = rotary_angles(h, w, self.cfg.head_dim, self.cfg.rotary_base, device=tokens.device)
        x = rearrange(self.token_embedding(tokens), "b h w d -> b (h w) d")
        for block in self.blocks:
            x = block(x, angles)
        return rearrange(self.to_logits(self.norm(x)).float(), "b (h w) v -> b h w v", h=h)


def flat_flops(cfg: HourglassConfig, h: int, w: int, batch: int) -> int:
    """Matmul FLOPs of one `FlatTransformer` forward (same counting as `forward_flops`)."""
    d, inner, hidden, n = cfg.dim, cfg.heads * cfg.head_dim, cfg.mlp_ratio * cfg.dim, h * w
    block = 8 * n * d * inner + 4 * n * n * inner + 4 * n * d * hidden
    return batch * (sum(cfg.depth) * block + 2 * n * d * cfg.codebook_size)


def measure(models: dict, tokens: Tensor, device: torch.device, precision: str, repeats: int,
            train_repeats: int) -> dict:
    """Per model (name -> module): median seconds and peak memory growth (bytes) of an inference forward
    and of a training pass, measured side by side.

    Every model first runs each pass once untimed (warm-up), then once for its peak memory. The timed calls
    go round-robin (flat, hourglass, flat, ...) so that a slow spell of the machine hits every model alike.
    The training peak is measured with the weight gradients already allocated (zeroed in place, as in a
    training loop), so it is the memory of the activations kept for the backward pass and its temporaries.
    """
    autocast = lambda: torch.autocast(device.type, DTYPES[precision], enabled=precision != "fp32")  # noqa: E731

    def forward(model: nn.Module) -> Callable[[], Tensor]:
        def run() -> Tensor:
            with torch.inference_mode(), autocast():
                return model(tokens)
        return run

    def train(model: nn.Module) -> Callable[[], None]:
        def run() -> None:
            model.zero_grad(set_to_none=False)
            with autocast():
                loss = F.cross_entropy(model(tokens).flatten(0, -2), tokens.flatten())
            loss.backward()
        return run

    out: dict = {name: {"seconds": [], "train_seconds": []} for name in models}
    for name, model in models.items():
        forward(model)()
        train(model)()
        out[name]["peak_bytes"] = peak_memory(forward(model), device)[1]
        out[name]["train_peak_bytes"] = peak_memory(train(model), device)[1]  # gradients exist: activations only
    for key, make, count in (("seconds", forward, repeats), ("train_seconds", train, train_repeats)):
        for _ in range(count):
            for name, model in models.items():
                out[name][key].append(timed(make(model), device, repeats=1, warmup=0))
    for name, model in models.items():
        model.zero_grad(set_to_none=True)
        for key in ("seconds", "train_seconds"):
            times = sorted(out[name][key])
            out[name][key] = times[len(times) // 2]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="ffhq256", help=f"hourglass preset for width/depth: {', '.join(PRESETS)}")
    parser.add_argument("--grids", default="16,32,64", help="token grid sides, comma-separated")
    parser.add_argument("--shorten-factors", default="2,4",
                        help="hourglass patch sides s, comma-separated (2 = the paper's 2x2 patches)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--precision", choices=tuple(DTYPES), default="fp32")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=3, help="timed forward passes per model (median)")
    parser.add_argument("--train-repeats", type=int, default=1,
                        help="timed training passes per model (median; default 1, to keep the run under 10 minutes)")
    parser.add_argument("--out", type=Path, default=RESULTS / "hourglass_vs_flat.json")
    args = parser.parse_args()

    torch.manual_seed(0)
    device = torch.device(args.device)
    cfg = replace(PRESETS[args.preset], num_classes=0)
    factors = [int(s) for s in args.shorten_factors.split(",")]
    flat = FlatTransformer(cfg).to(device)
    hourglasses = {s: Hourglass(replace(cfg, shorten_factor=s)).to(device) for s in factors}
    env = environment(device)
    print(f"{args.preset} width {cfg.dim}, {sum(cfg.depth)} blocks, batch {args.batch}, {args.precision}, "
          f"{env['device']}")
    rows = []
    for side in (int(g) for g in args.grids.split(",")):
        tokens = torch.randint(0, cfg.codebook_size, (args.batch, side, side), device=device)
        models = {"flat": flat, **{s: hg for s, hg in hourglasses.items() if side % s == 0}}
        measured = measure(models, tokens, device, args.precision, args.repeats, args.train_repeats)
        base = measured.pop("flat")
        for s, hg in measured.items():
            hourglass = hourglasses[s]
            row = {"grid": f"{side}x{side}", "shorten_factor": s}
            row.update({f"flat_{k}": v for k, v in base.items()})
            row.update({f"hourglass_{k}": v for k, v in hg.items()})
            row["hourglass_gflops"] = forward_flops(hourglass.cfg, side, side, args.batch) / 1e9
            row["flat_gflops"] = flat_flops(cfg, side, side, args.batch) / 1e9
            row["flops_ratio"] = row["flat_gflops"] / row["hourglass_gflops"]
            for name in ("flat", "hourglass"):  # achieved rate: the speedup is the FLOPs ratio times their ratio
                row[f"{name}_gflop_per_s"] = row[f"{name}_gflops"] / row[f"{name}_seconds"]
            for pre in ("", "train_"):
                row[f"{pre}speedup"] = row[f"flat_{pre}seconds"] / row[f"hourglass_{pre}seconds"]
                row[f"{pre}memory_ratio"] = row[f"flat_{pre}peak_bytes"] / max(row[f"hourglass_{pre}peak_bytes"], 1)
                for name in ("flat", "hourglass"):
                    row[f"{name}_{pre}peak_mib"] = row[f"{name}_{pre}peak_bytes"] / 2**20
            row.update(preset=args.preset, batch=args.batch, precision=args.precision, device=env["device"])
            rows.append(row)
            print(f"  {row['grid']} s={s}: forward flat {row['flat_seconds']:.3f} s, hourglass "
                  f"{row['hourglass_seconds']:.3f} s; training flat {row['flat_train_seconds']:.3f} s, "
                  f"hourglass {row['hourglass_train_seconds']:.3f} s")
    print()
    print_table(rows, [("grid", "grid", "s"), ("shorten_factor", "s", "d"),
                       ("flat_seconds", "flat s", ".3f"), ("hourglass_seconds", "hourglass s", ".3f"),
                       ("speedup", "speedup", ".2f"), ("flops_ratio", "FLOPs ratio", ".2f"),
                       ("flat_peak_mib", "flat MiB", ".1f"), ("hourglass_peak_mib", "hourglass MiB", ".1f"),
                       ("memory_ratio", "memory ratio", ".2f"), ("train_speedup", "train speedup", ".2f"),
                       ("flat_train_peak_mib", "flat train MiB", ".0f"),
                       ("hourglass_train_peak_mib", "hourglass train MiB", ".0f"),
                       ("train_memory_ratio", "train memory ratio", ".2f")])
    write_json(args.out, rows)


if __name__ == "__main__":
    main()
