"""Generator training throughput: tokens/s and MFU for the tiny and ffhq256 presets, and 1 vs 2 processes.

    python benchmarks/training.py            # a few minutes on a 2-core CPU
    python benchmarks/training.py --device cuda --presets tiny,ffhq256,ffhq1024

MFU = achieved FLOP/s / peak FLOP/s, both measured in this run: the peak is a large square matmul in the
training dtype (fp32 on CPU, bf16 on CUDA); the achieved figure is the matmul/attention FLOPs of one
training step (forward + backward of the unrolled loss, counted by torch.utils.flop_counter with the math
attention backend, whose matmuls it sees; the fused CPU attention kernel it does not count) times the
measured steps per second (forward, backward, AdamW step and EMA update). The 1-vs-2-process comparison runs
the real `train_generator` under `torchrun --standalone` with gloo (NCCL on CUDA): on CPU one process with
all cores, one process with one core, and two processes with half the cores each; it reads tokens/s from
each run's log.jsonl. On a machine shared with other jobs, threads that spin while waiting for a busy core
make the multi-threaded figures erratic. Prints a table and writes
benchmarks/results/training.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from common import peak_matmul_flops, write_json
from sundae.hourglass import PRESETS as HG
from sundae.hourglass import Hourglass
from sundae.sundae import unrolled_loss
from sundae.train import GENERATOR_TRAIN_PRESETS, autocast

ROOT = Path(__file__).resolve().parents[1]
# preset -> (token grid side, batch on CPU, batch on CUDA)
SHAPES = {"tiny": (16, 16, 256), "ffhq256": (16, 2, 64), "ffhq1024": (32, 1, 8)}


def measure_preset(name: str, device: torch.device, precision: str, steps: int) -> dict:
    """Time `steps` training steps of generator preset `name` (after one warm-up step) at its benchmark shape."""
    side, cpu_batch, cuda_batch = SHAPES[name]
    batch = cuda_batch if device.type == "cuda" else cpu_batch
    cfg, train = HG[name], GENERATOR_TRAIN_PRESETS[name]
    torch.manual_seed(0)
    net = Hourglass(cfg).to(device)
    ema = [p.detach().clone() for p in net.parameters()]
    opt = torch.optim.AdamW(net.parameters(), lr=train.lr, weight_decay=train.weight_decay)
    tokens = torch.randint(0, cfg.codebook_size, (batch, side, side), device=device)
    labels = torch.randint(0, max(cfg.num_classes, 1), (batch,), device=device) if cfg.num_classes else None

    def step() -> None:
        with autocast(device, precision):
            loss, _ = unrolled_loss(lambda z: net(z, labels), tokens, cfg.codebook_size, train.unroll_steps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            torch._foreach_lerp_(ema, [p.detach() for p in net.parameters()], 1 - train.ema_decay)

    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        with autocast(device, precision):
            loss, _ = unrolled_loss(lambda z: net(z, labels), tokens, cfg.codebook_size, train.unroll_steps)
        loss.backward()
    flops = counter.get_total_flops()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    step()  # warm-up
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    seconds = (time.perf_counter() - t0) / steps
    result = {"preset": name, "params_m": sum(p.numel() for p in net.parameters()) / 1e6, "batch": batch,
              "grid": [side, side], "unroll_steps": train.unroll_steps, "precision": precision,
              "flops_per_step": flops, "seconds_per_step": seconds, "tokens_per_s": batch * side * side / seconds,
              "achieved_flops": flops / seconds}
    if device.type == "cuda":
        result["max_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2 ** 30
    return result


def measure_processes(world: int, threads: int, device: torch.device, steps: int, batch: int, workdir: Path) -> dict:
    """tokens/s of `train_generator` (tiny preset, 8x8 tokens, global batch `batch`) under torchrun with
    `world` processes of `threads` threads each."""
    tokens = workdir / "tokens"
    if not tokens.is_dir():
        tokens.mkdir(parents=True)
        rng = np.random.default_rng(0)
        np.save(tokens / "tokens.npy", rng.integers(0, 64, (4 * batch, 8, 8)).astype(np.uint16))
        np.save(tokens / "labels.npy", rng.integers(0, 10, 4 * batch).astype(np.int64))
        (tokens / "meta.json").write_text(json.dumps({"grid": [8, 8], "codebook_size": 64, "num_classes": 10}))
    out = workdir / f"run_{world}x{threads}"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "TQDM_DISABLE": "1", "OMP_NUM_THREADS": str(threads)}
    cmd = [str(Path(sys.executable).with_name("torchrun")), "--standalone", f"--nproc_per_node={world}", "-m",
           "sundae", "train", "--tokens", str(tokens), "--out", str(out), "--preset", "tiny", "--device", device.type,
           "--set", f"steps={steps}", "--set", f"batch_size={batch}", "--set", f"log_every={steps}",
           "--set", "sample_every=1000000", "--set", "save_every=1000000"]
    subprocess.run(cmd, env=env, check=True, capture_output=True, timeout=900)
    record = json.loads((out / "log.jsonl").read_text().splitlines()[-1])
    return {"processes": world, "threads_per_process": threads, "global_batch": batch, "steps": steps,
            "tokens_per_s": record["tokens_per_s"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--presets", default="tiny,ffhq256")
    parser.add_argument("--steps", type=int, default=2, help="timed steps per preset (after one warm-up)")
    parser.add_argument("--process-steps", type=int, default=100, help="steps of each 1- and 2-process run")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "training.json"))
    args = parser.parse_args()
    device = torch.device(args.device)
    precision = "bf16" if device.type == "cuda" else "fp32"
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    peak = peak_matmul_flops(device, dtype)
    presets = [measure_preset(name, device, precision, args.steps) for name in args.presets.split(",")]
    peak = max(peak, peak_matmul_flops(device, dtype))  # before and after: the best the machine showed in this run
    for r in presets:
        r["mfu"] = r["achieved_flops"] / peak
    # (processes, threads each): on CPU all cores in one process, one core in one process, and the cores
    # split over 2 processes; on CUDA one GPU per process.
    cpus = os.cpu_count() or 1
    if device.type == "cpu":
        layouts = [(1, cpus), (1, 1), (2, max(1, cpus // 2))]
    else:
        layouts = [(1, 1), (2, 1)] if torch.cuda.device_count() >= 2 else [(1, 1)]
    with tempfile.TemporaryDirectory() as tmp:
        scaling = [measure_processes(w, t, device, args.process_steps, 32, Path(tmp)) for w, t in layouts]
    speedup = scaling[-1]["tokens_per_s"] / scaling[0]["tokens_per_s"] if len(scaling) > 1 else None
    speedup_1_core = scaling[-1]["tokens_per_s"] / scaling[1]["tokens_per_s"] if len(scaling) > 2 else None

    print(f"peak {precision} matmul: {peak / 1e9:.1f} GFLOP/s on {device} ({os.cpu_count()} CPUs)")
    print(f"{'preset':<10}{'params M':>10}{'batch':>7}{'grid':>7}{'GFLOP/step':>12}{'s/step':>9}"
          f"{'tokens/s':>11}{'MFU':>8}")
    for r in presets:
        print(f"{r['preset']:<10}{r['params_m']:>10.1f}{r['batch']:>7}{r['grid'][0]:>5}^2"
              f"{r['flops_per_step'] / 1e9:>12.1f}"
              f"{r['seconds_per_step']:>9.3f}{r['tokens_per_s']:>11.0f}{r['mfu']:>8.3f}")
    for s in scaling:
        print(f"train_generator tiny, {s['processes']} process(es) x {s['threads_per_process']} thread(s): "
              f"{s['tokens_per_s']:.0f} tokens/s")
    if speedup is not None:
        print(f"2 processes / 1 process with all cores: {speedup:.2f}x")
    if speedup_1_core is not None:
        print(f"2 processes / 1 process with one core: {speedup_1_core:.2f}x")
    result = {"machine": {"device": str(device), "cpus": os.cpu_count(), "platform": platform.platform(),
                          "torch": torch.__version__,
                          "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None},
              "peak_flops": peak, "precision": precision, "presets": presets, "processes": scaling,
              "speedup_2_vs_1": speedup, "speedup_2_vs_1_one_core": speedup_1_core, "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
    write_json(Path(args.out), result)


if __name__ == "__main__":
    main()
