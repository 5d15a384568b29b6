"""SUNDAE against MaskGIT-style and autoregressive sampling on Fashion-MNIST, at equal CPU training time.

    python benchmarks/quality.py                          # the published run, < 60 min on a quiet 2-core CPU
    python benchmarks/quality.py --tokenizer RUN/tokenizer/tokenizer.pt   # reuse a trained `fashion` tokenizer
    python benchmarks/quality.py --smoke                  # everything, tiny, in about a minute

What it does, in order:
1. The judge: the quickstart's `SmallClassifier`, trained on the real training set. Its penultimate features
   define the classifier-FID (an Inception-free FID for 32x32 grayscale images); its predictions give the
   class accuracy of class-conditional samples.
2. The tokenizer: the `fashion` VQ-GAN preset trained as `sundae quickstart` trains it (or `--tokenizer`),
   and the training set encoded to 8x8 tokens of 256 codes.
3. Six generators on those tokens, each trained for the SAME CPU time (`time.process_time`, so other jobs on
   the machine do not change what a model gets) with the same optimizer (AdamW, lr 1e-3 with 50 warm-up
   steps, weight decay 0.01, clip 1.0, batch 64, EMA 0.99: the quickstart's `fashion` settings), with about
   the same number of parameters: SUNDAE (unroll 2, the main model), SUNDAE unroll 1 and 3, SUNDAE with
   the original 1D shortening, MaskGIT-style (same hourglass, + a [MASK] id) and a flat causal transformer
   (autoregressive, its depth chosen to match the hourglass's parameter count). See `baselines.py`.
4. Samples: `--samples` class-balanced images per setting (default 500), EMA weights. SUNDAE and MaskGIT at
   T = 4, 8, 16, 32, 64, 100; the autoregressive model at its fixed 64 steps (one per token, KV cache).
   SUNDAE runs with the paper's FFHQ schedule (temperature 0.8, update proportion 0.5, early stop after
   10 steps), and at T = 4, 8, 16 also with the update proportion falling 1.0 -> 0.5 (with 0.5 throughout, a
   token is never updated in T steps with probability 0.5^T, so few-step samples keep random tokens; at
   larger T the two agree). Ablations at T = 32: unroll 1/2/3, 1D vs 2D shortening; early stop off vs on
   at T = 100, where it can save the most.
   Sampling is most of the run's time, so the sample count and the ablation T values are chosen to leave
   the six models about 10 CPU minutes of training each within the 55-minute default.
5. Metrics per setting: classifier-FID against the whole test split, class accuracy, k-NN precision and
   recall (k = 3), network calls per image, and wall-clock and CPU seconds per image of sampling (the
   tokenizer decode, the same for every method, is not included). Reference rows: real training images and
   the tokenizer's reconstructions of them, the same number as the samples: the floor a generator over
   these tokens can reach.

The training budget: `--train-cpu-minutes` per model, or derived from `--budget-minutes` (the whole run's
wall-clock target): what is left after the fixed stages and the estimated sampling time, split over the
six models, converted to CPU time at the CPU/wall ratio measured so far. Prints one table, writes
`--out` (JSON, default benchmarks/results/quality.json) and a PNG plot beside it.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

# Idle OpenMP threads sleep instead of spinning: on a machine shared with other jobs, spinning threads burn
# CPU time that `time.process_time` would charge to the model's training budget. Must precede `import torch`.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
from torch import Tensor, nn  # noqa: E402

from common import RESULTS, environment, print_table, write_json
from baselines import (Autoregressive, MaskGIT, autoregressive_loss, autoregressive_sample, mask_schedule,
                       maskgit_sample, masked_token_loss, matching_layers)
from plotting import Panel, save_panels
from sundae.checkpoint import load_tokenizer
from sundae.pipeline import class_logits_fn
from sundae.data import FASHION_MNIST_DIR, IdxImages
from sundae.eval.classifier import predict, train_classifier
from sundae.eval.metrics import classifier_features, frechet_distance, precision_recall
from sundae.hourglass import Hourglass
from sundae.hourglass import PRESETS as HOURGLASS_PRESETS
from sundae.sundae import sample, unrolled_loss
from sundae.tokens import encode_dataset
from sundae.train import VQGAN_TRAIN_PRESETS, train_vqgan
from sundae.vqgan import PRESETS as VQGAN_PRESETS
from sundae.vqgan import VQGAN

NUM_CLASSES = 10


@dataclasses.dataclass(frozen=True)
class Settings:
    """Sizes of one run; `smoke` shrinks every one of them."""

    train_images: int = 0  # 0: the whole split
    test_images: int = 0
    classifier_epochs: int = 2
    tokenizer_steps: int = VQGAN_TRAIN_PRESETS["fashion"].steps
    samples: int = 500
    sample_batch: int = 250
    steps: tuple[int, ...] = (4, 8, 16, 32, 64, 100)
    falling_update_steps: tuple[int, ...] = (4, 8, 16)  # T for SUNDAE with update proportion 1.0 -> 0.5
    ablation_steps: int = 32  # T for the unroll and shortening ablations
    no_early_stop_steps: tuple[int, ...] = (100,)  # T for the early stop off rows
    batch_size: int = 64
    lr: float = 1e-3
    warmup: int = 50
    ema_decay: float = 0.99


SMOKE = Settings(train_images=1000, test_images=200, classifier_epochs=1, tokenizer_steps=20, samples=20,
                 sample_batch=20, steps=(4, 12), falling_update_steps=(4, 12), ablation_steps=4,
                 no_early_stop_steps=(12,), warmup=5,
                 ema_decay=0.9)
SMOKE_TRAIN_CPU_SECONDS = 1.0  # per model


# ---- training at a fixed CPU budget --------------------------------------------------------------------

def train_for(net: nn.Module, loss_fn: Callable[[nn.Module, Tensor, Tensor, torch.Generator], Tensor],
              tokens: Tensor, labels: Tensor, cpu_seconds: float, s: Settings, seed: int) -> tuple[nn.Module, dict]:
    """Train `net` until `cpu_seconds` of process CPU time are spent; returns (EMA copy in eval mode, stats).

    tokens `N h w` int64, labels `N` int64; `loss_fn(net, tokens, labels, generator)` -> scalar.
    """
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(net.parameters(), lr=s.lr, weight_decay=0.01)
    ema = copy.deepcopy(net).requires_grad_(False)
    losses, step = [], 0
    cpu0, wall0 = time.process_time(), time.perf_counter()
    net.train()
    while time.process_time() - cpu0 < cpu_seconds:
        idx = torch.randint(0, len(tokens), (s.batch_size,), generator=gen)
        for group in opt.param_groups:
            group["lr"] = s.lr * min(1.0, (step + 1) / s.warmup)
        loss = loss_fn(net, tokens[idx], labels[idx], gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            for e, p in zip(ema.parameters(), net.parameters()):
                e.lerp_(p, 1 - s.ema_decay)
        losses.append(loss.item())
        step += 1
    tail = losses[-20:] or [float("nan")]
    return ema.eval(), {"train_steps": step, "train_cpu_s": time.process_time() - cpu0,
                        "train_wall_s": time.perf_counter() - wall0, "final_loss": statistics.fmean(tail),
                        "params": sum(p.numel() for p in net.parameters())}


def sundae_loss(unroll: int, codebook_size: int):
    return lambda net, z, y, g: unrolled_loss(lambda x: net(x, y), z, codebook_size, unroll, g)[0]


def maskgit_loss(codebook_size: int):
    return lambda net, z, y, g: masked_token_loss(lambda x: net(x, y), z, codebook_size, g)


def ar_loss(net, z, y, g):
    return autoregressive_loss(net, z, y)


# ---- sampling settings -----------------------------------------------------------------------------------

def sundae_sampler(steps: int, update: tuple[float, float], early_stop: bool = True):
    def run(net, labels, gen, grid):
        z, taken = sample(class_logits_fn(net, labels), (len(labels), *grid), net.cfg.codebook_size, steps=steps,
                          temperature=(0.8, 0.8), update_proportion=update,
                          min_steps=10 if early_stop else steps, generator=gen)
        return z, taken.float().sum().item()
    return run


def maskgit_sampler(steps: int):
    def run(net, labels, gen, grid):
        z, calls = maskgit_sample(lambda x: net(x, labels), (len(labels), *grid), net.codebook_size, steps,
                                  generator=gen)
        return z, float(calls * len(labels))
    return run


def ar_sampler(net, labels, gen, grid):
    return autoregressive_sample(net, len(labels), labels, generator=gen), float(grid[0] * grid[1] * len(labels))


@torch.inference_mode()
def generate(run: Callable, net: nn.Module, tokenizer: VQGAN, labels: Tensor, batch: int, grid: tuple[int, int],
             seed: int) -> tuple[Tensor, dict]:
    """Sample tokens for `labels` in batches, decode them; returns (images `b 1 H W`, timing stats)."""
    gen = torch.Generator().manual_seed(seed)
    tokens, calls, wall, cpu = [], 0.0, 0.0, 0.0
    for i in range(0, len(labels), batch):
        w0, c0 = time.perf_counter(), time.process_time()
        z, c = run(net, labels[i:i + batch], gen, grid)
        wall, cpu, calls = wall + time.perf_counter() - w0, cpu + time.process_time() - c0, calls + c
        tokens.append(z)
    images = torch.cat([tokenizer.decode(z) for z in tokens]).clamp(-1, 1)
    n = len(labels)
    return images, {"steps_per_image": calls / n, "s_per_image": wall / n, "cpu_s_per_image": cpu / n}


def judge_row(images: Tensor, labels: Tensor, judge: nn.Module, real_feats: Tensor) -> dict:
    """Classifier-FID against `real_feats`, class accuracy, k-NN precision and recall of `b 1 H W` images."""
    feats = classifier_features(judge, images)
    precision, recall = precision_recall(real_feats, feats, k=3)
    accuracy = (predict(judge, images) == labels).float().mean().item()
    return {"cfid": frechet_distance(feats, real_feats), "accuracy": accuracy, "precision": precision,
            "recall": recall}


# ---- the run ---------------------------------------------------------------------------------------------

def _subset(ds: IdxImages, limit: int) -> IdxImages:
    if limit:
        ds.images, ds.labels = ds.images[:limit], ds.labels[:limit]
    return ds


def plan(s: Settings) -> list[dict]:
    """Every sampling setting: (model, sampler, labels for the table)."""
    rows = []
    for update, tag, steps in (((0.5, 0.5), "p 0.5", s.steps), ((1.0, 0.5), "p 1.0->0.5", s.falling_update_steps)):
        rows += [{"model": "sundae", "method": f"SUNDAE ({tag})", "T": t, "sampler": sundae_sampler(t, update),
                  "group": "curve"} for t in steps]
    rows += [{"model": "maskgit", "method": "MaskGIT-style", "T": t, "sampler": maskgit_sampler(t), "group": "curve"}
             for t in s.steps]
    rows.append({"model": "ar", "method": "autoregressive", "T": 64, "sampler": ar_sampler, "group": "curve"})
    for model, method in (("sundae_u1", "SUNDAE unroll 1"), ("sundae_u3", "SUNDAE unroll 3"),
                          ("sundae_1d", "SUNDAE 1D shortening")):
        rows.append({"model": model, "method": f"{method} (p 0.5)", "T": s.ablation_steps, "group": "ablation",
                     "sampler": sundae_sampler(s.ablation_steps, (0.5, 0.5))})
    for t in s.no_early_stop_steps:
        rows.append({"model": "sundae", "method": "SUNDAE no early stop (p 0.5)", "T": t, "group": "ablation",
                     "sampler": sundae_sampler(t, (0.5, 0.5), early_stop=False)})
    return rows


def estimated_calls(s: Settings, grid: tuple[int, int]) -> float:
    """Hourglass forward passes (batch `sample_batch`) the sampling plan makes, at most; the AR model's
    single-token steps count as a quarter of one."""
    n = grid[0] * grid[1]
    sundae = sum(s.steps) + sum(s.falling_update_steps) + 3 * s.ablation_steps + sum(s.no_early_stop_steps)
    maskgit = sum(sum(1 for a, b in zip([n] + mask_schedule(n, t), mask_schedule(n, t)) if b < a) for t in s.steps)
    return (sundae + maskgit + n / 4) * math.ceil(s.samples / s.sample_batch)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=str(FASHION_MNIST_DIR), help="folder with the Fashion-MNIST idx files")
    p.add_argument("--tokenizer", help="a trained `fashion` tokenizer checkpoint (tokenizer.pt) to reuse")
    p.add_argument("--budget-minutes", type=float, default=55.0,
                   help="wall-clock target for the whole run; sets the training budget (default 55)")
    p.add_argument("--train-cpu-minutes", type=float,
                   help="CPU minutes per model (overrides --budget-minutes; smoke: 2 CPU seconds)")
    p.add_argument("--samples", type=int, help="samples per setting (default 500; smoke 20)")
    p.add_argument("--smoke", action="store_true", help="tiny sizes: runs everything in about a minute")
    p.add_argument("--work", help="folder for the tokenizer run (default: a new temporary folder)")
    p.add_argument("--out", help="result JSON (default benchmarks/results/quality.json; smoke: in --work)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    wall_start, cpu_start = time.perf_counter(), time.process_time()
    s = SMOKE if args.smoke else Settings()
    if args.samples:
        s = dataclasses.replace(s, samples=args.samples, sample_batch=min(s.sample_batch, args.samples))
    if s.samples % NUM_CLASSES or s.samples < 10:
        raise SystemExit(f"--samples must be a positive multiple of {NUM_CLASSES}, got {s.samples}")
    work = Path(args.work or tempfile.mkdtemp(prefix="sundae_quality_"))
    out = Path(args.out) if args.out else (work / "quality.json" if args.smoke else RESULTS / "quality.json")
    device = torch.device("cpu")
    torch.manual_seed(args.seed)
    seconds: dict[str, float] = {}

    def stage(name: str, t0: float) -> None:
        seconds[name] = time.perf_counter() - t0
        print(f"[{time.perf_counter() - wall_start:6.0f} s] {name}: {seconds[name]:.0f} s", flush=True)

    t = time.perf_counter()
    train = _subset(IdxImages(args.data, "train", 32), s.train_images)
    test = _subset(IdxImages(args.data, "test", 32), s.test_images)
    judge = train_classifier(train.images, train.labels, NUM_CLASSES, s.classifier_epochs, seed=args.seed,
                             progress=False)
    judge_accuracy = (predict(judge, test.images) == test.labels).float().mean().item()
    real_feats = classifier_features(judge, test.images)
    stage("classifier", t)

    t = time.perf_counter()
    if args.tokenizer:
        tok_path = Path(args.tokenizer)
    else:
        train_cfg = dataclasses.replace(VQGAN_TRAIN_PRESETS["fashion"], steps=s.tokenizer_steps,
                                        sample_every=max(1, s.tokenizer_steps), save_every=max(1, s.tokenizer_steps))
        tok_path = train_vqgan(VQGAN_PRESETS["fashion"], train_cfg, train, work / "tokenizer", device, resume=True,
                               progress=False)
    tokenizer = load_tokenizer(tok_path, device)
    with torch.inference_mode():
        tokens_np, labels_np = encode_dataset(tokenizer, train, 500, device, progress=False)
    tokens, labels = torch.from_numpy(tokens_np.astype("int64")), torch.from_numpy(labels_np)
    grid = tuple(tokens.shape[1:])
    codebook_size = tokenizer.cfg.codebook_size
    stage("tokenizer", t)

    # Reference rows: the same number of real training images, and the tokenizer's reconstructions of them.
    ref_idx = torch.randperm(len(tokens), generator=torch.Generator().manual_seed(args.seed))[:s.samples]
    with torch.inference_mode():
        recon = torch.cat([tokenizer.decode(tokens[ref_idx[i:i + 500]]) for i in range(0, len(ref_idx), 500)])
    rows: list[dict[str, Any]] = [
        {"method": "data: real train images", "group": "reference", **judge_row(train.images[ref_idx],
                                                                                 labels[ref_idx], judge, real_feats)},
        {"method": "tokenizer reconstructions", "group": "reference", **judge_row(recon.clamp(-1, 1), labels[ref_idx],
                                                                                   judge, real_feats)}]

    base = dataclasses.replace(HOURGLASS_PRESETS["fashion"], codebook_size=codebook_size, num_classes=NUM_CLASSES)
    ar_layers = matching_layers(base, grid)
    models: dict[str, tuple[Callable[[], nn.Module], Callable]] = {
        "sundae": (lambda: Hourglass(base), sundae_loss(2, codebook_size)),
        "sundae_u1": (lambda: Hourglass(base), sundae_loss(1, codebook_size)),
        "sundae_u3": (lambda: Hourglass(base), sundae_loss(3, codebook_size)),
        "sundae_1d": (lambda: Hourglass(dataclasses.replace(base, shorten_mode="1d")), sundae_loss(2, codebook_size)),
        "maskgit": (lambda: MaskGIT(base), maskgit_loss(codebook_size)),
        "ar": (lambda: Autoregressive(base, ar_layers, grid), ar_loss),
    }
    settings = plan(s)

    # The training budget: what is left of --budget-minutes after the fixed stages and the estimated sampling.
    elapsed = time.perf_counter() - wall_start
    cpu_per_wall = (time.process_time() - cpu_start) / elapsed
    with torch.inference_mode():
        probe = Hourglass(base).eval()
        z = torch.randint(0, codebook_size, (s.sample_batch, *grid))
        y = torch.arange(s.sample_batch) % NUM_CLASSES
        probe(z, y)
        t0 = time.perf_counter()
        for _ in range(3):
            probe(z, y)
        call_s = (time.perf_counter() - t0) / 3
    # + about 5 s per setting for decoding and judging (k-NN precision/recall against the test split).
    sampling_estimate = 1.15 * estimated_calls(s, grid) * call_s + 5 * len(settings)
    if args.train_cpu_minutes is not None:
        cpu_budget = 60 * args.train_cpu_minutes
    elif args.smoke:
        cpu_budget = SMOKE_TRAIN_CPU_SECONDS
    else:
        left = 60 * args.budget_minutes - elapsed - sampling_estimate
        cpu_budget = max(1.0, left / len(models) * cpu_per_wall)
    print(f"training budget: {cpu_budget:.0f} CPU s per model ({len(models)} models; CPU/wall {cpu_per_wall:.2f}; "
          f"sampling estimated at {sampling_estimate:.0f} s)", flush=True)

    trained: dict[str, nn.Module] = {}
    train_stats: dict[str, dict] = {}
    t = time.perf_counter()
    for name, (build, loss_fn) in models.items():
        torch.manual_seed(args.seed)
        trained[name], train_stats[name] = train_for(build(), loss_fn, tokens, labels, cpu_budget, s, args.seed)
        print(f"  {name}: {train_stats[name]['train_steps']} steps, loss {train_stats[name]['final_loss']:.3f}",
              flush=True)
    stage("training", t)

    t = time.perf_counter()
    sample_labels = torch.arange(NUM_CLASSES).repeat_interleave(s.samples // NUM_CLASSES)
    for setting in settings:
        net = trained[setting["model"]]
        images, timing = generate(setting["sampler"], net, tokenizer, sample_labels, s.sample_batch, grid, args.seed)
        rows.append({"method": setting["method"], "group": setting["group"], "model": setting["model"],
                     "T": setting["T"], **timing, **train_stats[setting["model"]],
                     **judge_row(images, sample_labels, judge, real_feats)})
    stage("sampling and judging", t)

    tokenizer_cfid = rows[1]["cfid"]
    for row in rows:
        row["cfid_over_tokenizer"] = row["cfid"] / tokenizer_cfid if tokenizer_cfid > 0 else None
    print()
    print_table(rows, [("method", "method", ""), ("T", "T", "d"), ("steps_per_image", "steps", ".1f"),
                       ("train_steps", "train steps", "d"), ("params", "params", ",d"), ("cfid", "cFID", ".2f"),
                       ("cfid_over_tokenizer", "/tok", ".2f"), ("accuracy", "acc", ".3f"),
                       ("precision", "prec", ".3f"), ("recall", "rec", ".3f"), ("s_per_image", "s/img", ".4f"),
                       ("cpu_s_per_image", "CPU s/img", ".4f")])
    sundae_best = min(r["cfid"] for r in rows if r.get("model") == "sundae")
    print(f"\nSUNDAE best cFID {sundae_best:.2f} = {sundae_best / tokenizer_cfid:.2f}x the tokenizer's "
          f"{tokenizer_cfid:.2f} (goal <= 1.25x); judge test accuracy {judge_accuracy:.3f}")

    payload = {
        "protocol": {
            "dataset": "Fashion-MNIST, zero-padded to 32x32", "data": str(args.data),
            "train_images": len(train), "reference": f"test split, {len(test)} images",
            "samples_per_setting": s.samples, "class_balanced": True, "seed": args.seed,
            "features": "penultimate layer (128-d) of sundae.eval.classifier.SmallClassifier trained on the train "
                        "split",
            "judge_test_accuracy": judge_accuracy, "judge_epochs": s.classifier_epochs,
            "fid": "sundae.eval.metrics.frechet_distance (float64)", "precision_recall_k": 3,
            "timing": "sampling only (tokenizer decode excluded), wall clock and process CPU time",
            "sundae_sampler": "temperature 0.8, update proportion as named, early stop after 10 steps unless named",
            "maskgit_sampler": "temperature 1.0, choice temperature 4.5 annealed linearly to 0, cosine schedule",
            "ar_sampler": "temperature 1.0, one token per step with a KV cache",
            "ar_layers": ar_layers, "tokenizer": str(tok_path), "tokenizer_grid": list(grid),
            "codebook_size": codebook_size,
            "train": {**dataclasses.asdict(s), "cpu_seconds_per_model": cpu_budget,
                      "optimizer": "AdamW wd 0.01, clip 1.0", "budget_minutes": args.budget_minutes},
            "smoke": args.smoke,
        },
        "rows": rows, "train": train_stats, "seconds": seconds,
        "seconds_total": time.perf_counter() - wall_start, "cpu_seconds_total": time.process_time() - cpu_start,
        "sundae_best_over_tokenizer": sundae_best / tokenizer_cfid, "environment": environment(device),
    }
    write_json(out, payload)
    plot(rows, tokenizer_cfid, out.with_suffix(".png"))
    print(f"wrote {out.with_suffix('.png')}\ntotal {payload['seconds_total'] / 60:.1f} min")


def plot(rows: list[dict], tokenizer_cfid: float, path: Path) -> None:
    """Four panels: classifier-FID and class accuracy against T and against wall-clock seconds per image."""
    curves: dict[str, list[dict]] = {}
    for r in rows:
        if r["group"] == "curve":
            curves.setdefault(r["method"], []).append(r)
    tok = {"tokenizer reconstructions": tokenizer_cfid}
    acc = {"tokenizer reconstructions": rows[1]["accuracy"]}
    panels = [
        Panel("classifier-FID vs sampling steps T", "T (network calls for AR)", "cFID",
              {m: [(r["T"], r["cfid"]) for r in rs] for m, rs in curves.items()}, hlines=tok),
        Panel("classifier-FID vs seconds per image", "wall-clock s / image", "cFID",
              {m: [(r["s_per_image"], r["cfid"]) for r in rs] for m, rs in curves.items()}, hlines=tok),
        Panel("class accuracy vs sampling steps T", "T", "accuracy",
              {m: [(r["T"], r["accuracy"]) for r in rs] for m, rs in curves.items()}, hlines=acc),
        Panel("class accuracy vs seconds per image", "wall-clock s / image", "accuracy",
              {m: [(r["s_per_image"], r["accuracy"]) for r in rs] for m, rs in curves.items()}, hlines=acc),
    ]
    save_panels(panels, path)


if __name__ == "__main__":
    sys.exit(main())
