"""The megapixel (ffhq1024) code paths on a scaled-down copy: same f = 32, levels, codebook and grid logic."""

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import torch

from sundae.pipeline import class_logits_fn
from sundae.hourglass import PRESETS as HOURGLASS_PRESETS
from sundae.hourglass import Hourglass
from sundae.sundae import sample
from sundae.vqgan import PRESETS as VQGAN_PRESETS
from sundae.vqgan import VQGAN

ROOT = Path(__file__).resolve().parents[1]
# Narrow widths, everything else as in the paper's 1024x1024 configuration.
SMALL_VQ = dataclasses.replace(VQGAN_PRESETS["ffhq1024"], ch=8, resolution=128, attn_resolutions=(8,), z_channels=8,
                               embed_dim=8, norm_groups=4)
SMALL_NET = dataclasses.replace(HOURGLASS_PRESETS["ffhq1024"], dim=32, heads=2, head_dim=16)


def test_scaled_copy_keeps_the_megapixel_geometry():
    full = VQGAN_PRESETS["ffhq1024"]
    assert SMALL_VQ.f == full.f == 32 and SMALL_VQ.codebook_size == full.codebook_size == 8192
    assert full.resolution // full.f == 32  # 1024 pixels -> 32x32 tokens
    assert SMALL_NET.codebook_size == 8192 and SMALL_NET.depth == (2, 10, 2)


def test_round_trip_of_any_size_at_f32():
    torch.manual_seed(0)
    tokenizer = VQGAN(SMALL_VQ).eval()
    square = torch.rand(1, 3, 128, 128) * 2 - 1
    assert tokenizer.encode(square).shape == (1, 4, 4)
    odd = torch.rand(1, 3, 100, 74) * 2 - 1  # neither side a multiple of 32
    tokens = tokenizer.encode(odd)
    assert tokens.shape == (1, 4, 3)  # ceil(100/32), ceil(74/32)
    assert tokens.max() < 8192
    assert tokenizer.decode(tokens, size=(100, 74)).shape == odd.shape


def test_sample_and_decode_at_f32():
    torch.manual_seed(0)
    net, tokenizer = Hourglass(SMALL_NET).eval(), VQGAN(SMALL_VQ).eval()
    for precision in ("fp32", "bf16"):
        tokens, taken = sample(class_logits_fn(net, None, precision), (2, 4, 4), 8192, steps=3, min_steps=3,
                               generator=torch.Generator().manual_seed(0))
        assert tokens.shape == (2, 4, 4) and taken.tolist() == [3, 3]
        images = tokenizer.decode(tokens)
        assert images.shape == (2, 3, 128, 128) and images.abs().max() <= 1


def _script(tmp_path, name, *argv):
    out = tmp_path / f"{name}.json"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / f"{name}.py"), *argv, "--out", str(out)],
                   check=True, capture_output=True, text=True, timeout=300)
    return json.loads(out.read_text())


def test_benchmark_scripts_run_and_write_their_json(tmp_path):
    report = _script(tmp_path, "sampling", "--presets", "tiny", "--step-repeats", "1", "--full-steps", "2",
                     "--images", str(tmp_path / "images"), "--device", "cpu")
    (row,) = report["results"]
    assert row["preset"] == "tiny" and row["weights"] == "random" and row["grid"] == "8x8"
    assert row["step_s_b1"] > 0 and 0 < row["mfu_b8"] < 1.5 and report["peak_tflops"] > 0
    assert row["round_trip_size"] == "32x32"
    assert (tmp_path / "images" / "tiny_random_sample.png").is_file()
    rows = _script(tmp_path, "hourglass_vs_flat", "--preset", "tiny", "--grids", "4,8", "--repeats", "1",
                   "--device", "cpu")
    # Default shorten factors 2 and 4: one row per grid and factor (4x4 patches need a grid divisible by 4).
    assert [(r["grid"], r["shorten_factor"]) for r in rows] == [("4x4", 2), ("4x4", 4), ("8x8", 2), ("8x8", 4)]
    for r in rows:
        assert r["speedup"] == r["flat_seconds"] / r["hourglass_seconds"] and r["flops_ratio"] > 0
        assert r["train_speedup"] == r["flat_train_seconds"] / r["hourglass_train_seconds"]
        assert r["train_memory_ratio"] == r["flat_train_peak_bytes"] / max(r["hourglass_train_peak_bytes"], 1)
        assert r["hourglass_gflop_per_s"] == r["hourglass_gflops"] / r["hourglass_seconds"]
    # One flat measurement per grid, shared by its rows (the models were timed side by side).
    assert rows[0]["flat_seconds"] == rows[1]["flat_seconds"] != rows[2]["flat_seconds"]
    # Coarser patches leave fewer tokens in the valley: fewer FLOPs, at the same grid.
    assert rows[1]["hourglass_gflops"] < rows[0]["hourglass_gflops"] and rows[3]["hourglass_gflops"] < rows[2]["hourglass_gflops"]
