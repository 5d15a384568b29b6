"""A small classifier that judges class accuracy and gives classifier-FID its feature space.

The classifier is the quickstart's judge of class-conditional samples: trained on real training images,
reported with its own test accuracy so a reader knows how much its verdict is worth. `sundae evaluate`
trains one per reference set and keeps it in a file (`sundae.eval.protocol.load_or_train_classifier`).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

CLASSIFIER_FORMAT = "sundae-classifier"


class SmallClassifier(nn.Module):
    """A small CNN (two conv blocks, two linear layers): `b c 32 32` images in [-1, 1] -> `b num_classes`
    logits. About 0.90 test accuracy on Fashion-MNIST after two epochs. `features` gives the 128 activations
    before the last linear layer (the feature space of classifier-FID, `sundae.eval.metrics`)."""

    def __init__(self, in_channels: int, num_classes: int, size: int = 32, width: int = 32):
        super().__init__()
        self.input_shape = (in_channels, size, size)
        self.net = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Dropout(0.3), nn.Linear(2 * width * (size // 4) ** 2, 128), nn.ReLU(),
            nn.Dropout(0.3), nn.Linear(128, num_classes))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def features(self, x: Tensor) -> Tensor:
        """`b c H W` images in [-1, 1] -> `b 128` penultimate activations (after the ReLU, before the last
        dropout and linear layer)."""
        return self.net[:-2](x)


def train_classifier(images: Tensor, labels: Tensor, num_classes: int, epochs: int = 2, batch_size: int = 128,
                     lr: float = 2e-3, seed: int = 0, progress: bool = True) -> SmallClassifier:
    """Train a `SmallClassifier` on `b c H W` images in [-1, 1] and `b` int64 labels (Adam, one-cycle lr)."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = SmallClassifier(images.shape[1], num_classes, images.shape[-1])
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    steps = epochs * (len(images) // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    # TQDM_DISABLE in the environment also hides it (tqdm reads it only when `disable` is not passed).
    bar = tqdm(total=steps, desc="classifier", disable=not progress or bool(os.environ.get("TQDM_DISABLE")),
               dynamic_ncols=True)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(images), generator=gen)
        for i in range(len(images) // batch_size):
            idx = perm[i * batch_size:(i + 1) * batch_size]
            loss = F.cross_entropy(model(images[idx]), labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.update(1)
    bar.close()
    return model.eval()


@torch.no_grad()
def predict(model: nn.Module, images: Tensor, batch_size: int = 500) -> Tensor:
    """`b c H W` images -> `b` int64 predicted classes."""
    model.eval()
    return torch.cat([model(images[i:i + batch_size]).argmax(1) for i in range(0, len(images), batch_size)])


def accuracy(model: nn.Module, images: Tensor, labels: Tensor) -> float:
    """Fraction of `images` whose predicted class equals `labels`."""
    return (predict(model, images) == labels).float().mean().item()
