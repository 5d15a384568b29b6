"""Training loops: `train_vqgan` (stage 1) and `train_generator` (stage 2), each readable in one pass.

The only code that owns optimizers and writes files during training. A run folder holds `tokenizer.pt` or
`generator.pt` (the last checkpoint, resumable), `checkpoints/step_NNNNNNN.pt`, `log.jsonl` and
`samples/step_NNNNNNN.png` grids made with the EMA weights.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm.auto import tqdm

from sundae.checkpoint import load_checkpoint, save_checkpoint
from sundae.data import save_grid
from sundae.hourglass import Hourglass, HourglassConfig
from sundae.losses import LPIPS, PatchDiscriminator, adaptive_weight, generator_loss, hinge_d_loss
from sundae.sundae import sample, unrolled_loss
from sundae.vqgan import VQGAN, VQGANConfig


@dataclass(frozen=True)
class VQGANTrainConfig:
    """Stage-1 training; defaults follow Esser et al. and the paper's FFHQ1024 config."""

    steps: int = 100_000
    batch_size: int = 8
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
    restart_dead_codes: int = 0  # every N steps, codes unused since the last check restart at encoder outputs
    ema_decay: float = 0.999
    precision: str = "fp32"  # or "bf16" (autocast)
    seed: int = 0
    log_every: int = 50
    sample_every: int = 1000
    save_every: int = 5000

    def __post_init__(self) -> None:
        _check_train_config(self)


def _check_train_config(cfg: Any) -> None:
    if len(cfg.betas) != 2:
        raise ValueError(f"betas must be two numbers, got {cfg.betas}")
    if cfg.batch_size < 1 or cfg.steps < 0 or min(cfg.log_every, cfg.sample_every, cfg.save_every) < 1:
        raise ValueError("batch_size and the *_every intervals must be >= 1, steps >= 0")
    if cfg.precision not in ("fp32", "bf16"):
        raise ValueError(f"precision must be 'fp32' or 'bf16', got {cfg.precision!r}")


@dataclass(frozen=True)
class GeneratorTrainConfig:
    """Stage-2 training; defaults are the paper's FFHQ settings (Savinov et al. section 4, appendix)."""

    steps: int = 1_000_000
    batch_size: int = 64
    lr: float = 3e-5
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 0
    grad_clip: float = 0.0  # 0 = off
    unroll_steps: int = 2
    ema_decay: float = 0.999
    precision: str = "fp32"
    seed: int = 0
    log_every: int = 50
    sample_every: int = 1000
    save_every: int = 5000
    sample_steps: int = 50  # sampling steps for the grids written during training

    def __post_init__(self) -> None:
        _check_train_config(self)
        if self.unroll_steps < 1 or self.sample_steps < 1:
            raise ValueError("unroll_steps and sample_steps must be >= 1")


VQGAN_TRAIN_PRESETS: dict[str, VQGANTrainConfig] = {
    "tiny": VQGANTrainConfig(steps=20, batch_size=8, lr=1e-3, perceptual_weight=0.0, disc_start=10,
                             disc_filters=8, log_every=5, sample_every=10, save_every=10),
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
    "imagenet256": GeneratorTrainConfig(batch_size=192, lr=1e-6, unroll_steps=3),
}


def resolve_device(name: str = "auto") -> torch.device:
    """"auto" -> cuda if available, else cpu; anything else is passed to torch.device."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """bf16 autocast for "bf16", nothing for "fp32". Softmax and logits stay fp32 inside the models."""
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    raise ValueError(f"precision must be 'fp32' or 'bf16', got {precision!r}")


class EpochBatchSampler(Sampler[list[int]]):
    """Endless batches of indices: epoch e is a permutation seeded by (seed, e), last partial batch dropped.

    Starting at `start_step` skips exactly the batches already seen, so a resumed run reads the same data
    as an uninterrupted one.
    """

    def __init__(self, n: int, batch_size: int, seed: int, start_step: int = 0):
        if n < batch_size:
            raise ValueError(f"dataset has {n} items, fewer than one batch of {batch_size}")
        self.n, self.batch_size, self.seed, self.start_step = n, batch_size, seed, start_step

    def __iter__(self) -> Iterator[list[int]]:
        per_epoch = self.n // self.batch_size
        epoch, skip = divmod(self.start_step, per_epoch)
        while True:
            perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 100_003 + epoch))
            for i in range(skip, per_epoch):
                yield perm[i * self.batch_size: (i + 1) * self.batch_size].tolist()
            epoch, skip = epoch + 1, 0


def _loader(dataset: Dataset, batch_size: int, seed: int, start_step: int, rng: Any = None) -> Iterator:
    """Endless batches from `start_step` on; a resumed run's RNG state `rng` is set after the loader is built,
    since building it draws from the global RNG."""
    loader = iter(DataLoader(dataset, batch_sampler=EpochBatchSampler(len(dataset), batch_size, seed, start_step)))
    if rng is not None:
        _set_rng_state(rng)
    return loader


def _ema(model: nn.Module, decay: float) -> AveragedModel:
    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)


def _log(path: Path, record: dict[str, Any]) -> None:
    with open(path, "a") as fh:
        fh.write(json.dumps(record) + "\n")


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _restore(out: Path, kind: str, parts: dict[str, Any], ema: AveragedModel, resume: bool) -> tuple[int, Any]:
    """Load the run's last checkpoint `out/<kind>.pt` into `parts` (key -> object with load_state_dict) and
    the EMA. Returns (step, RNG state), or (0, None) when there is no checkpoint yet.

    Raises FileExistsError when a checkpoint exists but `resume` is False (a new run would overwrite it).
    """
    path = out / f"{kind}.pt"
    if not path.is_file():
        return 0, None
    if not resume:
        raise FileExistsError(f"{path} exists: pass --resume to continue that run, or choose another --out")
    ckpt = load_checkpoint(path, kind)
    try:
        for key, obj in parts.items():
            obj.load_state_dict(ckpt[key])
    except (RuntimeError, ValueError, KeyError) as err:
        raise ValueError(f"{path} was made with a different config ({str(err).splitlines()[0]})") from None
    ema.module.load_state_dict(ckpt["ema"])
    ema.n_averaged.fill_(ckpt["step"])  # one EMA update per step; 0 would restart the average
    return ckpt["step"], ckpt["rng"]


def _save(out: Path, kind: str, model_cfg: Any, train_cfg: Any, parts: dict[str, Any], ema: AveragedModel,
          step: int, **extra: Any) -> Path:
    """Write everything `_restore` needs, plus `extra` keys, atomically to the resumable `out/<kind>.pt` and
    to a numbered copy `out/checkpoints/step_NNNNNNN.pt`. Returns the former."""
    states = {key: obj.state_dict() for key, obj in parts.items() if key != "model"}
    last = out / f"{kind}.pt"
    for path in (last, out / "checkpoints" / f"step_{step:07d}.pt"):
        save_checkpoint(path, kind, model_cfg, parts["model"], ema=ema.module.state_dict(), step=step,
                        rng=_rng_state(), train=dataclasses.asdict(train_cfg), **states, **extra)
    return last


def _quiet(progress: bool) -> bool:
    """True when the progress bar should be hidden: asked for, or TQDM_DISABLE set in the environment."""
    return not progress or bool(os.environ.get("TQDM_DISABLE"))


def _check_finite(loss: Tensor, step: int) -> None:
    if not torch.isfinite(loss):
        raise FloatingPointError(f"loss is {loss.item()} at step {step}; the last good checkpoint is kept")


def train_vqgan(model_cfg: VQGANConfig, cfg: VQGANTrainConfig, dataset: Dataset, out: str | Path,
                device: str | torch.device = "cpu", resume: bool = False, progress: bool = True) -> Path:
    """Train the tokenizer on `dataset` (items (`c H W` in [-1, 1], label)); returns `out/tokenizer.pt`.

    Per step: L = l1 * |x - x_hat| + perceptual * LPIPS + codebook * L_VQ (+ lambda * (-D(x_hat)) from
    `disc_start`, lambda the adaptive weight), then one discriminator hinge step (Esser et al. eq. 5-7).
    `resume` continues from `out/tokenizer.pt` exactly (model, EMA, discriminator, optimizers, data position,
    RNG). Raises FloatingPointError naming the step when the loss is not finite (checkpoints stay intact).
    """
    device, out = torch.device(device), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    model = VQGAN(model_cfg).to(device)
    disc = PatchDiscriminator(model_cfg.in_channels, cfg.disc_filters, cfg.disc_layers).to(device)
    lpips = LPIPS(cfg.vgg16_path or None).to(device) if cfg.perceptual_weight > 0 else None
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=cfg.betas)
    opt_d = torch.optim.Adam(disc.parameters(), lr=cfg.lr, betas=cfg.betas)
    ema = _ema(model, cfg.ema_decay)
    parts = {"model": model, "disc": disc, "optimizer": opt, "optimizer_disc": opt_d}
    step, rng = _restore(out, "tokenizer", parts, ema, resume)

    def save() -> Path:
        return _save(out, "tokenizer", model_cfg, cfg, parts, ema, step)

    data = _loader(dataset, cfg.batch_size, cfg.seed, step, rng)
    fixed = torch.stack([dataset[i][0] for i in range(min(16, len(dataset)))]).to(device)
    usage = torch.zeros(model_cfg.n_codes, dtype=torch.long, device=device)
    bar = tqdm(total=cfg.steps, initial=step, desc="train-vqgan", disable=_quiet(progress),
               dynamic_ncols=True)
    t0, images_seen = time.time(), 0
    while step < cfg.steps:
        x = next(data)[0].to(device)
        gan_on = step >= cfg.disc_start and cfg.disc_weight > 0
        # Generator (tokenizer) update.
        disc.requires_grad_(False)
        with autocast(device, cfg.precision):
            x_hat, vq_loss, tokens = model(x)
            rec_loss = cfg.l1_weight * (x - x_hat).abs().mean()
            if lpips is not None:
                rec_loss = rec_loss + cfg.perceptual_weight * lpips(x_hat.float(), x).mean()
            loss = rec_loss + cfg.codebook_weight * vq_loss
            g_loss, lam = torch.zeros((), device=device), torch.zeros((), device=device)
            if gan_on:
                g_loss = generator_loss(disc(x_hat))
                lam = adaptive_weight(rec_loss, g_loss, model.last_layer, cfg.disc_weight)
                loss = loss + lam * g_loss
        _check_finite(loss, step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        ema.update_parameters(model)
        # Discriminator update, hinge loss on real vs detached reconstructions.
        d_loss = torch.zeros((), device=device)
        if gan_on:
            disc.requires_grad_(True)
            with autocast(device, cfg.precision):
                d_loss = hinge_d_loss(disc(x), disc(x_hat.detach()))
            opt_d.zero_grad(set_to_none=True)
            d_loss.backward()
            opt_d.step()
        usage += torch.bincount(tokens.flatten(), minlength=model_cfg.n_codes)
        step += 1
        images_seen += len(x)
        bar.update(1)

        if cfg.restart_dead_codes and step % cfg.restart_dead_codes == 0:
            dead = (usage == 0).nonzero().flatten()
            if len(dead):
                with torch.no_grad():
                    z = model.encoder(x).permute(0, 2, 3, 1).flatten(0, 2)
                    pick = torch.randint(0, len(z), (len(dead),), device=device)
                    model.quantizer.codebook.weight[dead] = z[pick].to(model.quantizer.codebook.weight.dtype)
            usage.zero_()
        if step % cfg.log_every == 0 or step == cfg.steps:
            psnr = 10 * math.log10(4.0 / max(F.mse_loss(x_hat.detach().float().clamp(-1, 1), x).item(), 1e-12))
            record = {"step": step, "loss": loss.item(), "rec_loss": rec_loss.item(), "vq_loss": vq_loss.item(),
                      "g_loss": g_loss.item(), "d_loss": d_loss.item(), "adaptive_weight": lam.item(),
                      "psnr": psnr, "batch_codebook_usage": tokens.unique().numel() / model_cfg.n_codes,
                      "lr": cfg.lr, "images_per_s": images_seen / (time.time() - t0)}
            _log(out / "log.jsonl", record)
            bar.set_postfix(loss=f"{record['loss']:.4f}", psnr=f"{psnr:.1f}")
        if step % cfg.save_every == 0 or step == cfg.steps:
            save()
        if step % cfg.sample_every == 0 or step == cfg.steps:
            with torch.no_grad():
                recon = ema.module.decode(ema.module.encode(fixed))
            save_grid(torch.cat([fixed, recon]), out / "samples" / f"step_{step:07d}.png", nrow=len(fixed))
    bar.close()
    return save() if step == 0 else out / "tokenizer.pt"  # step > 0: saved at the last step


def _lr_lambda(cfg: GeneratorTrainConfig):
    return lambda step: min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps else 1.0


def train_generator(model_cfg: HourglassConfig, cfg: GeneratorTrainConfig, dataset: Dataset, out: str | Path,
                    meta: dict[str, Any], tokenizer: VQGAN | None = None, device: str | torch.device = "cpu",
                    resume: bool = False, progress: bool = True) -> Path:
    """Train the hourglass denoiser with the unrolled SUNDAE loss; returns `out/generator.pt`.

    `dataset` items are (`h w` int64 tokens, int label); labels are used when `model_cfg.num_classes` > 0.
    `meta` (token grid, tokenizer path, class names) is stored in the checkpoint for `sundae sample`.
    `tokenizer`, if given, decodes the sample grids written every `sample_every` steps.
    `resume` continues from `out/generator.pt` exactly. Raises FloatingPointError naming the step when the
    loss is not finite (checkpoints stay intact).
    """
    device, out = torch.device(device), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    model = Hourglass(model_cfg).to(device)
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (decay if p.ndim >= 2 and "embedding" not in name else no_decay).append(p)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=cfg.betas)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(cfg))
    ema = _ema(model, cfg.ema_decay)
    parts = {"model": model, "optimizer": opt, "scheduler": sched}
    step, rng = _restore(out, "generator", parts, ema, resume)

    def save() -> Path:
        return _save(out, "generator", model_cfg, cfg, parts, ema, step, meta=meta)

    conditional = model_cfg.num_classes > 0
    data = _loader(dataset, cfg.batch_size, cfg.seed, step, rng)
    h, w = meta["grid"]
    grid_labels = torch.arange(min(model_cfg.num_classes, 10) or 1, device=device).repeat_interleave(8)
    bar = tqdm(total=cfg.steps, initial=step, desc="train", disable=_quiet(progress),
               dynamic_ncols=True)
    t0, tokens_seen = time.time(), 0
    while step < cfg.steps:
        tokens, labels = next(data)
        tokens, labels = tokens.to(device), labels.to(device) if conditional else None
        model.train()
        with autocast(device, cfg.precision):
            loss, per_step = unrolled_loss(lambda z: model(z, labels), tokens, model_cfg.vocab_size,
                                           cfg.unroll_steps)
        _check_finite(loss, step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or float("inf"))
        opt.step()
        sched.step()
        ema.update_parameters(model)
        step += 1
        tokens_seen += tokens.numel()
        bar.update(1)

        if step % cfg.log_every == 0 or step == cfg.steps:
            record = {"step": step, "loss": loss.item(), **{f"loss_{i + 1}": l.item() for i, l in enumerate(per_step)},
                      "grad_norm": grad_norm.item(), "lr": sched.get_last_lr()[0],
                      "tokens_per_s": tokens_seen / (time.time() - t0)}
            _log(out / "log.jsonl", record)
            bar.set_postfix(loss=f"{record['loss']:.3f}")
        if step % cfg.save_every == 0 or step == cfg.steps:
            save()
        if tokenizer is not None and (step % cfg.sample_every == 0 or step == cfg.steps):
            net = ema.module.eval()
            fn = (lambda z, rows: net(z, grid_labels[rows])) if conditional else (lambda z, rows: net(z))
            with torch.inference_mode(), autocast(device, cfg.precision):
                z, _ = sample(fn, (len(grid_labels), h, w), model_cfg.vocab_size, steps=cfg.sample_steps,
                              min_steps=cfg.sample_steps, generator=torch.Generator(device).manual_seed(0),
                              device=device)
                images = tokenizer.decode(z)
            save_grid(images.float(), out / "samples" / f"step_{step:07d}.png", nrow=8)
    bar.close()
    return save() if step == 0 else out / "generator.pt"  # step > 0: saved at the last step
