"""Hourglass vs a flat transformer of the same width and depth: forward time and peak memory, side by side.

The flat baseline is what the hourglass replaces: the same `Block`s (same width, heads, MLP, 2D rotary),
as many of them as the hourglass has (pre + valley + post), all at full resolution, with the same
embedding and logits head. Both run one forward pass over a random `b h w` token grid, alternating
so that machine noise hits both alike. The hourglass saves compute because its valley blocks see
a quarter of the tokens (2x2 patches merged; McKinney & Willcocks section 3.2).

    python benchmarks/hourglass_vs_flat.py                 # ffhq256 width, grids 16, 32, 64, on the CPU
    python benchmarks/hourglass_vs_flat.py --device cuda --precision bf16 --batch 8

Prints a table and writes benchmarks/results/hourglass_vs_flat.json: a list of
{"grid": "32x32", "speedup": flat_seconds / hourglass_seconds, "memory_ratio": flat_peak / hourglass_peak, ...}.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from einops import rearrange
from torch import Tensor, nn

from common import DTYPES, RESULTS, environment, peak_memory, print_table, timed, write_json
from sundae.hourglass import PRESETS, Block, Hourglass, HourglassConfig, forward_flops, rotary_angles


class FlatTransformer(nn.Module):
    """`sum(cfg.depth)` hourglass `Block`s at full resolution: `b h w` tokens -> `b h w v` float32 logits."""

    def __init__(self, cfg: HourglassConfig):
        super().__init__()
        self.cfg = cfg
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(sum(cfg.depth)))
        self.norm = nn.LayerNorm(cfg.dim)
        self.to_logits = nn.Linear(cfg.dim, cfg.vocab_size)

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
    return batch * (sum(cfg.depth) * block + 2 * n * d * cfg.vocab_size)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="ffhq256", help=f"hourglass preset for width/depth: {', '.join(PRESETS)}")
    parser.add_argument("--grids", default="16,32,64", help="token grid sides, comma-separated")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--precision", choices=tuple(DTYPES), default="fp32")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS / "hourglass_vs_flat.json")
    args = parser.parse_args()

    torch.manual_seed(0)
    device = torch.device(args.device)
    cfg = PRESETS[args.preset]
    if cfg.num_classes:
        cfg = HourglassConfig(**{**cfg.__dict__, "num_classes": 0})
    models = {"hourglass": Hourglass(cfg).to(device).eval(), "flat": FlatTransformer(cfg).to(device).eval()}
    env = environment(device)
    print(f"{args.preset} width {cfg.dim}, {sum(cfg.depth)} blocks, batch {args.batch}, {args.precision}, "
          f"{env['device']}")
    rows = []
    for side in (int(g) for g in args.grids.split(",")):
        tokens = torch.randint(0, cfg.vocab_size, (args.batch, side, side), device=device)
        row = {"grid": f"{side}x{side}"}
        for name, model in models.items():
            def forward(model=model):
                with torch.inference_mode(), torch.autocast(device.type, DTYPES[args.precision],
                                                            enabled=args.precision != "fp32"):
                    return model(tokens)
            row[f"{name}_seconds"] = timed(forward, device, repeats=args.repeats)
            row[f"{name}_peak_bytes"] = peak_memory(forward, device)[1]
        row["hourglass_gflops"] = forward_flops(cfg, side, side, args.batch) / 1e9
        row["flat_gflops"] = flat_flops(cfg, side, side, args.batch) / 1e9
        row["speedup"] = row["flat_seconds"] / row["hourglass_seconds"]
        row["flops_ratio"] = row["flat_gflops"] / row["hourglass_gflops"]
        row["flat_peak_mib"], row["hourglass_peak_mib"] = row["flat_peak_bytes"] / 2**20, row["hourglass_peak_bytes"] / 2**20
        row["memory_ratio"] = row["flat_peak_bytes"] / max(row["hourglass_peak_bytes"], 1)
        row.update(preset=args.preset, batch=args.batch, precision=args.precision, device=env["device"])
        rows.append(row)
        print(f"  {row['grid']}: flat {row['flat_seconds']:.3f} s, hourglass {row['hourglass_seconds']:.3f} s")
    print()
    print_table(rows, [("grid", "grid", "s"), ("flat_seconds", "flat s", ".3f"),
                       ("hourglass_seconds", "hourglass s", ".3f"), ("speedup", "speedup", ".2f"),
                       ("flops_ratio", "FLOPs ratio", ".2f"), ("flat_peak_mib", "flat peak MiB", ".1f"),
                       ("hourglass_peak_mib", "hourglass peak MiB", ".1f"), ("memory_ratio", "memory ratio", ".2f")])
    write_json(args.out, rows)


if __name__ == "__main__":
    main()
