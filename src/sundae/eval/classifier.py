"""A small classifier that judges class accuracy and gives classifier-FID its feature space.

The classifier is the quickstart's judge of class-conditional samples: trained on the real training set,
reported with its own test accuracy so a reader knows how much its verdict is worth. `sundae evaluate`
trains one per reference set and keeps it in a file (`load_or_train_classifier`).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from sundae.io import atomic_write

if TYPE_CHECKING:
    from sundae.eval.protocol import Reference

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


def load_or_train_classifier(path: Path, ref: Reference, epochs: int, seed: int,
                             progress: bool = True) -> tuple[SmallClassifier, dict[str, Any]]:
    """The classifier of classifier-FID for `ref`: read from `path` when it exists (it must have been trained
    for the same data, size and channels), else trained (`train_classifier`) and written there atomically.
    Returns (model in eval mode, its record: what it was trained on, epochs, seed, accuracy on the
    reference images). Raises ValueError when `path` holds another kind of file or another dataset's classifier.
    """
    key = {k: ref.info[k] for k in ("source", "image_size", "channels", "num_classes", "classifier_trained_on")}
    key["train_images"] = len(ref.train_images)
    if path.is_file():
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
        except Exception:
            raise ValueError(f"--classifier {path} is not a readable classifier file") from None
        if not isinstance(ckpt, dict) or ckpt.get("format") != CLASSIFIER_FORMAT:
            raise ValueError(f"--classifier {path} is not a classifier written by `sundae evaluate`")
        if ckpt["data"] != key:
            diff = ", ".join(f"{k}: {ckpt['data'].get(k)!r} stored, {v!r} needed" for k, v in key.items()
                             if ckpt["data"].get(k) != v)
            raise ValueError(f"--classifier {path} was trained for other data ({diff}): pass another --classifier "
                             f"path (it is trained there) or delete the file")
        model = SmallClassifier(key["channels"], key["num_classes"], key["image_size"][0])
        model.load_state_dict(ckpt["model"])
        record = {**ckpt["record"], "path": str(path), "loaded": True}
    else:
        t = time.time()
        batch_size = min(128, len(ref.train_images))  # small image folders: still one step per epoch
        model = train_classifier(ref.train_images, ref.train_labels, ref.num_classes, epochs, batch_size, seed=seed,
                                 progress=progress)
        record = {"epochs": epochs, "seed": seed, "batch_size": batch_size, "train_images": len(ref.train_images),
                  "trained_on": ref.info["classifier_trained_on"], "seconds": time.time() - t,
                  "class_counts": torch.bincount(ref.train_labels, minlength=ref.num_classes).tolist()}
        payload = {"format": CLASSIFIER_FORMAT, "data": key, "record": record, "model": model.state_dict()}
        atomic_write(path, lambda tmp: torch.save(payload, tmp))
        record = {**record, "path": str(path), "loaded": False}
    model.eval()
    record["accuracy_on_reference"] = (predict(model, ref.images) == ref.labels).float().mean().item()
    return model, record
