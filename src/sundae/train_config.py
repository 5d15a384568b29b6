"""Training configurations and their presets: `VQGANTrainConfig` (stage 1), `GeneratorTrainConfig` (stage 2), and
the generator's lr schedule (`lr_factor`).

Validated at construction: a bad value raises ValueError naming the field. `sundae.train` re-exports all of it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from sundae.sundae import CORRUPTIONS

# The learning rate after the warm-up: "constant", or "cosine": a half cosine from lr to 0 at the last step
# (Loshchilov & Hutter 2017, SGDR, without restarts), which lets a short run end on small, averaged-out steps.
LR_SCHEDULES = ("constant", "cosine")

# The generator's optimizer: "adamw", or "muon": Muon for the hourglass's hidden matrices and AdamW for the rest
# (`sundae.optim.generator_optimizers`), both at `lr` on its schedule.
OPTIMIZERS = ("adamw", "muon")

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}

# Where a run logs: log.jsonl always (`sundae plot RUN` draws it); "tensorboard" also writes TensorBoard event
# files into RUN/tensorboard/ (`runs.RunLog`; needs the tensorboard package).
LOGGERS = ("jsonl", "tensorboard")


@dataclass(frozen=True)
class VQGANTrainConfig:
    """Stage-1 training; defaults follow Esser et al. and the paper's FFHQ1024 config."""

    steps: int = 100_000
    batch_size: int = 8  # global: split over processes and grad_accum micro-batches
    grad_accum: int = 1
    lr: float = 3.6e-5  # taming's 4.5e-6 per image x batch 8
    betas: tuple[float, float] = (0.5, 0.9)
    l1_weight: float = 1.0
    perceptual_weight: float = 1.0
    codebook_weight: float = 1.0
    disc_weight: float = 0.5
    disc_start: int = 15_000
    disc_layers: int = 3
    disc_filters: int = 64
    vgg16_path: str = ""  # "" = $SUNDAE_HOME/vgg16.pth
    # Every N steps (0: never), codes unused since the last check restart at distinct encoder outputs: the
    # collapse remedy. Without it the ffhq presets used 5-9% of their codebook at quickstart scale, 58-98% with.
    restart_dead_codes: int = 1000
    ema_decay: float = 0.999
    precision: str = "fp32"  # "bf16" (autocast) or "fp16" (autocast + gradient scaler)
    seed: int = 0
    log_every: int = 50
    logger: str = "jsonl"  # LOGGERS: "tensorboard" also writes event files
    sample_every: int = 1000
    save_every: int = 5000

    def __post_init__(self) -> None:
        _check_train_config(self)


INF = float("inf")
# field: (low, high, low inclusive); values must also be finite (NaN and inf fail). Fields a config lacks are skipped.
RANGES: dict[str, tuple[float, float, bool]] = {
    "lr": (0.0, INF, False), "ema_decay": (0.0, 1.0, True), "weight_decay": (0.0, INF, True),
    "warmup_steps": (0, INF, True), "grad_clip": (0.0, INF, True), "l1_weight": (0.0, INF, True),
    "perceptual_weight": (0.0, INF, True), "codebook_weight": (0.0, INF, True), "disc_weight": (0.0, INF, True),
    "disc_start": (0, INF, True), "disc_layers": (1, INF, True), "disc_filters": (1, INF, True),
    "restart_dead_codes": (0, INF, True), "seed": (0, 2**63 - 1, True),
}


def _check_train_config(cfg: Any) -> None:
    for name, (low, high, closed) in RANGES.items():
        value = getattr(cfg, name, None)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or \
                not math.isfinite(value) or not ((low <= value) if closed else (low < value)) or value > high:
            span = f"{'[' if closed else '('}{low}, {high}]".replace("inf]", "inf)")
            raise ValueError(f"{name} must be a number in {span}, got {value!r}")
    if len(cfg.betas) != 2 or not all(0 <= b < 1 for b in cfg.betas):
        raise ValueError(f"betas must be two numbers in [0, 1), got {cfg.betas}")
    if cfg.batch_size < 1 or cfg.steps < 0 or min(cfg.log_every, cfg.sample_every, cfg.save_every) < 1:
        raise ValueError("batch_size and the *_every intervals must be >= 1, steps >= 0")
    if cfg.grad_accum < 1 or cfg.batch_size % cfg.grad_accum:
        raise ValueError(f"grad_accum must be >= 1 and divide batch_size {cfg.batch_size}, got {cfg.grad_accum}")
    if cfg.precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {cfg.precision!r}")
    if cfg.logger not in LOGGERS:
        raise ValueError(f"logger must be one of {', '.join(LOGGERS)}, got {cfg.logger!r}")


@dataclass(frozen=True)
class GeneratorTrainConfig:
    """Stage-2 training; defaults are the paper's FFHQ settings (Savinov et al. section 4, appendix)."""

    steps: int = 1_000_000
    batch_size: int = 64  # global: split over processes and grad_accum micro-batches
    grad_accum: int = 1
    lr: float = 3e-5
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 0
    lr_schedule: str = "constant"  # after the warm-up: "constant" or "cosine" (to 0 at `steps`), LR_SCHEDULES
    grad_clip: float = 0.0  # 0 = off
    optimizer: str = "adamw"  # OPTIMIZERS
    unroll_steps: int = 2
    unroll_share: float = 1.0  # share of each batch that runs the unrolled steps t > 1 (sundae.unrolled_loss)
    corruption: str = "uniform"  # corruption-rate distribution: "uniform" (the paper) or "cosine"
    ema_decay: float = 0.999
    precision: str = "fp32"
    sharding: str = "ddp"  # under torchrun: "ddp" (replicas) or "fsdp" (FSDP2 fully_shard, for big models)
    seed: int = 0
    log_every: int = 50
    logger: str = "jsonl"  # LOGGERS: "tensorboard" also writes event files
    sample_every: int = 1000
    save_every: int = 5000
    sample_steps: int = 50  # sampling steps for the grids written during training
    # Conditional models: share of samples trained with the null condition, so that the same network also
    # gives unconditional logits for classifier-free guidance (Ho & Salimans 2022, p_uncond 0.1-0.2).
    cond_dropout: float = 0.1

    def __post_init__(self) -> None:
        _check_train_config(self)
        if self.unroll_steps < 1 or self.sample_steps < 1:
            raise ValueError("unroll_steps and sample_steps must be >= 1")
        if not 0 < self.unroll_share <= 1 or self.corruption not in CORRUPTIONS:
            raise ValueError(f"unroll_share must lie in (0, 1] and corruption be one of {', '.join(CORRUPTIONS)}, "
                             f"got {self.unroll_share} and {self.corruption!r}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {', '.join(LR_SCHEDULES)}, got {self.lr_schedule!r}")
        if not 0 <= self.cond_dropout <= 1:
            raise ValueError(f"cond_dropout must lie in [0, 1], got {self.cond_dropout}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")
        if self.sharding not in ("ddp", "fsdp"):
            raise ValueError(f"sharding must be 'ddp' or 'fsdp', got {self.sharding!r}")


def lr_factor(cfg: GeneratorTrainConfig, step: int) -> float:
    """The multiplier of `cfg.lr` for optimizer step `step` (0-based), in (0, 1]: a linear warm-up over
    `warmup_steps`, then 1 ("constant") or a half cosine falling to 0 at step `cfg.steps` ("cosine",
    Loshchilov & Hutter 2017, without restarts)."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "constant":
        return 1.0
    span = max(1, cfg.steps - cfg.warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - cfg.warmup_steps) / span)))


VQGAN_TRAIN_PRESETS: dict[str, VQGANTrainConfig] = {
    "tiny": VQGANTrainConfig(steps=20, batch_size=8, lr=1e-3, perceptual_weight=0.0, disc_start=10,
                             disc_filters=8, restart_dead_codes=10, log_every=5, sample_every=10, save_every=10),
    "fashion": VQGANTrainConfig(steps=2000, batch_size=16, lr=1e-3, perceptual_weight=0.0, disc_start=1600,
                                disc_weight=0.1, disc_filters=32, restart_dead_codes=100, ema_decay=0.99,
                                sample_every=500, save_every=500),
    "ffhq256": VQGANTrainConfig(disc_start=30_000),
    "ffhq1024": VQGANTrainConfig(batch_size=4, lr=1.8e-5),
}

GENERATOR_TRAIN_PRESETS: dict[str, GeneratorTrainConfig] = {
    "tiny": GeneratorTrainConfig(steps=20, batch_size=16, lr=1e-3, log_every=5, sample_every=10, save_every=10,
                                 sample_steps=4),
    "fashion": GeneratorTrainConfig(steps=900, batch_size=64, lr=1e-3, warmup_steps=50, grad_clip=1.0,
                                    ema_decay=0.99, sample_every=300, save_every=300, sample_steps=16),
    "ffhq256": GeneratorTrainConfig(),
    "ffhq1024": GeneratorTrainConfig(batch_size=16),
    # The ImageNet configuration we copied used lr 1e-6, and its author reported poor class-conditional
    # results. 1e-6 is 30x below the FFHQ lr at 3x the batch: Adam moves each weight by about lr per step, so
    # 1e-6 cannot go further than 0.1 in 100k steps. We use the FFHQ lr, 3e-5 (reasoned, not measured: no
    # GPU has trained this preset here; `--set lr=1e-6` restores the copied setting).
    "imagenet256": GeneratorTrainConfig(batch_size=192, lr=3e-5, unroll_steps=3),
}
