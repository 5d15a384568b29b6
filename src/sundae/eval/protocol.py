"""`sundae evaluate`: numbers for a generator and its tokenizer, with the protocol that makes them reproducible.

Given a generator, its tokenizer and a reference image set, `evaluate` generates N samples per sampling
setting (class-conditional generators: balanced over the classes, sample i has class i mod C) and reports

- classifier-FID, precision and recall (k-NN manifolds) in the 128 penultimate features of a small classifier
  trained on the labelled reference dataset (`sundae.eval.classifier.SmallClassifier`; for idx data on its train
  split, for an image folder on the folder itself), and its class accuracy for class-conditional generators;
- FID (and precision/recall) in Inception-V3 pool features, when the standard FID Inception weights are on
  disk (`sundae.eval.inception`; never downloaded);
- the tokenizer on the reference images: PSNR, SSIM (torchmetrics), codebook usage, reconstruction FIDs.

Everything is measured against the same reference images; the result JSON records the protocol (counts,
split, image size and resizing, seeds, sampler settings, batch size, feature extractors, tool versions).
"""

from __future__ import annotations

import importlib.metadata
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from sundae.data import (FASHION_MNIST_CLASSES, FASHION_MNIST_DIR, IdxImages, is_idx_dataset, open_images,
                         stack_items)
from sundae.eval.classifier import CLASSIFIER_FORMAT, SmallClassifier, predict, train_classifier
from sundae.eval.metrics import (LOW_CODEBOOK_USAGE, classifier_features, frechet_distance_gaussians, gaussian_stats,
                                 knn_radii, precision_recall, psnr_of_mse, squared_error, ssim)
from sundae.io import log, save_torch
from sundae.sundae import SamplerConfig

INCEPTION_FILE = "pt_inception-2015-12-05-6726825d.pth"
INCEPTION_ENV = "SUNDAE_INCEPTION"


def default_inception_path() -> Path:
    """Where the FID Inception weights are looked for without --inception: $SUNDAE_INCEPTION, else
    ~/.cache/sundae/pt_inception-2015-12-05-6726825d.pth."""
    return Path(os.environ.get(INCEPTION_ENV) or Path.home() / ".cache" / "sundae" / INCEPTION_FILE)


@dataclass
class Reference:
    """Reference images `n c H W` in [-1, 1] with labels `n` int64, what they are, and the labelled images a
    classifier is trained on (`train_images`, `train_labels`; the idx train split, or the images themselves)."""

    images: Tensor
    labels: Tensor
    num_classes: int
    info: dict[str, Any]
    train_images: Tensor
    train_labels: Tensor
    classes: list[str] = field(default_factory=list)


SUBSET_SEED = 0  # the seed of the random subset an image-folder reference keeps under a limit


def _stack(dataset, limit: int, workers: int = 0) -> tuple[Tensor, Tensor]:
    """All images of `dataset` and their labels, or `limit` of them: the first ones of an idx split (stored in
    shuffled order), a seeded random subset of an image folder (whose files are sorted by class), in file
    order, read in `workers` processes."""
    n = min(limit, len(dataset)) if limit else len(dataset)
    if isinstance(dataset, IdxImages):
        x = dataset.images[:n]
        return (x if dataset.channels == 1 else x.repeat(1, dataset.channels, 1, 1)), dataset.labels[:n].clone()
    rows = range(n) if n == len(dataset) else \
        torch.randperm(len(dataset), generator=torch.Generator().manual_seed(SUBSET_SEED))[:n].sort().values.tolist()
    return stack_items(dataset, rows, workers)


def load_reference(spec: str, size: int, channels: int, limit: int = 0, classifier_limit: int = 0,
                   strict: bool = False, workers: int = 0) -> Reference:
    """The reference set named by `spec`: "fashion-mnist" or "fashion-mnist:train|test" (the idx files in
    `sundae.data.FASHION_MNIST_DIR`, default test split), "DIR" or "DIR:train|test" for another idx folder,
    or an image folder (sub-folders = classes). Images at `size` x `size` pixels with `channels` channels by
    `sundae.data.open_images` (idx: zero-padded; image files: shorter side resized bicubic, centre crop).
    `limit` keeps N reference images, `classifier_limit` N classifier training images (0 = all): the first N
    of an idx split, a random subset (seed `SUBSET_SEED`) of an image folder, whose sorted files would
    otherwise give the first classes only. `info["class_counts"]` counts the kept reference images per class.
    An image folder is scanned and read in `workers` DataLoader processes (0: in this one; the same images),
    once when both limits keep the same images.
    Raises ValueError / FileNotFoundError naming the spec.
    """
    path_text, sep, split = spec.rpartition(":") if spec.rpartition(":")[2] in ("train", "test") else (spec, "", "")
    name = path_text if sep else spec
    if name.lower() in ("fashion-mnist", "fashion_mnist", "fashionmnist"):
        root, source = FASHION_MNIST_DIR, "Fashion-MNIST"
        if not root.is_dir():
            raise FileNotFoundError(f"--reference {spec}: {root} does not exist (install it with `apt-get install "
                                    f"dataset-fashion-mnist`, or pass an idx folder)")
    else:
        root, source = Path(name), str(Path(name))
    if not root.is_dir():
        raise FileNotFoundError(f"--reference {spec}: {root} is not a folder (expected fashion-mnist[:train|test], "
                                f"an idx folder or an image folder)")
    if is_idx_dataset(root):
        split = split or "test"
        ds = open_images(root, size, channels, split)
        images, labels = _stack(ds, limit)
        train_ds = ds if split == "train" else open_images(root, size, channels, "train")
        train_images, train_labels = _stack(train_ds, classifier_limit)
        resizing = (f"idx images zero-padded (background -1) to {size}x{size}" +
                    (", grayscale replicated to 3 channels" if channels == 3 else ""))
        classes = list(FASHION_MNIST_CLASSES) if source == "Fashion-MNIST" else []
        trained_on = f"{source} train split"
    else:
        if sep:
            raise ValueError(f"--reference {spec}: :{split} applies to idx folders (Fashion-MNIST), not to an "
                             f"image folder")
        ds = open_images(root, size, channels, strict=strict, workers=workers)
        images, labels = _stack(ds, limit, workers)
        same = min(limit or len(ds), len(ds)) == min(classifier_limit or len(ds), len(ds))  # the same rows
        train_images, train_labels = (images, labels) if same else _stack(ds, classifier_limit, workers)
        resizing = (f"image files: shorter side resized (bicubic) to {size}, centre crop {size}x{size}, "
                    f"{'grayscale' if channels == 1 else 'RGB'} by sundae.images.read_image")
        classes, split, trained_on = list(getattr(ds, "classes", [])), "all", "the reference images themselves"
    num_classes = int(getattr(ds, "num_classes", 0))
    info = {"source": source, "path": str(root.resolve()), "split": split, "count": len(images),
            "available": len(ds), "num_classes": num_classes, "image_size": [size, size], "channels": channels,
            "resizing": resizing, "classifier_trained_on": trained_on,
            "subset": "all" if len(images) == len(ds) else ("the first images of the split" if is_idx_dataset(root)
                                                            else f"random, seed {SUBSET_SEED}")}
    if num_classes:
        info["class_counts"] = torch.bincount(labels, minlength=num_classes).tolist()
    return Reference(images, labels, num_classes, info, train_images, train_labels, classes)


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
        save_torch(path, payload)
        record = {**record, "path": str(path), "loaded": False}
    model.eval()
    record["accuracy_on_reference"] = (predict(model, ref.images) == ref.labels).float().mean().item()
    return model, record


def generate(pipe, labels: Tensor | None, num: int, batch_size: int, sampler: SamplerConfig, seed: int,
             guidance_scale: float | tuple[float, float] = 1.0, desc: str = "sample") -> tuple[Tensor, Tensor, float]:
    """`num` decoded samples of `pipe` (a `sundae.pipeline.SundaePipeline`): (images `num c H W` in [-1, 1] on
    the CPU, steps each sample took `num` int64, seconds). Sample i has label `labels[i]` (class-conditional
    generators) and its own generator seeded seed + i, so the results do not depend on `batch_size`."""
    t0 = time.time()
    parts = list(pipe.generate(num, labels, None, guidance_scale, sampler, seed, batch_size, desc=desc))
    return torch.cat([p[1] for p in parts]), torch.cat([p[2] for p in parts]), time.time() - t0


@torch.no_grad()
def measure_reconstructions(tokenizer, images: Tensor, batch_size: int, device: torch.device,
                            measures: dict[str, Callable[[Tensor], Tensor]],
                            ) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """The tokenizer on `images` (`n c H W` in [-1, 1]): encoded and decoded `batch_size` at a time, each batch
    measured and dropped, so the reconstructions are never all held (at 10,000 images, those and one SSIM over
    all of them were most of `evaluate`'s memory). Returns (`psnr_db` (dB, peak-to-peak 2), `ssim`,
    `codebook_usage` (share of the codebook in the tokens), `tokens` (how many); {name: `fn` of every batch of
    reconstructions, concatenated along the batch} for each name, fn of `measures` (features, predicted
    classes: `b c H W` -> `b ...`, on the CPU))."""
    size = tokenizer.cfg.codebook_size
    seen = torch.zeros(size, dtype=torch.bool)
    squared = ssim_total = 0.0
    count = 0
    outputs: dict[str, list[Tensor]] = {name: [] for name in measures}
    for i in range(0, len(images), batch_size):
        x = images[i:i + batch_size]
        z = tokenizer.encode(x.to(device))
        recon = tokenizer.decode(z, size=tuple(x.shape[-2:])).cpu()
        seen[z.flatten().cpu()] = True
        count += z.numel()
        squared += squared_error(recon, x)
        ssim_total += ssim(recon, x) * len(x)
        for name, fn in measures.items():
            outputs[name].append(fn(recon))
    scores = {"psnr_db": psnr_of_mse(squared / images.numel()), "ssim": ssim_total / len(images),
              "codebook_usage": seen.sum().item() / size, "tokens": count}
    return scores, {name: torch.cat(parts) for name, parts in outputs.items()}


def balanced_labels(num: int, num_classes: int) -> Tensor:
    """`num` int64 labels, sample i of class i mod `num_classes`: counts per class differ by at most one."""
    return torch.arange(num) % num_classes


def _feature_scores(ref_stats: tuple[Tensor, Tensor], ref_radii: Tensor, ref_feats: Tensor, feats: Tensor,
                    k: int) -> dict[str, float]:
    p, r = precision_recall(ref_feats, feats, k, real_radii=ref_radii)
    return {"fid": frechet_distance_gaussians(*ref_stats, *gaussian_stats(feats)), "precision": p, "recall": r}


def tool_versions() -> dict[str, str]:
    """Versions of the packages whose code computes the numbers."""
    versions = {}
    for name in ("sundae", "torch", "torchmetrics", "numpy", "pillow"):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def evaluate(pipe, ref: Reference, samplers: Sequence[SamplerConfig], num: int, batch_size: int, seed: int,
             classifier: SmallClassifier | None = None, classifier_record: dict[str, Any] | None = None,
             inception=None, inception_record: dict[str, Any] | None = None, k: int = 3,
             guidance_scale: float | tuple[float, float] = 1.0) -> tuple[dict[str, Any], Tensor]:
    """Measure the tokenizer of `pipe` (a `sundae.pipeline.SundaePipeline`) on `ref` and its generator with each
    sampler setting of `samplers` (a sweep over T, say). `classifier` (with `classifier_record`) and
    `inception` (a module mapping `b c H W` images in [-1, 1] to features, with `inception_record`) are
    optional feature extractors; a metric whose extractor is None is left out. Returns (results without the
    protocol, the samples of the first setting). Raises ValueError for fewer than k + 1 samples or reference
    images."""
    if min(num, len(ref.images)) <= k:
        raise ValueError(f"need more than k={k} samples and reference images for precision/recall, got {num} "
                         f"samples and {len(ref.images)} reference images")
    net, tokenizer = pipe.generator, pipe.tokenizer
    extractors = {}
    if classifier is not None:
        extractors["classifier"] = lambda x: classifier_features(classifier, x)
    if inception is not None:
        extractors["inception"] = inception
    ref_feats = {name: fn(ref.images) for name, fn in extractors.items()}
    ref_stats = {name: gaussian_stats(feats) for name, feats in ref_feats.items()}

    measures = dict(extractors)
    if classifier is not None:
        measures["predicted"] = lambda x: predict(classifier, x)
    tok, recon = measure_reconstructions(tokenizer, ref.images, batch_size, pipe.device, measures)
    tokens = tok.pop("tokens")
    tok["images"] = len(ref.images)
    if tok["codebook_usage"] < LOW_CODEBOOK_USAGE and tokens >= 4 * tokenizer.cfg.codebook_size:
        log.warning(f"the tokenizer uses {tok['codebook_usage']:.0%} of its {tokenizer.cfg.codebook_size} codes on "
                    f"{len(ref.images)} reference images: its codebook has collapsed (retrain it with "
                    f"restart_dead_codes, e.g. --set restart_dead_codes=1000)")
    for name in extractors:
        tok[f"rfid_{name}"] = frechet_distance_gaussians(*ref_stats[name], *gaussian_stats(recon[name]))
    if classifier is not None:
        tok["classifier_accuracy_on_reconstructions"] = (recon["predicted"] == ref.labels).float().mean().item()
    ref_radii = {name: knn_radii(feats, k) for name, feats in ref_feats.items()}  # once for every sampler setting

    conditional = bool(net.cfg.num_classes)
    labels = balanced_labels(num, net.cfg.num_classes) if conditional else None
    judge_labels = conditional and classifier is not None and ref.num_classes == net.cfg.num_classes
    rows, first = [], None
    for sampler in samplers:
        images, taken, seconds = generate(pipe, labels, num, batch_size, sampler, seed, guidance_scale,
                                          desc=f"sample T={sampler.steps}")
        first = images if first is None else first
        row: dict[str, Any] = {"steps": sampler.steps, "mean_steps_taken": taken.float().mean().item(),
                               "seconds_per_image": seconds / num}
        for name, fn in extractors.items():
            scores = _feature_scores(ref_stats[name], ref_radii[name], ref_feats[name], fn(images), k)
            row.update({f"{key}_{name}": value for key, value in scores.items()})
        if judge_labels:
            row["class_accuracy"] = (predict(classifier, images) == labels).float().mean().item()
        rows.append(row)
    results = {"tokenizer": tok, "samples": rows}
    if classifier_record is not None:
        results["classifier"] = classifier_record
    if inception_record is not None:
        results["inception"] = inception_record
    if conditional and not judge_labels:
        results.setdefault("skipped", {})["class_accuracy"] = (
            f"the generator has {net.cfg.num_classes} classes, the reference classifier "
            f"{ref.num_classes if classifier is not None else 'none'}")
    return results, first
