"""Conditioning inputs of the generator: a learned class embedding with a null class.

The null class (index `num_classes`) stands for "no label" and is what classifier-free guidance drops to.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class ClassEmbedding(nn.Module):
    """`b` int64 labels in [0, num_classes) or None -> `b d` embeddings added to every token.

    Savinov et al. section 4.2: the class embedding is added to each token embedding.
    """

    def __init__(self, num_classes: int, dim: int):
        super().__init__()
        self.num_classes = num_classes
        self.embedding = nn.Embedding(num_classes + 1, dim)

    def forward(self, labels: Tensor | None, batch: int) -> Tensor:
        if labels is None:
            labels = torch.full((batch,), self.num_classes, dtype=torch.long, device=self.embedding.weight.device)
        return self.embedding(labels)
