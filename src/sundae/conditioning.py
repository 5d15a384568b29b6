"""Conditioning inputs of the generator: a learned class embedding with a null class, and text conditioning
with a learned null text.

The null class (index `num_classes`) and the null text stand for "no condition": condition dropout trains
them and classifier-free guidance (Ho & Salimans, arXiv 2207.12598) contrasts them with the real condition.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class ClassEmbedding(nn.Module):
    """`b` int64 labels in [0, num_classes) or None (all null) -> `b d` embeddings added to every token.

    Savinov et al. section 4.2: the class embedding is added to each token embedding. `drop` (`b` bool):
    True rows get the null class, for condition dropout and classifier-free guidance (Ho & Salimans 2022).
    Raises ValueError for a label outside [0, num_classes): index num_classes is the null class, reached only
    through `labels=None` or `drop`, so an off-by-one label never silently samples unconditionally.
    """

    def __init__(self, num_classes: int, dim: int):
        super().__init__()
        self.num_classes = num_classes
        self.embedding = nn.Embedding(num_classes + 1, dim)

    def forward(self, labels: Tensor | None, batch: int, drop: Tensor | None = None) -> Tensor:
        if labels is None:
            labels = torch.full((batch,), self.num_classes, dtype=torch.long, device=self.embedding.weight.device)
        elif labels.numel() and bool(((labels < 0) | (labels >= self.num_classes)).any()):  # one device sync
            raise ValueError(f"class labels must lie in [0, {self.num_classes}) (index {self.num_classes} is the "
                             f"null class: pass labels=None), got {labels.min().item()}..{labels.max().item()}")
        if drop is not None:
            labels = labels.masked_fill(drop, self.num_classes)
        return self.embedding(labels)


class TextConditioning(nn.Module):
    """Text encoder outputs -> what the hourglass consumes: a pooled `b d` vector added to every token (like
    the class embedding) and a cross-attention context `b m d` with its key mask `b 1 1 m` (m = n + 2).

    Input `text`: (features `b n e` float, mask `b n` bool, True = real token, pooled `b e` float), e =
    `text_dim`, or None for the null text. The context always starts with a learned register key that every
    row may attend to, so an empty or fully padded caption still has a key (a row of attention with no key
    would be NaN); then a learned null-text token, visible only in rows whose condition is dropped (`drop`
    True, or `text` None), where the caption's tokens and its pooled vector are hidden and a learned null
    pooled vector is used instead (Ho & Salimans 2022: one network, conditional and unconditional). Padding
    tokens are never attended to, so their values do not change the output.
    """

    def __init__(self, text_dim: int, dim: int):
        super().__init__()
        self.features, self.pooled = nn.Linear(text_dim, dim), nn.Linear(text_dim, dim)
        self.register = nn.Parameter(torch.randn(dim) * 0.02)
        self.null_token = nn.Parameter(torch.randn(dim) * 0.02)
        self.null_pooled = nn.Parameter(torch.randn(dim) * 0.02)
        self.norm = nn.LayerNorm(dim)

    def forward(self, text: tuple[Tensor, Tensor, Tensor] | None, batch: int,
                drop: Tensor | None = None) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        device, d = self.register.device, self.register.shape[0]
        fixed = torch.stack([self.register, self.null_token]).expand(batch, 2, d)
        if text is None:
            pooled = self.null_pooled.expand(batch, d)
            context, mask = fixed, torch.ones(batch, 2, dtype=torch.bool, device=device)
        else:
            features, token_mask, pooled_in = text
            if features.shape[0] != batch or token_mask.shape != features.shape[:2] or pooled_in.shape[0] != batch:
                raise ValueError(f"text features {tuple(features.shape)}, mask {tuple(token_mask.shape)} and pooled "
                                 f"{tuple(pooled_in.shape)} do not fit a batch of {batch}")
            null = drop if drop is not None else torch.zeros(batch, dtype=torch.bool, device=device)
            dtype = self.features.weight.dtype
            pooled = torch.where(null[:, None], self.null_pooled, self.pooled(pooled_in.to(dtype)))
            context = torch.cat([fixed.to(pooled.dtype), self.features(features.to(dtype)).to(pooled.dtype)], 1)
            mask = torch.cat([torch.ones_like(null)[:, None], null[:, None], token_mask.bool() & ~null[:, None]], 1)
        return pooled, (self.norm(context), mask[:, None, None, :])
