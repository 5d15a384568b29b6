"""Learning curves of SUNDAE against MaskGIT-style and autoregressive generation on Fashion-MNIST VQ tokens:
classifier-FID against training steps, training CPU seconds and sampling seconds per image, with samplers tuned
per method on a validation split and seed repeats for the main comparison.

    python benchmarks/quality.py                       # the published run (estimate printed at start)
    python benchmarks/quality.py --tokenizer RUN/tokenizer/tokenizer.pt   # reuse a trained `fashion` tokenizer
    python benchmarks/quality.py --smoke               # everything, tiny, in about a minute
    python benchmarks/quality.py --work DIR --resume   # continue an interrupted run (same flags and --work)

Protocol:
1. Splits. `--val-images` (5000) of the 60,000 Fashion-MNIST training images, drawn by a permutation seeded
   with `--seed`, are held out as the validation split: the tokenizer (when trained here), the judge
   classifier and the generators train on the other 55,000. The test split (10,000) is used only for the
   reported figures. A `--tokenizer` given from elsewhere (e.g. `sundae quickstart`) may have seen the
   validation images; the JSON says so.
2. The judge: `SmallClassifier` trained on the training images. Its penultimate features define the
   classifier-FID (against the whole test split, or the validation split when tuning); its predictions give
   the class accuracy of the class-conditional samples; k-NN precision and recall (k = 3) use its features.
3. Generators, all with the same optimizer (AdamW lr 1e-3, 50 warm-up steps, weight decay 0.01, clip 1.0,
   batch 64, EMA 0.99 with `sundae.train.ema_decay_at`'s warm-up) and about the same parameter count
   (the hourglass preset `fashion`, ~1.4M): `sundae` (unroll 2), `sundae_u1`, `sundae_u3`, `maskgit`
   (the same hourglass + a [MASK] id), `ar` (a flat causal stack, its depth matched by parameters; see
   `baselines.py`), and lever ablations at unroll 2: `sundae_share` (unroll_share 0.25), `sundae_cosine`
   (corruption "cosine"), `sundae_s1` (shorten_factor 1: no hourglass valley), `sundae_muon` (Muon for the
   hidden matrices, `sundae.optim`). The default runs `sundae`,
   `sundae_u1`, `maskgit`, `ar` and `sundae_s1` to fit the time; `--methods` takes the others. The 1D-shortening
   model of the earlier equal-CPU-time benchmark is dropped: it tied with 2D shortening there.
   Each trains once per seed to `--budget` steps (512); `--seeds` (3) seeds for `--seeded` (sundae, maskgit:
   the pair the verdict compares), one for the others. Checkpoints at budget/8, /4, /2 and budget keep the cumulative
   training CPU (`time.process_time`) and wall seconds, so one set of rows gives FID against steps and
   against CPU seconds. Equal steps, not equal time: at a few hundred steps equal time measures the cost of
   an update rather than what a model learns.
4. Sampler tuning, on validation only: at the final checkpoint of seed 0, EMA weights, each method's grid is
   scored by classifier-FID against the validation split and the best setting is used for every test figure
   of that method. SUNDAE: temperature {0.6, 0.8, 1.0} x update proportion {0.5, 1.0 -> 0.5, 0.8} at T = 16
   (early stop after 10 steps; temperature 0.7 was planned too and is left out for time); MaskGIT: temperature {0.6, 0.8, 1.0} x choice temperature {2.0, 4.5}
   at T = 16; AR: temperature {0.8, 0.9, 1.0}. The JSON keeps the whole grid.
5. Test metrics per (method, seed, checkpoint, EMA | raw weights): classifier-FID against the whole test
   split, class accuracy, k-NN precision and recall, from `--samples` (500) class-balanced samples. Figures
   of seeded methods are mean +- std over seeds (per-seed values kept); two methods are called a tie when
   their means differ by less than sqrt(std_a^2 + std_b^2) (a one-seed method adds no spread). At the final
   checkpoint (seed 0, EMA, tuned sampler) the seeded methods and AR get a sweep over T in {4, 8, 16, 32, 64}
   (MaskGIT's T at most the 64 tokens; AR: its fixed 64 calls) with network calls and wall/CPU seconds per
   image (sampling only, the shared decode excluded); the lever ablations cost the same per call as `sundae`.
   Reference rows: `--samples` real validation images and the tokenizer's reconstructions of them (the
   floor a generator over these tokens can reach), both against the test split.

Outputs: `--out` (JSON, default benchmarks/results/quality.json; written atomically after every evaluated
checkpoint), a printed table, and a PNG beside the JSON. `--work` keeps the tokenizer, the judge, the tokens
and each run's state at each checkpoint (about 22 MB each; ~0.8 GB for the default run); `--resume` skips
what the JSON already holds and continues training from the last saved state. Given the seed and the thread
count, a resumed run gives the same numbers as an uninterrupted one.

Time on 2 cores, from costs measured on 2026-12-01 (a training step at batch 64: unroll-1 0.38 s, unroll-2
0.73 s, MaskGIT-style 0.34 s, AR 0.65 s, no valley 1.47x; a batch-250 forward 0.385 s): judge, tokenizer and
encoding ~10 min (~4 with --tokenizer), training ~45 min, sampling and judging at most ~28 min (an upper bound:
SUNDAE's early stop makes it less): about 83 minutes. Adding every lever (`--methods` with all 9, `--seeded`
sundae,sundae_u1,maskgit) comes to about 130 minutes. The run prints its
own estimate at the start, scaled by a forward pass timed there (on a loaded machine everything is slower),
and each stage's time as it goes. `--smoke` (1000 training images of which 200 validation, 200 test, the
`tiny` hourglass preset at batch 16, budget 8, 2 seeds, 20 samples, two-point grids) takes about a minute.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # idle threads sleep: their spinning would count as CPU time

import torch  # noqa: E402

from common import RESULTS, environment, print_table, write_json
from baselines import matching_layers
from plotting import Panel, save_panels
from quality_protocol import (METHODS, Judge, Optim, build, generate, load_checkpoint, loss_fn, sampler_grid, spread,
                              train_to_checkpoints, verdict)
from sundae.checkpoint import load_tokenizer
from sundae.data import FASHION_MNIST_DIR, IdxImages
from sundae.eval.classifier import SmallClassifier, predict, train_classifier
from sundae.hourglass import PRESETS as HOURGLASS_PRESETS
from sundae.tokens import encode_dataset
from sundae.train import VQGAN_TRAIN_PRESETS, train_vqgan
from sundae.vqgan import PRESETS as VQGAN_PRESETS

NUM_CLASSES = 10
SEEDED = ("sundae", "maskgit")
# What fits about 90 minutes on 2 cores: the two methods the verdict compares with 3 seeds, unroll 1, AR and
# the valley ablation with one. `--methods` adds the other levers (sundae_u3, sundae_share, sundae_cosine).
DEFAULT_METHODS = ("sundae", "sundae_u1", "maskgit", "ar", "sundae_s1")


@dataclasses.dataclass(frozen=True)
class Settings:
    """Sizes of one run; SMOKE shrinks every one of them."""

    pool_images: int = 0  # training images used, validation included (0: all 60,000)
    val_images: int = 5000
    test_images: int = 0  # 0: all 10,000
    classifier_epochs: int = 2
    tokenizer_steps: int = VQGAN_TRAIN_PRESETS["fashion"].steps
    samples: int = 500
    sample_batch: int = 250
    budget: int = 512
    seeds: int = 3
    tune_steps: int = 16
    sweep_steps: tuple[int, ...] = (4, 8, 16, 32, 64)
    optim: Optim = Optim()
    preset: str = "fashion"  # the hourglass preset every generator is built from


SMOKE = Settings(pool_images=1000, val_images=200, test_images=200, classifier_epochs=1, tokenizer_steps=10,
                 samples=20, sample_batch=20, budget=8, seeds=2, tune_steps=2, sweep_steps=(1, 2),
                 optim=Optim(warmup=5, batch_size=16), preset="tiny")

# Seconds on 2 cores, measured on 2026-12-01 (other jobs at the lowest priority): a training step at batch 64
# (sundae unroll 1; each further unrolled step adds "unroll"; MaskGIT-style and AR their own), one batch-250
# forward, and the fixed stages (the tokenizer per 2000 steps, encoding 60k, the judge per epoch). The first
# table (0.19 s a step, 0.24 s a forward) was about half of what the steps cost by then, and the default run it
# planned took more than twice its estimate. An AR sample set (64 single-token steps with the KV cache) costs
# about 24 batch forwards; decoding and judging about 1 ms per sample.
COST = {"step": 0.38, "unroll": 0.35, "muon": 0.06, "maskgit": 0.34, "ar": 0.65, "shorten1": 1.47, "forward": 0.385,
        "tokenizer": 360.0, "encode": 90.0, "judge_epoch": 75.0, "judge_per_sample": 0.001, "ar_forwards": 24}


def method_settings(name: str) -> dict[str, Any]:
    """The method's fields for the JSON, the default optimizer left out (JSONs from before it still resume)."""
    return {k: v for k, v in dataclasses.asdict(METHODS[name]).items() if (k, v) != ("optimizer", "adamw")}


def step_cost(name: str) -> float:
    m = METHODS[name]
    if m.kind != "sundae":
        return COST[m.kind]
    cost = COST["step"] + COST["unroll"] * (m.unroll - 1) * m.unroll_share + COST["muon"] * (m.optimizer == "muon")
    return cost * (COST["shorten1"] if m.shorten_factor == 1 else 1.0)


def estimate(s: Settings, methods: list[str], seeds: dict[str, int], tokenizer_given: bool, scale: float,
             n_train: int, smoke: bool) -> dict[str, float]:
    """Seconds per stage on this machine: COST times `scale` (a forward timed now over the measured one).
    Sampling counts T forwards per sample set (an upper bound: SUNDAE stops early)."""
    batches = math.ceil(s.samples / s.sample_batch) * s.sample_batch / 250  # in batch-250 forwards

    def one_set(name: str, steps: int) -> float:
        calls = COST["ar_forwards"] if METHODS[name].kind == "ar" else steps
        return calls * batches * COST["forward"] + COST["judge_per_sample"] * s.samples
    sampling = sum((8 * seeds[m] + len(sampler_grid(METHODS[m].kind, smoke))) * one_set(m, s.tune_steps)
                   + (one_set(m, 64) if METHODS[m].kind == "ar" else sum(one_set(m, t) for t in s.sweep_steps))
                   * swept(m, seeds) for m in methods)
    fixed = (0 if tokenizer_given else COST["tokenizer"] * s.tokenizer_steps / 2000) + \
        COST["encode"] * n_train / 60000 + COST["judge_epoch"] * s.classifier_epochs * n_train / 55000
    training = sum(seeds[m] * s.budget * step_cost(m) * s.optim.batch_size / 64 for m in methods)
    return {"fixed": fixed * scale, "training": training * scale, "sampling": sampling * scale}


def swept(name: str, seeds: dict[str, int]) -> bool:
    """Whether the method gets the sampling-steps sweep: the seeded methods and AR (the lever ablations
    sample with the same network cost per call as `sundae`; their T = 16 figures are in the curves)."""
    return seeds[name] > 1 or METHODS[name].kind == "ar"


def subset(ds: IdxImages, idx: torch.Tensor | None) -> IdxImages:
    out = copy.copy(ds)
    if idx is not None:
        out.images, out.labels = ds.images[idx], ds.labels[idx]
    return out


def balanced(labels: torch.Tensor, per_class: int, seed: int) -> torch.Tensor:
    """Indices of `per_class` items of each class, drawn with `seed`, class by class."""
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    return torch.cat([order[labels[order] == c][:per_class] for c in range(NUM_CLASSES)])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=str(FASHION_MNIST_DIR), help="folder with the Fashion-MNIST idx files")
    p.add_argument("--tokenizer", help="a trained `fashion` tokenizer checkpoint (tokenizer.pt) to reuse")
    p.add_argument("--budget", type=int, help="training steps per model (default 512; smoke 8)")
    p.add_argument("--seeds", type=int, help="seeds for the --seeded methods (default 3; smoke 2)")
    p.add_argument("--seeded", default=",".join(SEEDED), help=f"methods run with --seeds seeds ({','.join(SEEDED)})")
    p.add_argument("--methods", help=f"some of {','.join(METHODS)} (default: sundae,sundae_u1,maskgit,ar,sundae_s1; smoke: all)")
    p.add_argument("--samples", type=int, help="class-balanced samples per evaluation (default 500; smoke 20)")
    p.add_argument("--val-images", type=int, help="training images held out for validation (default 5000)")
    p.add_argument("--smoke", action="store_true", help="tiny sizes: runs everything in about a minute")
    p.add_argument("--work", help="folder for the tokenizer, judge, tokens and run states (default: a new one)")
    p.add_argument("--resume", action="store_true", help="continue the run in --work / --out")
    p.add_argument("--out", help="result JSON (default benchmarks/results/quality.json; smoke: in --work)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    wall_start = time.perf_counter()
    s = SMOKE if args.smoke else Settings()
    for flag, field in (("budget", "budget"), ("seeds", "seeds"), ("samples", "samples"), ("val_images", "val_images")):
        if getattr(args, flag) is not None:
            s = dataclasses.replace(s, **{field: getattr(args, flag)})
    s = dataclasses.replace(s, sample_batch=min(s.sample_batch, s.samples))
    if s.samples % NUM_CLASSES or s.samples < 10:
        raise SystemExit(f"--samples must be a positive multiple of {NUM_CLASSES}, got {s.samples}")
    if s.seeds < 1 or not 0 < s.val_images < (s.pool_images or 60000) // 2:
        raise SystemExit(f"--seeds must be >= 1 and --val-images between 1 and half the training images, got "
                         f"{s.seeds} and {s.val_images}")
    if s.budget < 8 or s.budget % 8:
        raise SystemExit(f"--budget must be a positive multiple of 8 (checkpoints at 1/8, 1/4, 1/2), got {s.budget}")
    methods = (args.methods or ",".join(METHODS if args.smoke else DEFAULT_METHODS)).split(",")
    unknown = [m for m in methods + args.seeded.split(",") if m not in METHODS]
    if unknown:
        raise SystemExit(f"unknown method(s) {', '.join(unknown)}; expected some of {', '.join(METHODS)}")
    seeds = {m: s.seeds if m in args.seeded.split(",") else 1 for m in methods}
    checkpoints = [s.budget // 8, s.budget // 4, s.budget // 2, s.budget]
    if args.resume and not args.work:
        raise SystemExit("--resume needs the --work folder of the interrupted run")
    work = Path(args.work or tempfile.mkdtemp(prefix="sundae_quality_"))
    if not args.resume and work.is_dir() and any(work.iterdir()):
        raise SystemExit(f"--work {work} is not empty: pass --resume to continue the run there, or a new folder")
    work.mkdir(parents=True, exist_ok=True)
    out = Path(args.out) if args.out else (work / "quality.json" if args.smoke else RESULTS / "quality.json")

    protocol = {
        "dataset": "Fashion-MNIST, zero-padded to 32x32", "data": str(args.data), "seed": args.seed,
        "tokenizer_given": args.tokenizer,
        "settings": dataclasses.asdict(s), "methods": {m: method_settings(m) for m in methods},
        "seeds": seeds, "checkpoints": checkpoints, "smoke": args.smoke,
        "optimizer": "AdamW (weight decay, clip, lr with linear warm-up as in settings.optim; a method with "
                     "optimizer muon: Muon on the hourglass's hidden matrices, AdamW on the rest); EMA decay "
                     "min(ema_decay, (1+step)/(10+step)) (sundae.train.ema_decay_at)",
        "sampler_grids": {k: sampler_grid(k, args.smoke) for k in ("sundae", "maskgit", "ar")},
        "tuning": f"classifier-FID against the validation split at step {s.budget}, seed 0, EMA weights, "
                  f"T = {s.tune_steps} (AR: one step per token); test figures use the chosen setting",
        "metrics": "classifier-FID (sundae.eval.metrics.frechet_distance) against the whole test split, class "
                   "accuracy, k-NN precision/recall k=3, over class-balanced samples",
        "spread": "mean +- sample std over seeds; tie when |mean_a - mean_b| < sqrt(std_a^2 + std_b^2)",
        "timing": "training: cumulative process CPU and wall seconds; sampling: per image, decode excluded",
    }
    payload: dict[str, Any] = {"protocol": protocol, "rows": [], "tuning": {}, "sweep": [], "reference": [],
                               "stage_seconds": {}}
    if args.resume and out.is_file():
        payload = json.loads(out.read_text())
        if {k: payload["protocol"].get(k) for k in protocol} != json.loads(json.dumps(protocol)):
            raise SystemExit(f"{out} was written with other settings than these: run --resume with the same flags")
        protocol = payload["protocol"]
    stages = payload["stage_seconds"]

    def stage(name: str, t0: float) -> None:
        stages[name] = stages.get(name, 0.0) + time.perf_counter() - t0
        print(f"[{time.perf_counter() - wall_start:6.0f} s] {name}: {time.perf_counter() - t0:.0f} s", flush=True)

    def save() -> None:
        payload["environment"] = environment(torch.device("cpu"))
        write_json(out, payload)

    t = time.perf_counter()
    pool = IdxImages(args.data, "train", 32)
    if s.pool_images:
        pool = subset(pool, torch.arange(s.pool_images))
    perm = torch.randperm(len(pool), generator=torch.Generator().manual_seed(args.seed))
    val_idx, train_idx = perm[:s.val_images].sort().values, perm[s.val_images:].sort().values
    train, val = subset(pool, train_idx), subset(pool, val_idx)
    test = IdxImages(args.data, "test", 32)
    if s.test_images:
        test = subset(test, torch.arange(s.test_images))
    protocol["splits"] = {"train": len(train), "validation": len(val), "test": len(test),
                          "validation_from": f"training images, torch.randperm seeded {args.seed}, first {len(val)}"}
    payload["validation_indices"] = val_idx.tolist()

    judge_path = work / "judge.pt"
    if judge_path.is_file():
        classifier = SmallClassifier(1, NUM_CLASSES, 32)
        classifier.load_state_dict(torch.load(judge_path, weights_only=True))
    else:
        classifier = train_classifier(train.images, train.labels, NUM_CLASSES, s.classifier_epochs, seed=args.seed,
                                      progress=False)
        torch.save(classifier.state_dict(), judge_path)
    classifier.eval()
    test_judge, val_judge = Judge(classifier, test.images, with_radii=True), Judge(classifier, val.images, False)
    payload["judge"] = {"test_accuracy": (predict(classifier, test.images) == test.labels).float().mean().item(),
                        "epochs": s.classifier_epochs, "trained_on": "training images (validation held out)"}
    stage("judge", t)

    t = time.perf_counter()
    if args.tokenizer:
        tok_path = Path(args.tokenizer)
    else:
        cfg = dataclasses.replace(VQGAN_TRAIN_PRESETS["fashion"], steps=s.tokenizer_steps,
                                  sample_every=s.tokenizer_steps, save_every=s.tokenizer_steps)
        tok_path = train_vqgan(VQGAN_PRESETS["fashion"], cfg, train, work / "tokenizer", "cpu", resume=True,
                               progress=False)
    payload["tokenizer"] = {"path": str(tok_path), "trained_here": not args.tokenizer,
                            "may_have_seen_validation": bool(args.tokenizer)}
    tokenizer = load_tokenizer(tok_path, "cpu")
    tokens_path = work / "tokens.pt"
    if tokens_path.is_file():
        tokens = torch.load(tokens_path, weights_only=True)
    else:
        with torch.inference_mode():
            tokens = torch.from_numpy(encode_dataset(tokenizer, train, 500, torch.device("cpu"),
                                                     progress=False)[0].astype("int64"))
        torch.save(tokens, tokens_path)
    labels, grid = train.labels, tuple(tokens.shape[1:])
    codebook_size = tokenizer.cfg.codebook_size

    def decode(z: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return torch.cat([tokenizer.decode(z[i:i + 500]) for i in range(0, len(z), 500)]).clamp(-1, 1)

    if not payload["reference"]:
        ref = balanced(val.labels, s.samples // NUM_CLASSES, args.seed)
        with torch.inference_mode():
            recon = decode(tokenizer.encode(val.images[ref]))
        payload["reference"] = [
            {"method": "real validation images", **test_judge.score(val.images[ref], val.labels[ref])},
            {"method": "tokenizer reconstructions", **test_judge.score(recon, val.labels[ref])}]
    stage("tokenizer", t)

    base = dataclasses.replace(HOURGLASS_PRESETS[s.preset], codebook_size=codebook_size, num_classes=NUM_CLASSES)
    ar_layers = matching_layers(base, grid)
    n_tokens = grid[0] * grid[1]
    sample_labels = torch.arange(NUM_CLASSES).repeat_interleave(s.samples // NUM_CLASSES)
    with torch.inference_mode():
        probe = build(METHODS["sundae"], base, grid, ar_layers).eval()
        z, y = torch.randint(0, codebook_size, (250, *grid)), torch.arange(250) % NUM_CLASSES
        probe(z, y)
        t0 = time.perf_counter()
        probe(z, y)
        scale = max(1.0, (time.perf_counter() - t0) / COST["forward"])
    plan = estimate(s, methods, seeds, bool(args.tokenizer), scale, len(train), args.smoke)
    print(f"estimate for the whole run on this machine (a forward {scale:.1f}x the idle-2-core one): "
          + ", ".join(f"{k} {v / 60:.1f} min" for k, v in plan.items()) + f"; total {sum(plan.values()) / 60:.0f} min",
          flush=True)
    protocol["ar_layers"], protocol["grid"], protocol["codebook_size"] = ar_layers, list(grid), codebook_size

    def evaluate(name: str, net, setting: dict, steps: int, judge: Judge) -> dict[str, Any]:
        images, timing = generate(METHODS[name].kind, setting, steps, net, decode, sample_labels, s.sample_batch,
                                  grid, args.seed)
        return {**timing, **(judge.score(images, sample_labels) if judge is test_judge else
                             {"cfid": judge.fid(images)})}

    def tuned_steps(name: str, steps: int) -> int:
        kind = METHODS[name].kind
        return n_tokens if kind == "ar" else min(steps, n_tokens) if kind == "maskgit" else steps

    done = {(r["method"], r["seed"], r["step"], r["weights"]) for r in payload["rows"]}
    for name in methods:
        method = METHODS[name]
        for seed in range(seeds[name]):
            t = time.perf_counter()
            folder = work / "runs" / f"{name}_seed{seed}"
            torch.manual_seed(args.seed + 1000 * seed)
            net = build(method, base, grid, ar_layers)
            print(f"{name} seed {seed}: {sum(p.numel() for p in net.parameters()):,} params", flush=True)
            train_to_checkpoints(net, loss_fn(method, codebook_size), tokens, labels, checkpoints, s.optim,
                                 args.seed + 1000 * seed, folder, optimizer=method.optimizer)
            stage("training", t)
            t = time.perf_counter()
            if seed == 0 and name not in payload["tuning"]:
                net, _ = load_checkpoint(net, folder, s.budget, "ema")
                grid_rows = [{"setting": g, **evaluate(name, net, g, tuned_steps(name, s.tune_steps), val_judge)}
                             for g in sampler_grid(method.kind, args.smoke)]
                best = min(grid_rows, key=lambda r: r["cfid"])
                payload["tuning"][name] = {"selected_on": "validation", "reference_images": len(val), "step": s.budget,
                                           "seed": 0, "weights": "ema", "T": tuned_steps(name, s.tune_steps),
                                           "grid": grid_rows, "chosen": best["setting"], "val_cfid": best["cfid"]}
                print(f"  tuned on validation: {best['setting']} (val cFID {best['cfid']:.2f})", flush=True)
                save()
            chosen = payload["tuning"][name]["chosen"]
            for step in checkpoints:
                for weights in ("ema", "raw"):
                    if (name, seed, step, weights) in done:
                        continue
                    net, stats = load_checkpoint(net, folder, step, weights)
                    row = {"method": name, "seed": seed, "step": step, "weights": weights, "split": "test",
                           "reference_images": len(test), "T": tuned_steps(name, s.tune_steps), "setting": chosen,
                           **stats, **evaluate(name, net, chosen, tuned_steps(name, s.tune_steps), test_judge)}
                    payload["rows"].append(row)
                    done.add((name, seed, step, weights))
                    save()
                print(f"  step {step}: test cFID ema {rows_at(payload, name, seed, step, 'ema'):.2f}, "
                      f"raw {rows_at(payload, name, seed, step, 'raw'):.2f}", flush=True)
            stage("sampling and judging", t)
        t = time.perf_counter()
        if swept(name, seeds) and not any(r["method"] == name for r in payload["sweep"]):
            net, _ = load_checkpoint(net, work / "runs" / f"{name}_seed0", s.budget, "ema")
            steps_list = sorted({tuned_steps(name, T) for T in s.sweep_steps})
            chosen = payload["tuning"][name]["chosen"]
            payload["sweep"] += [{"method": name, "T": T, "setting": chosen, "step": s.budget, "weights": "ema",
                                  **evaluate(name, net, chosen, T, test_judge)} for T in steps_list]
            save()
            stage("sampling sweep", t)

    payload["summary"], payload["verdicts"] = summarize(payload, methods, checkpoints)
    payload["seconds_total"] = sum(stages.values())
    save()
    report(payload, methods, checkpoints)
    plot(payload, methods, out.with_suffix(".png"))
    print(f"wrote {out.with_suffix('.png')}; this session {(time.perf_counter() - wall_start) / 60:.1f} min")


def rows_at(payload: dict, name: str, seed: int, step: int, weights: str) -> float:
    return next(r["cfid"] for r in payload["rows"] if (r["method"], r["seed"], r["step"], r["weights"]) ==
                (name, seed, step, weights))


METRICS = ("cfid", "accuracy", "precision", "recall", "train_cpu_s", "train_wall_s", "loss")


def summarize(payload: dict, methods: list[str], checkpoints: list[int]) -> tuple[dict, list[dict]]:
    """Mean +- std over seeds of every metric per (method, step, weights); verdicts against `sundae` (or the
    first method) at the final checkpoint, EMA weights, by test classifier-FID."""
    summary: dict[str, Any] = {}
    for name in methods:
        for step in checkpoints:
            for weights in ("ema", "raw"):
                rows = sorted((r for r in payload["rows"] if (r["method"], r["step"], r["weights"]) ==
                               (name, step, weights)), key=lambda r: r["seed"])
                summary.setdefault(name, {}).setdefault(str(step), {})[weights] = \
                    {k: spread([r[k] for r in rows]) for k in METRICS}
    ref = "sundae" if "sundae" in methods else methods[0]
    final = str(checkpoints[-1])
    verdicts = []
    for name in methods:
        if name == ref:
            continue
        a, b = summary[ref][final]["ema"]["cfid"], summary[name][final]["ema"]["cfid"]
        who = verdict(a, b)
        verdicts.append({"a": ref, "b": name, "step": checkpoints[-1], "metric": "test cFID, EMA",
                         "a_mean": a["mean"], "b_mean": b["mean"], "a_std": a["std"], "b_std": b["std"],
                         "verdict": {"a": f"{ref} better", "b": f"{name} better"}.get(who, who)})
    return summary, verdicts


def _pm(x: dict) -> str:
    return f"{x['mean']:.2f}" + (f" +- {x['std']:.2f}" if x["n"] > 1 else "")


def report(payload: dict, methods: list[str], checkpoints: list[int]) -> None:
    rows = [{"method": r["method"], "step": "-", "weights": "-", "seeds": "-", "cfid": f"{r['cfid']:.2f}",
             "acc": f"{r['accuracy']:.3f}", "prec": f"{r['precision']:.3f}", "rec": f"{r['recall']:.3f}",
             "cpu": "-"} for r in payload["reference"]]
    for name in methods:
        for step in checkpoints:
            for weights in ("ema", "raw"):
                m = payload["summary"][name][str(step)][weights]
                rows.append({"method": name, "step": str(step), "weights": weights, "seeds": str(m["cfid"]["n"]),
                             "cfid": _pm(m["cfid"]), "acc": f"{m['accuracy']['mean']:.3f}",
                             "prec": f"{m['precision']['mean']:.3f}", "rec": f"{m['recall']['mean']:.3f}",
                             "cpu": f"{m['train_cpu_s']['mean']:.0f}"})
    print()
    print_table(rows, [("method", "method", ""), ("step", "step", ""), ("weights", "weights", ""),
                       ("seeds", "seeds", ""), ("cfid", "test cFID", ""), ("acc", "acc", ""), ("prec", "prec", ""),
                       ("rec", "rec", ""), ("cpu", "train CPU s", "")])
    print()
    print_table([{**r, "setting": json.dumps(r["setting"])} for r in payload["sweep"]],
                [("method", "method", ""), ("T", "T", "d"), ("setting", "tuned sampler", ""),
                 ("calls_per_image", "calls/img", ".1f"), ("s_per_image", "s/img", ".4f"),
                 ("cpu_s_per_image", "CPU s/img", ".4f"), ("cfid", "test cFID", ".2f")])
    print()
    for v in payload["verdicts"]:
        print(f"step {v['step']}, {v['metric']}: {v['a']} {v['a_mean']:.2f} +- {v['a_std']:.2f} vs {v['b']} "
              f"{v['b_mean']:.2f} +- {v['b_std']:.2f}: {v['verdict']}")
    print(f"judge test accuracy {payload['judge']['test_accuracy']:.3f}; tokenizer floor cFID "
          f"{payload['reference'][1]['cfid']:.2f}")


def plot(payload: dict, methods: list[str], path: Path) -> None:
    """cFID (seed mean, test) against training steps (EMA and raw), training CPU seconds, and sampling s/image."""
    summary = payload["summary"]
    floor = {"tokenizer reconstructions": payload["reference"][1]["cfid"]}

    def curve(name: str, x: str, weights: str = "ema") -> list[tuple[float, float]]:
        return [(float(step) if x == "step" else by[weights][x]["mean"], by[weights]["cfid"]["mean"])
                for step, by in summary[name].items()]
    panels = [
        Panel("test cFID vs training steps (EMA)", "training steps", "cFID",
              {m: curve(m, "step") for m in methods}, hlines=floor),
        Panel("test cFID vs training CPU seconds (EMA)", "training CPU s", "cFID",
              {m: curve(m, "train_cpu_s") for m in methods}, hlines=floor),
        Panel("test cFID vs sampling seconds per image (final, EMA)", "wall-clock s / image", "cFID",
              {m: [(r["s_per_image"], r["cfid"]) for r in payload["sweep"] if r["method"] == m] for m in methods},
              hlines=floor),
        Panel("test cFID vs training steps (raw weights)", "training steps", "cFID",
              {m: curve(m, "step", "raw") for m in methods}, hlines=floor),
    ]
    save_panels(panels, path)


if __name__ == "__main__":
    sys.exit(main())
