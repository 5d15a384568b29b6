"""The SUNDAE process as plain functions: corruption, unrolled denoising loss, sampler, keep-masks and
the fill that keeps masked pixels out of an inpainting's encoding.

Savinov et al., "Step-unrolled Denoising Autoencoders for Text Generation" (arXiv 2112.06749), as used for
images by McKinney & Willcocks (arXiv 2206.12351). Nothing here owns a model or an optimizer: the loss and
the sampler take a *logits function*, and conditioning (class labels, guidance) is a closure around the
network, so inpainting and new conditioning reuse the same sampler.

Shapes: tokens `b h w` int64 in [0, v); logits `b h w v` float.
"""

from __future__ import annotations

import dataclasses
import numbers
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

# logits_fn(tokens `b' h w`, rows `b'` int64 indices into the caller's batch, step: int in [0, T)) -> logits
# `b' h w v`. `rows` tells a conditioning closure which samples are still in the batch (finished ones leave it);
# `step` is the sampling step, so a schedule over the steps (guidance) needs no state of its own.
LogitsFn = Callable[[Tensor, Tensor, int], Tensor]
# One generator for the batch, or one per sample: per-sample generators make a sample's noise independent of
# how the batch is split (over processes and gradient-accumulation steps in sundae.train, over sampling
# batches in sundae.pipeline).
Generators = torch.Generator | Sequence[torch.Generator] | None


def _draw(fn: Callable[..., Tensor], shape: Sequence[int], device: torch.device, generator: Generators,
          *args: int) -> Tensor:
    """fn(*args, shape, device=, generator=) (torch.rand or torch.randint), row by row for per-sample generators."""
    if generator is None or isinstance(generator, torch.Generator):
        return fn(*args, tuple(shape), device=device, generator=generator)
    if len(generator) != shape[0]:
        raise ValueError(f"{len(generator)} generators for a batch of {shape[0]}")
    return torch.cat([fn(*args, (1, *shape[1:]), device=device, generator=g) for g in generator])


CORRUPTIONS = ("uniform", "cosine")


def corruption_rate(u: Tensor, corruption: str = "uniform") -> Tensor:
    """Map u ~ U(0, 1) to a corruption rate a in [0, 1].

    "uniform": a = u, the paper's a ~ U(0, 1) (Savinov et al. section 3, eq. 4).
    "cosine": a = cos(pi/2 * u), MaskGIT's cosine masking schedule gamma (Chang et al. 2022, section 3.2) used
    as the rate: density 2 / (pi sqrt(1 - a^2)), mean 2/pi, so heavy corruption, where the sampler starts (a
    fully random grid), is trained more often: P(a > 0.9) is 0.29 against 0.1 for "uniform".
    Raises ValueError for another name.
    """
    if corruption == "uniform":
        return u
    if corruption == "cosine":
        return torch.cos(u * (torch.pi / 2))
    raise ValueError(f"corruption must be one of {', '.join(CORRUPTIONS)}, got {corruption!r}")


def corrupt(tokens: Tensor, codebook_size: int, generator: Generators = None, corruption: str = "uniform") -> Tensor:
    """q(z0 | z): per sample a rate a (`corruption_rate`: a ~ U(0, 1) by default); each token independently
    becomes, with probability a, a token drawn uniformly from the codebook (Savinov et al. section 3, eq. 4).
    No mask token.

    `b h w` int64 -> `b h w` int64. `generator`: one, or a sequence of `b` (one per sample).
    """
    rate = corruption_rate(_draw(torch.rand, (tokens.shape[0], 1, 1), tokens.device, generator), corruption)
    replace = _draw(torch.rand, tokens.shape, tokens.device, generator) < rate
    noise = _draw(torch.randint, tokens.shape, tokens.device, generator, 0, codebook_size)
    return torch.where(replace, noise, tokens)


def share_count(share: float, total: int) -> int:
    """round(share * total), halves rounded up: how many of `total` items a share in [0, 1] names.
    Raises ValueError for a share that is not a number in [0, 1]."""
    if isinstance(share, bool) or not isinstance(share, numbers.Real) or not 0 <= share <= 1:  # also NaN
        raise ValueError(f"share must be a number in [0, 1], got {share!r}")
    return min(total, int(share * total + 0.5))


def corrupt_share(tokens: Tensor, share: float, codebook_size: int,
                  generator: Generators = None) -> tuple[Tensor, Tensor]:
    """The training corruption (`corrupt`) at a fixed rate, for img2img: in each sample exactly k =
    `share_count(share, h * w)` positions, chosen uniformly without replacement, take a token drawn uniformly
    from the codebook (which may be the token already there: 1 in v). With one generator per sample, sample
    i's positions and tokens come from generator i alone (first h*w uniform draws ranking the positions,
    the k lowest chosen; then h*w uniform codes), so they do not depend on the batch.

    `b h w` int64 -> (`b h w` int64, chosen `b h w` bool). share 1: every token uniform, nothing of `tokens`
    left; share 0: `tokens` unchanged (the draws are still made). Raises ValueError for a share outside [0, 1].
    """
    b, h, w = tokens.shape
    k = share_count(share, h * w)
    scores = _draw(torch.rand, (b, h * w), tokens.device, generator)
    rank = scores.argsort(dim=1, stable=True).argsort(dim=1)  # position -> its place in the sample's random order
    chosen = (rank < k).view(b, h, w)
    noise = _draw(torch.randint, tokens.shape, tokens.device, generator, 0, codebook_size)
    return torch.where(chosen, noise, tokens), chosen


def sample_logits(logits: Tensor, temperature: float | Tensor = 1.0, generator: Generators = None,
                  uniform: Tensor | None = None) -> Tensor:
    """Draw from Categorical(softmax(logits / temperature)) at every position, in float32 (Gumbel-max).

    `... v` float -> `...` int64. `temperature` is a float or a tensor broadcastable to `...` (per sample).
    `generator`: one, or a sequence of `b` (one per sample, `b` the first dimension).
    `uniform`: optional U(0, 1) draws of the shape of `logits` to use instead of drawing from `generator`.
    Where `logits / temperature` overflows float32 (tau near 0) the draw is the argmax, the tau -> 0 limit.
    """
    if isinstance(temperature, Tensor):
        temperature = temperature[..., None]
    if uniform is None:
        uniform = _draw(torch.rand, logits.shape, logits.device, generator)
    u = uniform.clamp(1e-20, 1.0 - 1e-7)
    scaled = logits.float() / temperature
    drawn = (scaled - torch.log(-torch.log(u))).argmax(-1)
    overflow = (scaled.isinf() & logits.isfinite()).any(-1)
    # A temperature so small that logits / tau overflows float32 takes the tau -> 0 limit: the argmax (greedy).
    # No `overflow.any()` branch: that would be a device sync in every sampling and unrolled training step.
    return torch.where(overflow, logits.argmax(-1), drawn)


def unrolled_loss(logits_fn: Callable[..., Tensor], tokens: Tensor, codebook_size: int, unroll_steps: int = 2,
                  generator: Generators = None, *, unroll_share: float = 1.0,
                  corruption: str = "uniform") -> tuple[Tensor, list[Tensor]]:
    """Step-unrolled denoising loss (Savinov et al. section 3.1, eq. 6).

    z0 = corrupt(z); logits_1 = f(z0); for t > 1, z_{t-1} ~ Categorical(logits_{t-1}) at temperature 1,
    detached, and logits_t = f(z_{t-1}). The loss is the mean over t of the token-mean cross-entropy of
    logits_t against the clean `tokens` (`b h w` int64). Returns (loss scalar, per-step losses).

    `unroll_share` in (0, 1]: the unrolled steps t > 1 run on a share of the batch only, so that they cost
    that share of a forward and backward each. Each sample is unrolled with probability `unroll_share`, drawn
    from its own generator after the corruption (so the choice does not depend on how the batch is split);
    the loss of step t > 1 is the sum of the unrolled samples' token-mean cross-entropies divided by
    `unroll_share * b`, an unbiased estimate of the full step's loss that adds up exactly over micro-batches.
    With a share below 1 `logits_fn` is called as `logits_fn(z, rows)` for t > 1, `rows` the int64 indices
    of the unrolled samples in the batch (for their labels), and as `logits_fn(z)` for t = 1. A batch in
    which no sample is drawn still runs those forwards on its first sample, with weight 0.
    `corruption`: the corruption-rate distribution (`corruption_rate`).
    Raises ValueError for unroll_steps < 1 or unroll_share outside (0, 1].
    """
    if unroll_steps < 1:
        raise ValueError(f"unroll_steps must be >= 1, got {unroll_steps}")
    if not 0 < unroll_share <= 1:
        raise ValueError(f"unroll_share must lie in (0, 1], got {unroll_share}")
    b = tokens.shape[0]
    z = corrupt(tokens, codebook_size, generator, corruption)
    rows, weight = None, 1.0
    if unroll_share < 1 and unroll_steps > 1:
        rows = (_draw(torch.rand, (b,), tokens.device, generator) < unroll_share).nonzero().flatten()
        weight = 1.0 / (unroll_share * b)
        if len(rows) == 0:  # still one forward, weighted 0: every process of a DDP run makes the same calls
            rows, weight = torch.zeros(1, dtype=torch.long, device=tokens.device), 0.0
    losses = []
    for t in range(unroll_steps):
        if t == 0 or rows is None:
            logits = logits_fn(z)
            losses.append(F.cross_entropy(logits.flatten(0, -2).float(), tokens.flatten()))
        else:
            logits = logits_fn(z, rows)
            per_token = F.cross_entropy(logits.flatten(0, -2).float(), tokens[rows].flatten(), reduction="none")
            losses.append(per_token.view(len(rows), -1).mean(1).sum() * weight)
        if t + 1 < unroll_steps:
            if t == 0 and rows is not None:
                logits = logits[rows]
            gens = generator if generator is None or isinstance(generator, torch.Generator) or rows is None \
                else [generator[i] for i in rows.tolist()]
            z = sample_logits(logits.detach(), 1.0, gens)
    return torch.stack(losses).mean(), losses


def linear_schedule(start: float, end: float, steps: int) -> Tensor:
    """`steps` float32 values going linearly from `start` (step 0) to `end` (step steps-1)."""
    if steps == 1:
        return torch.tensor([float(start)])
    return torch.linspace(float(start), float(end), steps)


Schedule = float | tuple[float, float]  # one value, or (start, end) linear over the sampling steps


def _pair(value: Schedule, name: str) -> tuple[float, float]:
    if isinstance(value, (int, float)):
        return (float(value), float(value))
    try:
        start, end = value
        return (float(start), float(end))
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number or a (start, end) pair, got {value!r}") from None


UPDATE_POSITIONS = ("random", "informed")


@dataclass(frozen=True)
class SamplerConfig:
    """The SUNDAE sampler's settings (McKinney & Willcocks section 3.4; Savinov et al. section 3.3).

    steps: T, sampling steps (network calls) at most, >= 1.
    temperature: tau, a number or (start, end) linear over the T steps; finite and > 0.
    update_proportion: p, the share of positions that take their new draw at a step, a number or
        (start, end); each in (0, 1].
    min_steps: no early stop before this many steps, >= 0.
    early_stop: a sample is finished once a whole step after `min_steps` changes no token (it then leaves the
        batch); False runs every sample for all T steps.
    update_positions: "random" (the paper's: each free position takes its draw with probability p_n) or
        "informed" (exactly round(p_n * free), at least 1, per sample: those whose current token the model finds
        least likely; after Zhao et al. 2024's informed correctors; it tied with "random", RESULTS.md).

    The defaults are the paper's FFHQ256 setting (T=100, tau 0.8, p 0.5, min 10); `SAMPLER_PRESETS` holds
    the paper's others. Numbers given for the schedules are stored as (start, end) pairs. Validated once here:
    raises ValueError naming the field for any value outside its range.
    """

    steps: int = 100
    temperature: Schedule = (0.8, 0.8)
    update_proportion: Schedule = (0.5, 0.5)
    min_steps: int = 10
    early_stop: bool = True
    update_positions: str = "random"

    def __post_init__(self) -> None:
        object.__setattr__(self, "temperature", _pair(self.temperature, "temperature"))
        object.__setattr__(self, "update_proportion", _pair(self.update_proportion, "update proportion"))
        for name, low in (("steps", 1), ("min_steps", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise ValueError(f"{name} must be an integer, got {value!r}")
            if value < low:
                raise ValueError(f"{name} must be >= {low}, got {value}")
            object.__setattr__(self, name, int(value))
        if not all(0 < t < float("inf") for t in self.temperature):  # also rejects NaN
            raise ValueError(f"temperature must be finite and > 0, got {self.temperature}")
        if not all(0 < p <= 1 for p in self.update_proportion):
            raise ValueError(f"update proportion must lie in (0, 1], got {self.update_proportion}")
        if not isinstance(self.early_stop, bool):
            raise ValueError(f"early_stop must be True or False, got {self.early_stop!r}")
        if self.update_positions not in UPDATE_POSITIONS:
            raise ValueError(f"update_positions must be one of {', '.join(UPDATE_POSITIONS)}, "
                             f"got {self.update_positions!r}")

    def temperatures(self) -> list[float]:
        """tau_n for n in [0, T), linear from start to end."""
        return linear_schedule(*self.temperature, self.steps).tolist()

    def update_proportions(self) -> list[float]:
        """p_n for n in [0, T), linear from start to end."""
        return linear_schedule(*self.update_proportion, self.steps).tolist()

    def tail(self, steps: int) -> "SamplerConfig":
        """The last `steps` of these T steps as a sampler of their own (img2img starts part-way): the same
        temperatures and update proportions at those steps (a linear schedule's tail is linear), and early
        stop allowed where it was (min_steps less the T - steps skipped). Raises ValueError unless
        1 <= steps <= T."""
        if not 1 <= steps <= self.steps:
            raise ValueError(f"tail steps must lie in 1..{self.steps}, got {steps}")
        first = self.steps - steps

        def at_first(start: float, end: float) -> float:  # the schedule's value at step `first`, in float64
            return start + (end - start) * first / (self.steps - 1) if first else start
        return dataclasses.replace(self, steps=steps, min_steps=max(0, self.min_steps - first),
                                   temperature=(at_first(*self.temperature), self.temperature[1]),
                                   update_proportion=(at_first(*self.update_proportion), self.update_proportion[1]))


# The paper's sampler settings (McKinney & Willcocks section 4 and their released configs), by the name of the
# model preset they go with.
SAMPLER_PRESETS: dict[str, SamplerConfig] = {
    "ffhq256": SamplerConfig(steps=100, temperature=0.8, update_proportion=0.5),
    "ffhq1024": SamplerConfig(steps=100, temperature=(1.0, 0.7), update_proportion=0.5),
    "imagenet256": SamplerConfig(steps=200, temperature=(0.8, 0.7), update_proportion=0.7),
}


def sample(logits_fn: LogitsFn, shape: tuple[int, int, int], codebook_size: int, sampler: SamplerConfig | None = None,
           *, init: Tensor | None = None, keep: Tensor | None = None, generator: Generators = None,
           device: torch.device | str | None = None, progress: Callable[[int, int], None] | None = None,
           compact_every: int = 10, **overrides: Any) -> tuple[Tensor, Tensor]:
    """SUNDAE sampling (Savinov et al. section 3.3; McKinney & Willcocks section 3.4).

    Start from tokens uniform over the codebook (or `init` where `keep` is True; `init` everywhere without a `keep`:
    img2img refines a given state, every position sampled). For step n of T, temperature tau_n and update proportion
    p_n follow `sampler`'s schedules; draw z' ~ Categorical(logits / tau_n) at every position and take z' where rand
    < p_n (never where `keep`; `update_positions` "informed": see SamplerConfig). With early stop, a sample is
    finished once a whole step after the first `min_steps` changes no token; its tokens are frozen from then on and
    it leaves the batch at the next compaction, so later steps cost less. The random draws are made for the whole
    batch and indexed by the rows still in it, so a sample's result does not depend on when the others finish, nor
    on `compact_every`. With one generator per sample (`generator` a sequence of b), every draw of sample i comes
    from generator i alone, so sample i is the same whatever the batch it is drawn in (up to the network's own batch
    invariance).

    The step loop keeps the early-stop bookkeeping on the device: the host waits for the device only at a
    compaction, once every `compact_every` steps (the batch size must be known to launch the next step).
    On a GPU the steps in between queue up without synchronising. Runs under `torch.inference_mode`.

    logits_fn(z, rows, step): see `LogitsFn`. shape: (b, h, w) tokens. sampler: `SamplerConfig` (default: the
    paper's FFHQ256 setting); `overrides` are its fields (steps=, temperature=, ...), applied on top and
    validated there. init: `b h w` int64 (of `shape`), required with keep. keep: `b h w` bool, True = known
    token that is never resampled (inpainting). progress(step, active) is called after every step, with the number of
    samples still in the batch as of the last compaction.
    Returns (tokens `b h w` int64, steps taken `b` int64 in [1, T]).
    Raises ValueError for an invalid sampler setting (`SamplerConfig`), compact_every < 1, an init of another
    shape, or a keep-mask without an init of the same shape.
    """
    sampler = dataclasses.replace(sampler or SamplerConfig(), **overrides)
    if compact_every < 1:
        raise ValueError(f"compact_every must be >= 1, got {compact_every}")
    if keep is not None and (init is None or keep.shape != init.shape or tuple(keep.shape) != tuple(shape)):
        raise ValueError(f"keep needs an init of the same shape {shape}")
    if init is not None and tuple(init.shape) != tuple(shape):
        raise ValueError(f"init has shape {tuple(init.shape)}, the sampler was asked for {tuple(shape)}")
    with torch.inference_mode():
        return _sample_loop(logits_fn, shape, codebook_size, sampler, init, keep, generator, device, progress,
                            compact_every)


def _least_likely(logits: Tensor, z: Tensor, frozen: Tensor, proportion: float, flip: Tensor) -> Tensor:
    """`b h w v` logits, `b h w` tokens, `b h w` bool frozen, p, `b h w` U(0, 1) tie-breakers -> `b h w` bool: per
    sample the round(p * free) (>= 1) free positions with the lowest log-probability of their current token."""
    logp = torch.log_softmax(logits.float(), -1).gather(-1, z[..., None])[..., 0]  # b h w
    score = torch.where(frozen, float("inf"), logp - 1e-6 * flip).flatten(1)
    rank = torch.empty_like(score, dtype=torch.long).scatter_(
        1, score.argsort(dim=1, stable=True), torch.arange(score.shape[1], device=score.device).expand_as(score))
    free = (~frozen).flatten(1).sum(1, keepdim=True)
    k = (free * proportion).round().clamp(min=1)
    return (rank < k).view_as(z) & ~frozen


def _sample_loop(logits_fn: LogitsFn, shape: tuple[int, int, int], codebook_size: int, sampler: SamplerConfig,
                 init: Tensor | None, keep: Tensor | None, generator: Generators,
                 device: torch.device | str | None, progress: Callable[[int, int], None] | None,
                 compact_every: int) -> tuple[Tensor, Tensor]:
    b, steps = shape[0], sampler.steps
    informed = sampler.update_positions == "informed"
    min_steps = sampler.min_steps if sampler.early_stop else steps
    if device is None:
        device = init.device if init is not None else "cpu"
    per_sample = generator is not None and not isinstance(generator, torch.Generator)
    if init is not None and keep is None:  # img2img: the given state, no uniform start drawn
        z = init.to(device)
    else:
        z = _draw(torch.randint, shape, device, generator, 0, codebook_size)
    if keep is not None:
        z = torch.where(keep.to(device), init.to(device), z)
    taus, props = sampler.temperatures(), sampler.update_proportions()  # host floats: no device reads in the loop
    out = z.clone()
    steps_taken = torch.full((b,), steps, dtype=torch.long, device=device)  # per caller sample
    frozen = keep.to(device) if keep is not None else torch.zeros(shape, dtype=torch.bool, device=device)
    rows = torch.arange(b, device=device)  # which caller sample each batch row holds
    row_list = list(range(b))  # the same on the host, for per-sample generators
    taken = torch.full((b,), steps, dtype=torch.long, device=device)  # per batch row
    done = torch.zeros(b, dtype=torch.bool, device=device)
    active = b
    for n in range(steps):
        if per_sample:  # only the rows still in the batch draw, each from its own generator
            gens = [generator[i] for i in row_list]
            uniform = _draw(torch.rand, (active, *shape[1:], codebook_size), device, gens)
            flip = _draw(torch.rand, (active, *shape[1:]), device, gens)
        else:
            uniform = torch.rand((b, *shape[1:], codebook_size), device=device, generator=generator)
            flip = torch.rand(shape, device=device, generator=generator)
            if active < b:
                uniform, flip = uniform[rows], flip[rows]
        logits = logits_fn(z, rows, n)
        proposal = sample_logits(logits, taus[n], uniform=uniform)
        chosen = _least_likely(logits, z, frozen, props[n], flip) if informed else (flip < props[n]) & ~frozen
        update = chosen & ~done[:, None, None]  # finished samples stay as they are
        z_next = torch.where(update, proposal, z)
        if min_steps <= n + 1 < steps:
            newly = (z_next == z).flatten(1).all(1) & ~done
            taken = torch.where(newly, n + 1, taken)
            done = done | newly
        z = z_next
        if (n + 1) % compact_every == 0 and n + 1 < steps:
            finished = done.nonzero()[:, 0]  # the one host sync: the batch size of the next step
            if len(finished):
                out[rows[finished]], steps_taken[rows[finished]] = z[finished], taken[finished]
                left = (~done).nonzero()[:, 0]
                z, rows, frozen, taken, done = z[left], rows[left], frozen[left], taken[left], done[left]
                row_list = rows.tolist()
                active = len(rows)
        if progress is not None:
            progress(n + 1, active)
        if active == 0:
            break
    out[rows], steps_taken[rows] = z, taken
    return out, steps_taken


def token_keep_mask(pixel_mask: Tensor, f: int, dilate: int = 0) -> Tensor:
    """Pixel mask `b 1 H W` (1 = regenerate, 0 = known), any H, W -> token keep-mask `b h w` bool (True =
    known), h = ceil(H / f), w = ceil(W / f).

    A token is known only if no pixel of its f x f cell is masked (McKinney & Willcocks section 3.5), so one
    masked pixel marks exactly the cell that contains it. Sides that are not multiples of f follow the
    tokenizer's padding (`VQGAN.encode`: right and bottom): the padded pixels count as known, so an edge
    cell is regenerated only if one of its real pixels is masked. `dilate` grows the regenerated cells by
    that many cells in the 8-neighbourhood (each step adds the 3x3 square of cells around each one).
    Raises ValueError for f < 1 or dilate < 0.
    """
    if f < 1 or dilate < 0:
        raise ValueError(f"token_keep_mask needs f >= 1 and dilate >= 0, got f={f}, dilate={dilate}")
    height, width = pixel_mask.shape[-2:]
    pad_h, pad_w = -height % f, -width % f
    masked = F.max_pool2d(F.pad(pixel_mask.float(), (0, pad_w, 0, pad_h)), kernel_size=f, stride=f)
    if dilate:
        masked = F.max_pool2d(masked, kernel_size=2 * dilate + 1, stride=1, padding=dilate)
    return masked[:, 0] == 0


def fill_masked(image: Tensor, pixel_mask: Tensor) -> Tensor:
    """Replace the masked pixels of `image` (`b c H W` float) by a smooth fill computed from the visible ones
    only (`pixel_mask` `b 1 H W`, nonzero = masked), so that an encoding of the result, and everything sampled
    from it, knows nothing of what the mask hides. Returns `b c H W`, equal to `image` where not masked.

    Why: the tokenizer's receptive field (its mid-block attention is global) reaches from every kept cell into
    the masked area, so encoding the whole image leaks the hidden content into the kept tokens, and from
    them into the completions. The fill is a push-pull pyramid (the masked-average interpolation used for
    scattered-data hole filling): visible pixels and their weights are average-pooled 2x2 down to 1 x 1; going
    back up, a pixel with no visible pixel below it takes the bilinear upsampling of the coarser level. Pixels
    under the mask contribute exactly zero, so two images equal outside the mask give bit-identical fills. A
    wholly masked image fills with 0 (mid grey in [-1, 1]). Raises ValueError for a mask of another size.
    """
    if pixel_mask.shape[-2:] != image.shape[-2:] or pixel_mask.shape[0] not in (1, image.shape[0]):
        raise ValueError(f"fill_masked: mask {tuple(pixel_mask.shape)} does not fit image {tuple(image.shape)}")
    masked = (pixel_mask != 0).expand(image.shape[0], 1, -1, -1)
    weight = (~masked).to(image.dtype)
    levels = [(torch.where(masked, torch.zeros_like(image), image), weight)]
    while max(levels[-1][1].shape[-2:]) > 1:
        total, count = levels[-1]
        levels.append((F.avg_pool2d(total, 2, ceil_mode=True), F.avg_pool2d(count, 2, ceil_mode=True)))
    fill = torch.zeros_like(levels[-1][0])
    for total, count in reversed(levels):
        if fill.shape[-2:] != total.shape[-2:]:
            fill = F.interpolate(fill, size=total.shape[-2:], mode="bilinear", align_corners=False)
        fill = torch.where(count > 0, total / count.clamp_min(torch.finfo(count.dtype).tiny), fill)
    return torch.where(masked, fill, image)


# ---- classifier-free guidance (Ho & Salimans, "Classifier-Free Diffusion Guidance", arXiv 2207.12598) ----

# conditioned_fn(tokens `b' h w`, rows `b'` int64, drop `b'` bool) -> logits `b' h w v`: like LogitsFn, and rows
# whose `drop` is True get the null condition (the learned "no label / no text" the model was trained with).
ConditionedFn = Callable[[Tensor, Tensor, Tensor], Tensor]
# A guidance scale: one number, or (start, end) linear over the sampling steps.
GuidanceScale = float | tuple[float, float]


def condition_dropout(batch: int, p: float, device: torch.device | str, generator: Generators = None) -> Tensor:
    """Which samples train with the null condition: `b` bool, each True with probability `p` (Ho & Salimans
    section 3.2, algorithm 1: "with probability p_uncond, c <- null"). `generator`: one, or a sequence of
    `batch` (one per sample: the draw then depends only on the sample, not on how the batch is split).
    Raises ValueError unless 0 <= p <= 1."""
    if not 0 <= p <= 1:
        raise ValueError(f"condition dropout must lie in [0, 1], got {p}")
    return _draw(torch.rand, (batch,), torch.device(device), generator) < p


def guidance_scales(scale: GuidanceScale, steps: int, name: str | None = None) -> list[float]:
    """The guidance scale of each of `steps` sampling steps: a constant, or linear from start to end.
    Raises ValueError for a non-finite scale, one beyond the float32 range of the logits, or steps < 1; the
    message starts with `name` (default "guidance scale S", as the command line names it "--guidance-scale S").
    """
    start, end = (scale, scale) if isinstance(scale, (int, float)) else scale
    name = name or f"guidance scale {scale if isinstance(scale, (int, float)) else f'{start},{end}'}"
    if not all(abs(s) < float("inf") for s in (start, end)):  # also rejects NaN
        raise ValueError(f"{name}: expected finite numbers")
    if any(abs(s) > torch.finfo(torch.float32).max for s in (start, end)):
        raise ValueError(f"{name}: too large for the float32 logits (at most {torch.finfo(torch.float32).max:.4g} "
                         f"in magnitude; useful scales are about 1 to 10)")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    return linear_schedule(start, end, steps).tolist()


def guided_logits_fn(conditioned_fn: ConditionedFn, scale: GuidanceScale, steps: int = 1) -> LogitsFn:
    """Classifier-free guidance as a logits function for `sample` (Ho & Salimans eq. 6, on logits):

        logits = uncond + s_n * (cond - uncond)

    s = 1 gives the conditional logits, s = 0 the unconditional ones, s > 1 sharpens towards the condition.
    Both passes run in ONE forward: the `b'` rows are stacked twice (`2b' h w`), the second copy with
    `drop` True, and the result is split back. `scale` is a constant or (start, end), linear over `steps`
    sampling steps: the function reads s_n from the step index the sampler passes (the last value beyond
    `steps`), so it holds no state and serves any number of `sample` runs.
    Raises ValueError for a non-finite scale or steps < 1.
    """
    scales = guidance_scales(scale, steps)

    def logits_fn(z: Tensor, rows: Tensor, step: int) -> Tensor:
        s = scales[min(step, len(scales) - 1)]
        b = z.shape[0]
        drop = torch.arange(2 * b, device=z.device) >= b
        cond, uncond = conditioned_fn(torch.cat([z, z]), torch.cat([rows, rows]), drop).float().chunk(2)
        return uncond + s * (cond - uncond)
    return logits_fn
