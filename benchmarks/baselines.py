"""Two reference generators over the same VQ tokens and the same network family as SUNDAE: yardsticks for
`benchmarks/quality.py`, not part of the `sundae` package.

- **MaskGIT-style** (Chang et al., "MaskGIT: Masked Generative Image Transformer", arXiv 2202.04200): the
  same `sundae.hourglass.Hourglass` with one extra input id, [MASK] = v (v + 1 ids in, v logits out).
  Training masks a cosine-scheduled share of the tokens (section 3.2) and takes the cross-entropy on the
  masked positions only; decoding starts from all [MASK] and, over T steps, keeps the cosine-scheduled
  number of least confident predictions masked (section 3.2, eq. 3), with annealed Gumbel noise on the
  confidences.
- **Autoregressive**, raster order, with a KV cache (the taming-transformers approach, Esser et al. section
  3.2): a flat causal stack of the hourglass's own `Block`s (pre-LN, 2D axial rotary, GELU MLP). Flat,
  not a causal hourglass: a causal hourglass must shift the sequence before shortening so that a merged
  token never sees the future (Nawrot et al. section 3.2), and with 64 tokens per image the valley saves
  little; the flat stack keeps the KV cache simple and exact. The class is a start token (the null class
  when no label is given); a learned absolute position embedding tells each step where in the raster it is
  (rotary alone is relative).

Shapes (einops letters): tokens `b h w` int64 in [0, v); labels `b` int64; logits `b h w v` float32.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # run from a checkout without installing

from sundae.hourglass import Attention, Block, Hourglass, HourglassConfig, apply_rotary, rotary_angles  # noqa: E402
from sundae.sundae import sample_logits  # noqa: E402

# ---- MaskGIT-style ------------------------------------------------------------------------------------


class MaskGIT(nn.Module):
    """The hourglass over v + 1 input ids (id v is [MASK]) with v output logits.

    `b h w` int64 in [0, v] (+ `b` labels) -> `b h w v` float32 logits. Bidirectional, like SUNDAE's.
    """

    def __init__(self, cfg: HourglassConfig):
        super().__init__()
        self.codebook_size = cfg.codebook_size
        self.mask_id = cfg.codebook_size
        self.net = Hourglass(dataclasses.replace(cfg, codebook_size=cfg.codebook_size + 1))
        self.net.to_logits = nn.Linear(cfg.dim, cfg.codebook_size)  # [MASK] is an input only, never predicted
        Hourglass._init(self.net.to_logits)

    def forward(self, tokens: Tensor, labels: Tensor | None = None) -> Tensor:
        return self.net(tokens, labels)


def cosine_mask_ratio(r: Tensor | float) -> Tensor:
    """MaskGIT's mask scheduling function gamma(r) = cos(pi/2 * r): 1 at r = 0 (all masked), 0 at r = 1."""
    return torch.cos(math.pi / 2 * torch.as_tensor(r, dtype=torch.float64))


def masked_token_loss(logits_fn: Callable[[Tensor], Tensor], tokens: Tensor, mask_id: int,
                      generator: torch.Generator | None = None) -> Tensor:
    """MaskGIT training loss (Chang et al. section 3.2): per sample r ~ U(0, 1), mask ceil(gamma(r) * n) of
    its n tokens (at least one) chosen uniformly, and take the mean cross-entropy over the masked positions.

    `tokens` `b h w` int64 in [0, v); `logits_fn(b h w ids) -> b h w v`. Returns a float32 scalar.
    """
    b, n = tokens.shape[0], tokens[0].numel()
    ratio = cosine_mask_ratio(torch.rand(b, generator=generator, device=tokens.device))
    count = (ratio * n).ceil().clamp(1, n).long()
    rank = torch.rand(b, n, generator=generator, device=tokens.device).argsort(1).argsort(1)
    masked = (rank < count[:, None]).view_as(tokens)
    logits = logits_fn(torch.where(masked, mask_id, tokens))
    return F.cross_entropy(logits[masked].float(), tokens[masked])


def mask_schedule(n_tokens: int, steps: int) -> list[int]:
    """How many of `n_tokens` stay masked after each of `steps` decoding steps: floor(n * gamma((t+1)/T)),
    0 after the last (Chang et al. section 3.2), clamped so that every step decides at least one token and
    leaves at least one for each later step: T steps are T network calls, as in the paper's released sampler
    (which clamps the masked count to [1, still masked - 1]). Strictly decreasing, ends at 0.
    Raises ValueError unless 1 <= steps <= n_tokens."""
    if not 1 <= steps <= n_tokens:
        raise ValueError(f"steps must lie in [1, {n_tokens}] (one decided token per step at least), got {steps}")
    counts, masked = [], n_tokens
    for t in range(steps):
        target = math.floor(n_tokens * float(cosine_mask_ratio((t + 1) / steps))) if t + 1 < steps else 0
        masked = min(max(target, steps - 1 - t), masked - 1)
        counts.append(masked)
    return counts


def maskgit_sample(logits_fn: Callable[[Tensor], Tensor], shape: tuple[int, int, int], codebook_size: int,
                   steps: int = 8, temperature: float = 1.0, choice_temperature: float = 4.5,
                   generator: torch.Generator | None = None,
                   device: torch.device | str = "cpu") -> tuple[Tensor, int]:
    """Confidence-based parallel decoding (Chang et al. section 3.2, "iterative decoding").

    Start with every token [MASK] (id `codebook_size`). At step t: predict every masked token,
    z' ~ Categorical(logits / temperature); its confidence is log p(z') plus Gumbel noise scaled by
    choice_temperature * (1 - (t+1)/T) (the annealed randomness of the paper's released sampler); of the
    still-masked positions, the `mask_schedule` count with the lowest confidence stay masked and the rest
    take z' for good. Every step decides at least one token, so there are exactly T network calls.

    `logits_fn(b h w ids) -> b h w v`. Returns (tokens `b h w` int64 in [0, v), network calls made = T).
    Raises ValueError unless 1 <= steps <= h * w (`mask_schedule`).
    """
    b, h, w = shape
    n = h * w
    z = torch.full((b, n), codebook_size, dtype=torch.long, device=device)
    masked = torch.ones(b, n, dtype=torch.bool, device=device)
    calls = 0
    for t, target in enumerate(mask_schedule(n, steps)):
        logits = logits_fn(z.view(b, h, w)).flatten(1, 2).float()
        proposal = sample_logits(logits, temperature, generator)
        confidence = logits.log_softmax(-1).gather(-1, proposal[..., None])[..., 0]
        noise_scale = choice_temperature * (1 - (t + 1) / steps)
        if noise_scale > 0:
            u = torch.rand(b, n, generator=generator, device=device).clamp(1e-20, 1 - 1e-7)
            confidence = confidence - noise_scale * torch.log(-torch.log(u))
        confidence = confidence.masked_fill(~masked, float("inf"))  # decided tokens are never re-masked
        stay = confidence.argsort(1).argsort(1) < target
        z = torch.where(masked & ~stay, proposal, z)
        masked, calls = stay, calls + 1
    return z.view(b, h, w), calls


# ---- autoregressive -----------------------------------------------------------------------------------


class CausalBlock(Block):
    """The hourglass `Block` with causal attention over a KV cache (a list [k, v] it extends in place)."""

    def forward(self, x: Tensor, angles: Tensor, cache: list[Tensor] | None = None) -> Tensor:  # type: ignore[override]
        """`b n d` new positions (rotary `angles` `n head_dim/2` for them) -> `b n d`; with `cache`, the
        positions come after the cached ones and attend to them too."""
        h = self.norm1(x)
        x = x + _causal_attention(self.attn, h, angles, cache)
        return x + self.mlp(self.norm2(x))


def _causal_attention(attn: Attention, x: Tensor, angles: Tensor, cache: list[Tensor] | None) -> Tensor:
    q = rearrange(attn.to_q(x), "b n (heads e) -> b heads n e", heads=attn.heads)
    k, v = rearrange(attn.to_kv(x), "b n (two heads e) -> two b heads n e", two=2, heads=attn.heads)
    q, k = apply_rotary(q, angles), apply_rotary(k, angles)
    past = 0
    if cache is not None:
        if cache:
            past = cache[0].shape[2]
            k, v = torch.cat([cache[0], k], 2), torch.cat([cache[1], v], 2)
        cache[:] = [k, v]
    n = q.shape[2]
    # Query i (absolute position past + i) sees keys 0 .. past + i.
    allowed = torch.arange(past + n, device=x.device)[None, :] <= past + torch.arange(n, device=x.device)[:, None]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
    return attn.out(rearrange(out, "b heads n e -> b n (heads e)"))


class Autoregressive(nn.Module):
    """Raster-order causal transformer over an `h x w` token grid: `b h w` tokens (+ `b` labels) ->
    `b h w v` float32 logits, where the logits at position i depend only on the tokens before i in raster
    order (and the label). Input i is [start(label), z_0, ..., z_{n-2}][i] plus the position embedding of
    raster position i; its rotary angles are those of grid cell i (the cell it predicts).

    `cfg` gives width, heads, head_dim, mlp_ratio, codebook_size, num_classes (its depth and shortening are
    unused); `layers` blocks; `grid` (h, w) fixed at construction (the position embedding).
    """

    def __init__(self, cfg: HourglassConfig, layers: int, grid: tuple[int, int]):
        super().__init__()
        self.cfg, self.grid = cfg, grid
        self.token_embedding = nn.Embedding(cfg.codebook_size, cfg.dim)
        self.start_embedding = nn.Embedding(cfg.num_classes + 1, cfg.dim)  # index num_classes: no label
        self.position_embedding = nn.Parameter(torch.zeros(grid[0] * grid[1], cfg.dim))
        self.blocks = nn.ModuleList(CausalBlock(cfg) for _ in range(layers))
        self.norm = nn.LayerNorm(cfg.dim)
        self.to_logits = nn.Linear(cfg.dim, cfg.codebook_size)
        self.apply(Hourglass._init)
        nn.init.normal_(self.position_embedding, std=0.02)
        self.register_buffer("angles", rotary_angles(*grid, cfg.head_dim, cfg.rotary_base), persistent=False)

    def start(self, labels: Tensor | None, batch: int) -> Tensor:
        """The start token's embedding, `b 1 d`: the class (or the null class for labels None)."""
        if labels is None:
            labels = torch.full((batch,), self.cfg.num_classes, dtype=torch.long, device=self.angles.device)
        return self.start_embedding(labels)[:, None]

    def run(self, x: Tensor, pos: int = 0, cache: list[list[Tensor]] | None = None) -> Tensor:
        """Input embeddings `b n d` for raster positions pos .. pos+n-1 -> `b n v` float32 logits.

        `cache`: one list per block (start with `[[] for _ in net.blocks]`), holding every earlier
        position's keys and values; it is extended in place.
        """
        n = x.shape[1]
        x = x + self.position_embedding[pos:pos + n]
        angles = self.angles[pos:pos + n]
        for i, block in enumerate(self.blocks):
            x = block(x, angles, None if cache is None else cache[i])
        return self.to_logits(self.norm(x)).float()

    def forward(self, tokens: Tensor, labels: Tensor | None = None) -> Tensor:
        """Teacher-forced logits for every position at once (training, and the cache's reference)."""
        b, h, w = tokens.shape
        if (h, w) != self.grid:
            raise ValueError(f"tokens are {h}x{w}, the model was built for a {self.grid[0]}x{self.grid[1]} grid")
        flat = tokens.flatten(1)
        x = torch.cat([self.start(labels, b), self.token_embedding(flat[:, :-1])], 1)
        return rearrange(self.run(x), "b (h w) v -> b h w v", h=h)


@torch.inference_mode()
def autoregressive_sample(net: Autoregressive, batch: int, labels: Tensor | None = None, temperature: float = 1.0,
                          generator: torch.Generator | None = None) -> Tensor:
    """Token by token in raster order with a KV cache: h*w network calls of one position each.
    z_i ~ Categorical(logits_i / temperature). Returns `b h w` int64."""
    h, w = net.grid
    cache: list[list[Tensor]] = [[] for _ in net.blocks]
    x = net.start(labels, batch)
    out = []
    for i in range(h * w):
        token = sample_logits(net.run(x, i, cache)[:, -1], temperature, generator)
        out.append(token)
        x = net.token_embedding(token)[:, None]
    return torch.stack(out, 1).view(batch, h, w)


def autoregressive_loss(net: Autoregressive, tokens: Tensor, labels: Tensor | None = None) -> Tensor:
    """Next-token cross-entropy, mean over all positions (float32 scalar)."""
    return F.cross_entropy(net(tokens, labels).flatten(0, 2), tokens.flatten())


def matching_layers(cfg: HourglassConfig, grid: tuple[int, int]) -> int:
    """The number of flat causal blocks whose `Autoregressive` comes closest in parameters to `Hourglass(cfg)`."""
    target = sum(p.numel() for p in Hourglass(cfg).parameters())
    with torch.device("meta"):
        block = sum(p.numel() for p in CausalBlock(cfg).parameters())
        base = sum(p.numel() for p in Autoregressive(cfg, 0, grid).parameters())
    return max(1, round((target - base) / block))
