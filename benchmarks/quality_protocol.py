"""The parts of `benchmarks/quality.py`: the methods, training to checkpoints with resumable state, the samplers
and their tuning grids, the judge's metrics, and mean +- std over seeds with a tie rule.

Shapes (einops letters): tokens `b h w` int64 in [0, v); labels `b` int64; images `b 1 H W` in [-1, 1].
"""

from __future__ import annotations

import copy
import dataclasses
import math
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn

from baselines import (Autoregressive, MaskGIT, autoregressive_loss, autoregressive_sample, maskgit_sample,
                       masked_token_loss)
from sundae.eval.classifier import predict
from sundae.eval.metrics import classifier_features, frechet_distance, knn_radii, precision_recall
from sundae.hourglass import Hourglass, HourglassConfig
from sundae.optim import is_muon_param, muon
from sundae.pipeline import class_logits_fn
from sundae.sundae import SamplerConfig, sample, unrolled_loss
from sundae.train import ema_update

# ---- the methods ----------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Method:
    """One generator: its kind ("sundae", "maskgit" or "ar") and, for SUNDAE, the training levers."""

    kind: str
    unroll: int = 2
    unroll_share: float = 1.0
    corruption: str = "uniform"
    shorten_factor: int | None = None  # None: the preset's
    optimizer: str = "adamw"  # "muon": Muon for the hidden matrices (sundae.optim.generator_optimizers)


METHODS: dict[str, Method] = {
    "sundae": Method("sundae"),  # unroll 2: the paper's FFHQ setting
    "sundae_u1": Method("sundae", unroll=1),
    "sundae_u3": Method("sundae", unroll=3),
    "maskgit": Method("maskgit"),
    "ar": Method("ar"),
    "sundae_share": Method("sundae", unroll_share=0.25),
    "sundae_cosine": Method("sundae", corruption="cosine"),
    "sundae_s1": Method("sundae", shorten_factor=1),
    "sundae_muon": Method("sundae", optimizer="muon"),
}


def build(method: Method, base: HourglassConfig, grid: tuple[int, int], ar_layers: int) -> nn.Module:
    if method.kind == "maskgit":
        return MaskGIT(base)
    if method.kind == "ar":
        return Autoregressive(base, ar_layers, grid)
    cfg = base if method.shorten_factor is None else dataclasses.replace(base, shorten_factor=method.shorten_factor)
    return Hourglass(cfg)


def loss_fn(method: Method, codebook_size: int) -> Callable[[nn.Module, Tensor, Tensor, torch.Generator], Tensor]:
    """`loss(net, tokens, labels, generator)` -> scalar for the method."""
    if method.kind == "maskgit":
        return lambda net, z, y, g: masked_token_loss(lambda x: net(x, y), z, codebook_size, g)
    if method.kind == "ar":
        return lambda net, z, y, g: autoregressive_loss(net, z, y)

    def sundae(net, z, y, g):
        fn = lambda x, rows=None: net(x, y if rows is None else y[rows])  # noqa: E731  rows: the unrolled share
        return unrolled_loss(fn, z, codebook_size, method.unroll, g, unroll_share=method.unroll_share,
                             corruption=method.corruption)[0]
    return sundae


# ---- training to checkpoints ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Optim:
    """The quickstart's `fashion` generator settings, for every method."""

    lr: float = 1e-3
    warmup: int = 50
    weight_decay: float = 0.01
    clip: float = 1.0
    batch_size: int = 64
    ema_decay: float = 0.99  # with sundae.train.ema_decay_at's warm-up


def state_path(folder: Path, step: int) -> Path:
    return folder / f"step{step:06d}.pt"


def optimizers(net: nn.Module, opt_cfg: Optim, optimizer: str = "adamw") -> list[torch.optim.Optimizer]:
    """AdamW over every parameter (weight decay on all, as the benchmark has always trained); for "muon" the
    hidden matrices (`sundae.optim.is_muon_param`) go to Muon instead, at AdamW's update RMS and the same
    lr and weight decay, so that the optimizer of those matrices is the only change."""
    hidden, rest = [], []
    for name, p in net.named_parameters():
        (hidden if optimizer == "muon" and is_muon_param(name, p) else rest).append(p)
    opts = [torch.optim.AdamW(rest, lr=opt_cfg.lr, weight_decay=opt_cfg.weight_decay)]
    if hidden:
        opts.append(muon(hidden, opt_cfg.lr, opt_cfg.weight_decay))
    return opts


def train_to_checkpoints(net: nn.Module, loss: Callable, tokens: Tensor, labels: Tensor, checkpoints: list[int],
                         opt_cfg: Optim, seed: int, folder: Path, log: Callable[[str], None] = print,
                         optimizer: str = "adamw") -> None:
    """Train `net` to max(checkpoints) steps, saving the whole state (weights, EMA, optimizer, data and RNG
    state, cumulative training CPU and wall seconds, recent loss) at each checkpoint as `folder/stepNNNNNN.pt`.
    Continues from the latest saved checkpoint: the result is the same as one uninterrupted run (the data
    order and the loss's noise come from one generator whose state is saved)."""
    folder.mkdir(parents=True, exist_ok=True)
    done = [c for c in checkpoints if state_path(folder, c).is_file()]
    todo = [c for c in checkpoints if c > max(done, default=0)]
    if not todo:
        return
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    opts = optimizers(net, opt_cfg, optimizer)
    ema = copy.deepcopy(net).requires_grad_(False)
    step, cpu_s, wall_s, losses = 0, 0.0, 0.0, []
    if done:
        state = torch.load(state_path(folder, max(done)), weights_only=True)
        net.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        for opt, key in zip(opts, ("optimizer", "optimizer_muon")):
            opt.load_state_dict(state[key])
        gen.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        step, cpu_s, wall_s, losses = state["step"], state["train_cpu_s"], state["train_wall_s"], state["losses"]
        log(f"    resumed at step {step}")
    net.train()
    cpu0, wall0 = time.process_time() - cpu_s, time.perf_counter() - wall_s
    while step < todo[-1]:
        idx = torch.randint(0, len(tokens), (opt_cfg.batch_size,), generator=gen)
        for group in (g for opt in opts for g in opt.param_groups):
            group["lr"] = opt_cfg.lr * min(1.0, (step + 1) / opt_cfg.warmup)
        value = loss(net, tokens[idx], labels[idx], gen)
        for opt in opts:
            opt.zero_grad(set_to_none=True)
        value.backward()
        nn.utils.clip_grad_norm_(net.parameters(), opt_cfg.clip)
        for opt in opts:
            opt.step()
        ema_update(ema, net, opt_cfg.ema_decay, step)
        losses = (losses + [value.item()])[-20:]
        step += 1
        if step in todo:
            state = {"model": net.state_dict(), "ema": ema.state_dict(),
                     **{key: opt.state_dict() for opt, key in zip(opts, ("optimizer", "optimizer_muon"))},
                     "generator": gen.get_state(), "torch_rng": torch.get_rng_state(), "step": step,
                     "train_cpu_s": time.process_time() - cpu0, "train_wall_s": time.perf_counter() - wall0,
                     "losses": losses}
            tmp = state_path(folder, step).with_suffix(".tmp")
            torch.save(state, tmp)
            tmp.replace(state_path(folder, step))
            log(f"    step {step}: loss {statistics.fmean(losses):.3f}, {state['train_cpu_s']:.0f} CPU s")


def load_checkpoint(net: nn.Module, folder: Path, step: int, weights: str) -> tuple[nn.Module, dict[str, Any]]:
    """`net` with the checkpoint's "ema" or "raw" weights, in eval mode; and its training statistics."""
    state = torch.load(state_path(folder, step), weights_only=True)
    net.load_state_dict(state["ema" if weights == "ema" else "model"])
    stats = {"train_cpu_s": state["train_cpu_s"], "train_wall_s": state["train_wall_s"],
             "loss": statistics.fmean(state["losses"])}
    return net.eval(), stats


# ---- samplers and their grids ---------------------------------------------------------------------------


def sampler_grid(kind: str, smoke: bool) -> list[dict[str, Any]]:
    """The sampler settings tuned on the validation split; T (steps) is set by the caller."""
    if kind == "sundae":
        # 0.7 of the planned {0.6, 0.7, 0.8, 1.0} is left out to fit the default run's time.
        temps, updates = ((0.8, 1.0), ((1.0, 0.5),)) if smoke else ((0.6, 0.8, 1.0), ((0.5, 0.5), (1.0, 0.5), (0.8, 0.8)))
        return [{"temperature": t, "update_proportion": list(u)} for t in temps for u in updates]
    if kind == "maskgit":
        temps = (1.0,) if smoke else (0.6, 0.8, 1.0)
        return [{"temperature": t, "choice_temperature": c} for t in temps for c in (2.0, 4.5)]
    return [{"temperature": t} for t in ((0.9, 1.0) if smoke else (0.8, 0.9, 1.0))]


def draw(kind: str, setting: dict[str, Any], steps: int, net: nn.Module, labels: Tensor, gen: torch.Generator,
         grid: tuple[int, int]) -> tuple[Tensor, float]:
    """One batch of samples for `labels` -> (tokens `b h w`, network calls summed over the batch). SUNDAE stops
    a sample early once a step after the 10th changes nothing (SamplerConfig's default); AR takes h*w steps."""
    b = len(labels)
    if kind == "sundae":
        sampler = SamplerConfig(steps=steps, temperature=setting["temperature"],
                                update_proportion=tuple(setting["update_proportion"]))
        z, taken = sample(class_logits_fn(net, labels), (b, *grid), net.cfg.codebook_size, sampler, generator=gen)
        return z, taken.float().sum().item()
    if kind == "maskgit":
        z, calls = maskgit_sample(lambda x: net(x, labels), (b, *grid), net.codebook_size, steps,
                                  setting["temperature"], setting["choice_temperature"], generator=gen)
        return z, float(calls * b)
    z = autoregressive_sample(net, b, labels, temperature=setting["temperature"], generator=gen)
    return z, float(grid[0] * grid[1] * b)


@torch.inference_mode()
def generate(kind: str, setting: dict[str, Any], steps: int, net: nn.Module, decode: Callable[[Tensor], Tensor],
             labels: Tensor, batch: int, grid: tuple[int, int], seed: int) -> tuple[Tensor, dict[str, float]]:
    """Samples for `labels`, `batch` at a time, decoded -> (images `b 1 H W`, calls and seconds per image; the
    decode, the same for every method, is not timed)."""
    gen = torch.Generator().manual_seed(seed)
    tokens, calls, wall, cpu = [], 0.0, 0.0, 0.0
    for i in range(0, len(labels), batch):
        w0, c0 = time.perf_counter(), time.process_time()
        z, c = draw(kind, setting, steps, net, labels[i:i + batch], gen, grid)
        wall, cpu, calls = wall + time.perf_counter() - w0, cpu + time.process_time() - c0, calls + c
        tokens.append(z)
    n = len(labels)
    return decode(torch.cat(tokens)), {"calls_per_image": calls / n, "s_per_image": wall / n,
                                       "cpu_s_per_image": cpu / n}


# ---- the judge ------------------------------------------------------------------------------------------


class Judge:
    """The classifier's view of a split: its features (`n 128`) and, for k-NN precision and recall, the k = 3
    radii of the real manifold, computed once."""

    def __init__(self, classifier: nn.Module, images: Tensor, with_radii: bool):
        self.classifier = classifier
        self.feats = classifier_features(classifier, images)
        self.radii = knn_radii(self.feats, 3) if with_radii else None

    def fid(self, images: Tensor) -> float:
        return frechet_distance(classifier_features(self.classifier, images), self.feats)

    def score(self, images: Tensor, labels: Tensor) -> dict[str, float]:
        """Classifier-FID against this split, class accuracy, k-NN precision and recall (k = 3)."""
        feats = classifier_features(self.classifier, images)
        precision, recall = precision_recall(self.feats, feats, k=3, real_radii=self.radii)
        accuracy = (predict(self.classifier, images) == labels).float().mean().item()
        return {"cfid": frechet_distance(feats, self.feats), "accuracy": accuracy, "precision": precision,
                "recall": recall}


# ---- spread over seeds ----------------------------------------------------------------------------------


def spread(values: list[float]) -> dict[str, Any]:
    """Mean, sample standard deviation (0 for one value) and the per-seed values."""
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "n": len(values), "values": values}


def verdict(a: dict[str, Any], b: dict[str, Any], lower_is_better: bool = True) -> str:
    """"a", "b" or "tie" for two `spread`s: a tie when |mean_a - mean_b| < sqrt(std_a^2 + std_b^2), the spread
    of the difference of two independent estimates. A one-seed side adds no spread (its std is 0), so against
    a seeded method only the seeded one's spread counts; with one seed on both sides: "no spread"."""
    if a["n"] < 2 and b["n"] < 2:
        return "no spread"
    diff = a["mean"] - b["mean"]
    if abs(diff) < math.hypot(a["std"], b["std"]):
        return "tie"
    return "a" if (diff < 0) == lower_is_better else "b"
