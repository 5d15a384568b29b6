"""Training loops: `train_vqgan` (stage 1) and `train_generator` (stage 2), each readable in one pass.

The only code that owns optimizers and writes files during training. A run folder holds `tokenizer.pt` or
`generator.pt` (the last checkpoint, resumable), `checkpoints/step_NNNNNNN.pt`, `log.jsonl` and
`samples/step_NNNNNNN.png` grids made with the EMA weights (see `sundae.runs`), and `.lock` while a run
trains in it: a second run on the same folder is refused (`runs.RunLock`).

One code path from one CPU to many nodes (`sundae.distributed`): under `torchrun` the model is wrapped in
DDP (or sharded with FSDP2 `fully_shard`, generator only), each rank reads its slice of the same global
batch, rank 0 writes every file and logs losses averaged over ranks. `batch_size` is the global batch: it
is split over the processes and `grad_accum` micro-batches, and the generator's noise is drawn per sample
(seeded by step and position in the global batch), so 1 process, N processes and accumulation give the
same update up to float rounding. SIGTERM/SIGINT stop a run at the next step boundary after a checkpoint.
EMA weights start as a copy of the model and follow ema <- d_t * ema + (1 - d_t) * weights after step t
(0-based), with the warm-up d_t = min(decay, (1 + t) / (10 + t)) (`ema_decay_at`): without it a fraction
decay^t of the EMA is still the random initialisation after t steps (0.99^300 = 5%), which penalises short runs.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import signal
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from sundae import distributed
from sundae import runs
from sundae.data import data_loader
from sundae.distributed import EpochBatchSampler
from sundae.eval.metrics import LOW_CODEBOOK_USAGE
from sundae.hourglass import Hourglass, HourglassConfig
from sundae.images import save_grid
from sundae.io import log
from sundae.losses import LPIPS, PatchDiscriminator, adaptive_weight, generator_loss, hinge_d_loss
from sundae.optim import fused_optimizer, generator_optimizers, keep_fused
from sundae.pipeline import SundaePipeline
from sundae.sundae import SamplerConfig, condition_dropout, unrolled_loss
from sundae.vqgan import VQGAN, VQGANConfig

from sundae.train_config import (GENERATOR_TRAIN_PRESETS, PRECISIONS, VQGAN_TRAIN_PRESETS,  # noqa: F401
                                 GeneratorTrainConfig, VQGANTrainConfig, lr_factor)


class Interrupted(Exception):
    """Training stopped by SIGTERM/SIGINT after writing a checkpoint at `step`; `--resume` continues it."""

    def __init__(self, signum: int, step: int, path: Path):
        self.signum, self.step, self.path = signum, step, path
        super().__init__(f"stopped by {signal.Signals(signum).name} at step {step}; checkpoint {path} written, "
                         f"continue with --resume (`sundae quickstart`: the same command again)")


def resolve_device(name: str = "auto") -> torch.device:
    """"auto" -> cuda if available, else cpu; anything else is passed to torch.device."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """bf16/fp16 autocast, nothing for "fp32". Logits, cross-entropy, sampling and the codebook distances
    stay fp32 inside the models; attention accumulates its softmax in fp32 (`hourglass.Attention`)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    dtype = PRECISIONS[precision]
    return contextlib.nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)


def _loader(dataset: Dataset, cfg: Any, start_step: int, ctx: distributed.Dist, rng: Any = None,
            workers: int = 0) -> Iterator:
    """Endless (this rank's share of the global batch) from `start_step` on, read in `workers` processes; the
    sampler picks the batches here, so they do not depend on `workers`. The workers are seeded from (seed,
    start_step, rank) (`data_loader`): a resumed run's do not replay the first steps' random draws. A resumed
    run's RNG state `rng` is set after the loader is built."""
    sampler = EpochBatchSampler(len(dataset), cfg.batch_size, cfg.seed, start_step, ctx.rank, ctx.world)
    seed = int(np.random.SeedSequence([cfg.seed, start_step, ctx.rank]).generate_state(1)[0])
    loader = iter(data_loader(dataset, workers, ctx.device, batch_sampler=sampler, seed=seed))
    if rng is not None:
        runs.set_rng_state(rng)
    return loader


def _micro_batches(cfg: Any, ctx: distributed.Dist) -> int:
    """Micro-batch size per process; raises ValueError when the global batch does not split evenly."""
    if cfg.batch_size % (ctx.world * cfg.grad_accum):
        raise ValueError(f"batch_size {cfg.batch_size} must be a multiple of processes x grad_accum "
                         f"= {ctx.world} x {cfg.grad_accum}")
    return cfg.batch_size // (ctx.world * cfg.grad_accum)


def _no_sync(net: nn.Module, last: bool) -> contextlib.AbstractContextManager:
    """Skip the gradient all-reduce on all but the last micro-batch of a step (DDP; FSDP syncs each time)."""
    return net.no_sync() if isinstance(net, DistributedDataParallel) and not last else contextlib.nullcontext()


def _sample_generators(cfg: Any, step: int, first: int, count: int, device: torch.device) -> list[torch.Generator]:
    """One generator per sample, seeded by (seed, step, index in the global batch): the noise a sample gets
    does not depend on which process or micro-batch it lands in."""
    base = (cfg.seed * 1_000_003 + step) * cfg.batch_size
    return [torch.Generator(device).manual_seed(base + first + i) for i in range(count)]


def _rows_fn(net: nn.Module, labels: Tensor | None, kwargs: dict) -> Any:
    """The logits function `unrolled_loss` calls: fn(z) for the whole micro-batch, fn(z, rows) for some rows."""
    def fn(z: Tensor, rows: Tensor | None = None) -> Tensor:
        if rows is None:
            return net(z, labels, **kwargs)
        part = {k: tuple(t[rows] for t in v) if isinstance(v, tuple) else v[rows] for k, v in kwargs.items()}
        return net(z, None if labels is None else labels[rows], **part)
    return fn


def _ema_copy(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model).requires_grad_(False)


def ema_decay_at(decay: float, step: int) -> float:
    """The EMA decay used after training step `step` (0-based): min(decay, (1 + step) / (10 + step)).

    A warm-up, so that the EMA forgets its random initialisation: after the first step it sits 90% of the way
    to the weights, and the decay reaches 0.99 at step 890 and 0.999 at step 8990 (the schedule of
    tensorflow's ExponentialMovingAverage with num_updates, also used by taming-transformers' LitEma).
    """
    return min(decay, (1.0 + step) / (10.0 + step))


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, decay: float, step: int) -> None:
    """ema <- d * ema + (1 - d) * model for parameters, d = ema_decay_at(decay, step); buffers are copied."""
    decay = ema_decay_at(decay, step)
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p.detach(), 1.0 - decay)
    for e, b in zip(ema.buffers(), model.buffers()):
        e.copy_(b)


@torch.no_grad()
def restart_dead_codes(model: VQGAN, ema: VQGAN, batch: Tensor, usage: Tensor, ctx: distributed.Dist) -> int:
    """Restart the codes with `usage` 0 (`codebook_size` counts since the last check) at encoder outputs of
    `batch` (`b c H W` in [-1, 1]), in the codebook and in the EMA codebook; returns how many restarted.

    Only distinct encoder outputs are candidates, drawn without replacement, so at most as many codes
    restart as there are distinct vectors: several codes restarted onto one vector would leave all but one
    dead again at the next check. Under torchrun rank 0's choice is broadcast. The EMA codebook (what
    `load_tokenizer` returns) takes the restarted rows too: averaging a restarted code with its dead old value
    would leave it where no encoder output lands.
    """
    dead = (usage == 0).nonzero().flatten()
    if not len(dead):
        return 0
    z = model.encoder(batch).permute(0, 2, 3, 1).flatten(0, 2).unique(dim=0)
    n = min(len(dead), len(z))
    chosen = dead[torch.randperm(len(dead), device=dead.device)[:n]]
    codebook = model.quantizer.codebook.weight
    codebook[chosen] = z[torch.randperm(len(z), device=z.device)[:n]].to(codebook.dtype)
    distributed.broadcast(codebook, ctx)
    ema.quantizer.codebook.weight[dead] = codebook[dead]
    return n


def _quiet(progress: bool, ctx: distributed.Dist) -> bool:
    """True when the progress bar should be hidden: not rank 0, asked for, or TQDM_DISABLE set."""
    return not ctx.main or not progress or bool(os.environ.get("TQDM_DISABLE"))


def _check_finite(loss: Tensor, step: int, checkpoint: Path) -> None:
    """Raise FloatingPointError for a non-finite loss, saying what `checkpoint` (the run's last one) holds."""
    if not torch.isfinite(loss):
        if checkpoint.is_file():
            kept = "the last good checkpoint is kept (continue from it with --resume, e.g. with a lower lr)"
        else:
            kept = "the run has no checkpoint yet (start again, e.g. with a lower lr)"
        raise FloatingPointError(f"loss is {loss.item()} at step {step}; nothing was saved for this step, {kept}")


def train_vqgan(model_cfg: VQGANConfig, cfg: VQGANTrainConfig, dataset: Dataset, out: str | Path,
                device: str | torch.device = "cpu", resume: bool = False, progress: bool = True,
                overwrite: bool = False, init_from: str | Path | None = None, workers: int = 0) -> Path:
    """Train the tokenizer on `dataset` (items (`c H W` in [-1, 1], label)), read in `workers` DataLoader
    processes (the same batches and result as 0, `sundae.data.data_loader`); returns `out/tokenizer.pt`.

    Per step: L = l1 * |x - x_hat| + perceptual * LPIPS + codebook * L_VQ (+ lambda * (-D(x_hat)) from
    `disc_start`, lambda the adaptive weight), then one discriminator hinge step (Esser et al. eq. 5-7).
    Under torchrun the tokenizer and the discriminator are DDP replicas; the generator's adversarial term
    calls the unwrapped discriminator (frozen there), so before `disc_start` the DDP discriminator is simply
    never called. The adaptive weight compares this rank's gradients (per-rank, as in taming's DDP runs).
    `resume` continues from `out/tokenizer.pt` exactly (model, EMA, discriminator, optimizers, scaler, data
    position, RNG, dead-code counts); `overwrite` starts over in a folder holding a run (`runs.restore`).
    `init_from` (a tokenizer checkpoint, run, export or bundle; `model_cfg` must be its config) starts a new
    run from its weights and EMA, and its discriminator if it has one (`runs.start_from`; resume wins).
    Raises ValueError when the model's patches are larger than the token grid, FloatingPointError naming the
    step when the loss is not finite
    (nothing is saved for that step), Interrupted after saving when SIGTERM/SIGINT arrive, `runs.RunInUse`
    when another training run holds `out` (`runs.RunLock`), OSError naming the file a full disk refused.
    """
    ctx = distributed.setup(device)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with runs.RunLock(out, ctx):
        return _train_vqgan(model_cfg, cfg, dataset, out, ctx, resume, progress, overwrite, init_from, workers)


def _train_vqgan(model_cfg: VQGANConfig, cfg: VQGANTrainConfig, dataset: Dataset, out: Path, ctx: distributed.Dist,
                 resume: bool, progress: bool, overwrite: bool, init_from: str | Path | None, workers: int) -> Path:
    """`train_vqgan` itself, run while this process holds the run folder."""
    device = ctx.device
    micro = _micro_batches(cfg, ctx)
    torch.manual_seed(cfg.seed)
    model = VQGAN(model_cfg).to(device)
    disc = PatchDiscriminator(model_cfg.in_channels, cfg.disc_filters, cfg.disc_layers).to(device)
    lpips = LPIPS(cfg.vgg16_path or None).to(device) if cfg.perceptual_weight > 0 else None
    fused = fused_optimizer(device)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=cfg.betas, **fused)
    opt_d = torch.optim.Adam(disc.parameters(), lr=cfg.lr, betas=cfg.betas, **fused)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.precision == "fp16")
    ema = _ema_copy(model)
    usage = torch.zeros(model_cfg.codebook_size, dtype=torch.long, device=device)  # since the last dead-code check
    parts = {"model": model, "disc": disc, "optimizer": opt, "optimizer_disc": opt_d, "scaler": scaler}
    step, rng, ckpt = runs.restore(out, "tokenizer", parts, ema, resume, ctx, overwrite, init_from)
    init = runs.start_from(init_from, "tokenizer", model_cfg, parts, ema, ckpt, out, ctx)
    runs.set_hparams([opt, opt_d], None, cfg, step)
    keep_fused([opt, opt_d], fused)
    if "usage" in ckpt:
        usage.copy_(ckpt["usage"])
    net, net_d = distributed.parallel(model, ctx), distributed.parallel(disc, ctx)

    def save() -> Path:
        return runs.save(out, "tokenizer", model_cfg, cfg, parts, ema, step, ctx, usage=usage.cpu(), init=init)

    data = _loader(dataset, cfg, step, ctx, rng, workers)
    fixed = torch.stack([dataset[i][0] for i in range(min(16, len(dataset)))]).to(device)
    log_usage = torch.zeros_like(usage)
    bar = tqdm(total=cfg.steps, initial=step, desc="train-vqgan", disable=_quiet(progress, ctx), dynamic_ncols=True)
    t0, images_seen, grid_tokens = time.time(), 0, 0
    restarted, warned = 0, False  # codes restarted since the last log record; low-usage warning given
    # `bar` in the with closes it on any exit: an error mid-run prints it at once, not at a later garbage collection.
    with runs.StopOnSignal() as stop, runs.RunLog(out, cfg.logger, step, ctx) as run_log, bar:
        while step < cfg.steps:
            batch = next(data)[0].to(device, non_blocking=True)
            # Dead codes restart at the start of the step after every restart_dead_codes-th, never after the
            # last one (a code restarted then would be used with a decoder that never saw it); a resumed run
            # does it first, from the saved counts, as the uninterrupted run would have.
            if cfg.restart_dead_codes and step and step % cfg.restart_dead_codes == 0:
                restarted += restart_dead_codes(model, ema, batch, distributed.total(usage, ctx), ctx)
                usage.zero_()
            gan_on = step >= cfg.disc_start and cfg.disc_weight > 0
            # Generator (tokenizer) update, accumulated over micro-batches.
            disc.requires_grad_(False)
            opt.zero_grad(set_to_none=True)
            sums = torch.zeros(5, device=device)  # loss, rec, vq, g, lambda: means over the step's micro-batches
            recons = []
            for m, x in enumerate(batch.split(micro)):
                with _no_sync(net, m == cfg.grad_accum - 1), autocast(device, cfg.precision):
                    x_hat, vq_loss, tokens = net(x)
                    rec_loss = cfg.l1_weight * (x - x_hat).abs().mean()
                    if lpips is not None:
                        rec_loss = rec_loss + cfg.perceptual_weight * lpips(x_hat.float(), x).mean()
                    loss = rec_loss + cfg.codebook_weight * vq_loss
                    g_loss, lam = torch.zeros((), device=device), torch.zeros((), device=device)
                    if gan_on:
                        g_loss = generator_loss(disc(x_hat))  # unwrapped: frozen here, no DDP bookkeeping
                        lam = adaptive_weight(rec_loss, g_loss, model.last_layer, cfg.disc_weight)
                        loss = loss + lam * g_loss
                    scaler.scale(loss / cfg.grad_accum).backward()
                sums += torch.stack([loss, rec_loss, vq_loss, g_loss, lam]).detach().float() / cfg.grad_accum
                recons.append(x_hat.detach())
                usage += torch.bincount(tokens.flatten(), minlength=model_cfg.codebook_size)
                log_usage += torch.bincount(tokens.flatten(), minlength=model_cfg.codebook_size)
                grid_tokens = tokens[0].numel()
            sums = distributed.mean(sums, ctx)
            _check_finite(sums[0], step, out / "tokenizer.pt")
            scaler.step(opt)
            ema_update(ema, model, cfg.ema_decay, step)
            # Discriminator update, hinge loss on real vs detached reconstructions.
            d_loss = torch.zeros((), device=device)
            if gan_on:
                disc.requires_grad_(True)
                opt_d.zero_grad(set_to_none=True)
                for m, (x, x_hat) in enumerate(zip(batch.split(micro), recons)):
                    with _no_sync(net_d, m == cfg.grad_accum - 1), autocast(device, cfg.precision):
                        part = hinge_d_loss(net_d(x), net_d(x_hat))
                        scaler.scale(part / cfg.grad_accum).backward()
                    d_loss = d_loss + part.detach().float() / cfg.grad_accum
                scaler.step(opt_d)
            scaler.update()
            step += 1
            images_seen += len(batch) * ctx.world
            bar.update(1)

            if step % cfg.log_every == 0 or step == cfg.steps:
                x_hat = torch.cat(recons).float().clamp(-1, 1)
                mse = distributed.mean(F.mse_loss(x_hat, batch).detach(), ctx).item()
                d_loss = distributed.mean(d_loss, ctx)
                used = (distributed.total(log_usage, ctx) > 0).sum().item()
                seconds = time.time() - t0
                record = {"step": step, "loss": sums[0].item(), "rec_loss": sums[1].item(),
                          "vq_loss": sums[2].item(), "g_loss": sums[3].item(), "d_loss": d_loss.item(),
                          "adaptive_weight": sums[4].item(), "psnr": 10 * math.log10(4.0 / max(mse, 1e-12)),
                          "codebook_usage": used / model_cfg.codebook_size, "codes_restarted": restarted,
                          "lr": cfg.lr,
                          "images_per_s": images_seen / seconds, "tokens_per_s": images_seen * grid_tokens / seconds}
                log_usage.zero_()
                restarted = 0
                run_log.log(record)
                if ctx.main:
                    if step >= 1000 and record["codebook_usage"] < LOW_CODEBOOK_USAGE and not warned:
                        warned = True  # once a run; by step 1000 a healthy codebook is in use
                        log.warning(f"step {step}: {record['codebook_usage']:.0%} of the codebook in use in the "
                                    f"last {cfg.log_every} steps: it is collapsing"
                                    + ("" if cfg.restart_dead_codes else " (set restart_dead_codes, e.g. 1000)"))
                bar.set_postfix(loss=f"{record['loss']:.4f}", psnr=f"{record['psnr']:.1f}")
            if step % cfg.save_every == 0 or step == cfg.steps:
                save()
            if ctx.main and (step % cfg.sample_every == 0 or step == cfg.steps):
                with torch.no_grad():
                    recon = ema.decode(ema.encode(fixed))
                save_grid(torch.cat([fixed, recon]), out / "samples" / f"step_{step:07d}.png", nrow=len(fixed))
            signum = distributed.largest(stop.signum, ctx)  # a signal on any rank stops all
            if signum and step < cfg.steps:
                path = save()
                raise Interrupted(signum, step, path)
    return save() if step == 0 else out / "tokenizer.pt"  # step > 0: saved at the last step


def train_generator(model_cfg: HourglassConfig, cfg: GeneratorTrainConfig, dataset: Dataset, out: str | Path,
                    meta: dict[str, Any], tokenizer: VQGAN | None = None, device: str | torch.device = "cpu",
                    resume: bool = False, progress: bool = True, overwrite: bool = False,
                    init_from: str | Path | None = None) -> Path:
    """Train the hourglass denoiser with the unrolled SUNDAE loss; returns `out/generator.pt`.

    `dataset` items are (`h w` int64 tokens, int label), plus (text features `n e`, mask `n`, pooled `e`)
    for a text model (`model_cfg.text_dim` > 0, `sundae.tokens.TokenDataset` of a captioned folder); labels are
    used when `model_cfg.num_classes` > 0.
    `meta` (token grid, tokenizer path, class names) is stored in the checkpoint for `sundae sample`, with the
    tokenizer's path relative to `out` added.
    `tokenizer`, if given, decodes the sample grids written every `sample_every` steps (EMA weights).
    Conditional models train each sample with the null condition with probability `cfg.cond_dropout`
    (classifier-free guidance, Ho & Salimans 2022); that draw, the corruption and the unroll noise of
    sample j of step s come from a generator seeded by (seed, s, j), so
    the update does not depend on the number of processes or `grad_accum`. `resume` continues from
    `out/generator.pt` exactly; `overwrite` starts over in a folder holding a run (`runs.restore`).
    `init_from` (a generator checkpoint, run, export or bundle) starts a new run from its weights and EMA
    (`runs.start_from`; resume wins): `model_cfg` must be its config, except for more classes (new rows).
    Raises ValueError when the model's patches are larger than the token grid, FloatingPointError naming the
    step when the loss is not finite
    (nothing is saved for that step), Interrupted after saving when SIGTERM/SIGINT arrive, `runs.RunInUse`
    when another training run holds `out` (`runs.RunLock`), OSError naming the file a full disk refused.
    """
    ctx = distributed.setup(device)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with runs.RunLock(out, ctx):
        return _train_generator(model_cfg, cfg, dataset, out, meta, tokenizer, ctx, resume, progress, overwrite,
                                init_from)


def _train_generator(model_cfg: HourglassConfig, cfg: GeneratorTrainConfig, dataset: Dataset, out: Path,
                     meta: dict[str, Any], tokenizer: VQGAN | None, ctx: distributed.Dist, resume: bool,
                     progress: bool, overwrite: bool, init_from: str | Path | None) -> Path:
    """`train_generator` itself, run while this process holds the run folder."""
    device = ctx.device
    if meta.get("tokenizer"):  # lets `SundaePipeline.from_pretrained` find it again if both folders move together
        meta = {**meta, "tokenizer_relpath": os.path.relpath(Path(meta["tokenizer"]).resolve(), out.resolve())}
    micro = _micro_batches(cfg, ctx)
    patch = model_cfg.patch
    if any(p > g for p, g in zip(patch, meta["grid"])):
        raise ValueError(f"shorten_factor {model_cfg.shorten_factor} makes {patch[0]}x{patch[1]} patches, larger "
                         f"than the {meta['grid'][0]}x{meta['grid'][1]} token grid: use a smaller shorten_factor")
    torch.manual_seed(cfg.seed)
    model = Hourglass(model_cfg).to(device)
    ema = _ema_copy(model)
    sharded = ctx.active and cfg.sharding == "fsdp"
    if sharded:  # every block, then the root; parameters become sharded DTensors in place
        for module in (model, ema):
            distributed.parallel(module, ctx, shard=[*module.pre, *module.valley, *module.post])
    fused = fused_optimizer(device, sharded)
    opts = generator_optimizers(model, cfg, fused, sharded)  # "optimizer" (AdamW), "optimizer_muon" (Muon)
    scheds = {k.replace("optimizer", "scheduler"): torch.optim.lr_scheduler.LambdaLR(o, lambda i: lr_factor(cfg, i))
              for k, o in opts.items()}
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.precision == "fp16")
    parts = {"model": model, **opts, **scheds, "scaler": scaler}
    step, rng, ckpt = runs.restore(out, "generator", parts, ema, resume, ctx, overwrite, init_from)
    init = runs.start_from(init_from, "generator", model_cfg, parts, ema, ckpt, out, ctx)
    for opt, sched in zip(opts.values(), scheds.values()):
        runs.set_hparams([opt], sched, cfg, step)
    keep_fused([opts["optimizer"]], fused)
    net = model if sharded else distributed.parallel(model, ctx)

    def save() -> Path:
        return runs.save(out, "generator", model_cfg, cfg, parts, ema, step, ctx, meta=meta, init=init)

    has_classes, has_text = model_cfg.num_classes > 0, model_cfg.text_dim > 0
    conditional = has_classes or has_text
    data = _loader(dataset, cfg, step, ctx, rng)
    h, w = meta["grid"]
    if has_text:  # the grids show the captions of the first 16 items (8 per row: 2 rows)
        count = min(16, len(dataset))
        grid_text = tuple(torch.stack([dataset[i][k] for i in range(count)]).to(device) for k in (2, 3, 4))
        grid_labels = torch.tensor([dataset[i][1] for i in range(count)], device=device)
    else:
        grid_text = None
        grid_labels = torch.arange(min(model_cfg.num_classes, 10) or 1, device=device).repeat_interleave(8)
    bar = tqdm(total=cfg.steps, initial=step, desc="train", disable=_quiet(progress, ctx), dynamic_ncols=True)
    t0, tokens_seen = time.time(), 0
    with runs.StopOnSignal() as stop, runs.RunLog(out, cfg.logger, step, ctx) as run_log, bar:
        while step < cfg.steps:
            tokens, labels, *text = (t.to(device) for t in next(data))
            model.train()
            for opt in opts.values():
                opt.zero_grad(set_to_none=True)
            sums = torch.zeros(cfg.unroll_steps + 1, device=device)  # loss, then per unroll step
            for m in range(cfg.grad_accum):
                rows = slice(m * micro, (m + 1) * micro)
                gens = _sample_generators(cfg, step, ctx.rank * micro * cfg.grad_accum + m * micro, micro, device)
                lab = labels[rows] if has_classes else None
                kwargs = {"text": tuple(t[rows] for t in text)} if has_text else {}
                if conditional and cfg.cond_dropout > 0:  # drawn first from each sample's own generator
                    kwargs["drop"] = condition_dropout(micro, cfg.cond_dropout, device, gens)
                with _no_sync(net, m == cfg.grad_accum - 1), autocast(device, cfg.precision):
                    loss, per_step = unrolled_loss(_rows_fn(net, lab, kwargs), tokens[rows], model_cfg.codebook_size,
                                                   cfg.unroll_steps, gens, unroll_share=cfg.unroll_share,
                                                   corruption=cfg.corruption)
                    scaler.scale(loss / cfg.grad_accum).backward()
                sums += torch.stack([loss, *per_step]).detach().float() / cfg.grad_accum
            sums = distributed.mean(sums, ctx)
            _check_finite(sums[0], step, out / "generator.pt")
            for opt in opts.values():
                scaler.unscale_(opt)
            grad_norm = distributed.local(
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or float("inf")))
            # fp16: an overflow anywhere skips every optimizer's step (each `unscale_` sees only its own gradients,
            # and the clipping above spreads one optimizer's inf to the others' as NaN or zeros).
            overflow = scaler.is_enabled() and not torch.isfinite(grad_norm)
            for opt, sched in zip(opts.values(), scheds.values()):
                if not overflow:
                    scaler.step(opt)
                sched.step()
            scaler.update()
            ema_update(ema, model, cfg.ema_decay, step)
            step += 1
            tokens_seen += tokens.numel() * ctx.world
            bar.update(1)

            if step % cfg.log_every == 0 or step == cfg.steps:
                record = {"step": step, "loss": sums[0].item(),
                          **{f"loss_{i + 1}": v.item() for i, v in enumerate(sums[1:])},
                          "grad_norm": grad_norm.item(), "lr": scheds["scheduler"].get_last_lr()[0],
                          "tokens_per_s": tokens_seen / (time.time() - t0)}
                run_log.log(record)
                bar.set_postfix(loss=f"{record['loss']:.3f}")
            if step % cfg.save_every == 0 or step == cfg.steps:
                save()
            if tokenizer is not None and (ctx.main or sharded) and (step % cfg.sample_every == 0 or step == cfg.steps):
                ema.eval()  # under FSDP every rank runs the (collective) forward; rank 0 writes
                pipe = SundaePipeline(ema, tokenizer, meta, precision=cfg.precision)
                sampler = SamplerConfig(steps=cfg.sample_steps, early_stop=False)
                images = torch.cat([batch for _, batch, _, _ in pipe.generate(
                    len(grid_labels), grid_labels if has_classes else None, sampler=sampler, seed=0,
                    batch_size=len(grid_labels), progress=False, text_features=grid_text)])
                if sharded:
                    ema.reshard()  # a forward without backward leaves the root's parameters gathered
                if ctx.main:
                    save_grid(images.float(), out / "samples" / f"step_{step:07d}.png", nrow=8)
            signum = distributed.largest(stop.signum, ctx)  # a signal on any rank stops all
            if signum and step < cfg.steps:
                path = save()
                raise Interrupted(signum, step, path)
    return save() if step == 0 else out / "generator.pt"  # step > 0: saved at the last step
