"""Image datasets: a folder of image files and a folder of MNIST-style idx files.

Images leave this module as float tensors `c H W` in [-1, 1] with integer labels (0 where a dataset has
no classes). Two sources: a folder of image files (class = first-level sub-folder, sorted by name) and a
folder holding MNIST-style idx files (Fashion-MNIST as Debian's `dataset-fashion-mnist` installs it).
Image files are read by `sundae.images.read_image`'s policy. Idx images are grayscale and follow the same
rule: replicated into three equal channels for a 3-channel tokenizer. Files that cannot be used raise
`ImageError`; `ImageFolder` skips them with a warning (or stops at the first with `strict=True`).
Captions come from `metadata.jsonl` and `.txt` sidecars (`sundae.images.read_captions`).
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from sundae.images import ImageError, _caption_file, image_to_tensor, read_captions, read_image
from sundae.io import log

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as fh:
            raw = fh.read()
    except (OSError, EOFError) as err:
        raise ValueError(f"cannot read {path}: {err}") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise ValueError(f"{path} is not an idx file of unsigned bytes")
    ndim = raw[3]
    dims = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise ValueError(f"{path} is truncated: header says {dims}, found {data.size} values")
    return data.reshape(dims)


def _idx_file(root: Path, stem: str) -> Path:
    for name in (f"{stem}.gz", stem):
        if (root / name).is_file():
            return root / name
    raise FileNotFoundError(
        f"no {stem}[.gz] in {root}: install Fashion-MNIST with `apt-get install dataset-fashion-mnist` "
        f"(it lands in {FASHION_MNIST_DIR}) or pass --data DIR holding the idx files"
    )


def is_idx_dataset(root: str | Path) -> bool:
    """True if `root` holds MNIST-style idx files (train-images-idx3-ubyte[.gz])."""
    root = Path(root)
    return any((root / f"train-images-idx3-ubyte{s}").is_file() for s in (".gz", ""))


class IdxImages(Dataset):
    """MNIST-style idx images (`split` "train" or "test"), zero-padded to `size` pixels: items are
    (`channels size size` float in [-1, 1], int label). Fashion-MNIST's black background pads with -1.

    The files hold grayscale bytes; `channels` 3 replicates them into three equal channels, the same rule
    `read_image` applies to grayscale image files. `images` keeps the single channel (`N 1 size size`).
    Raises ValueError for a bad `split` or `channels`, unreadable or truncated files, or `size` under the
    image size; FileNotFoundError when an idx file is missing.
    """

    def __init__(self, root: str | Path, split: str = "train", size: int = 32, channels: int = 1):
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {channels}")
        self.channels = channels
        root = Path(root)
        prefix = {"train": "train", "test": "t10k"}.get(split)
        if prefix is None:
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        images = _read_idx(_idx_file(root, f"{prefix}-images-idx3-ubyte"))
        self.labels = torch.from_numpy(_read_idx(_idx_file(root, f"{prefix}-labels-idx1-ubyte")).astype(np.int64))
        if len(images) != len(self.labels):
            raise ValueError(f"{root}: {len(images)} {split} images but {len(self.labels)} labels")
        h, w = images.shape[1:]
        if size < max(h, w):
            raise ValueError(f"size {size} is smaller than the {h}x{w} images in {root}")
        top, left = (size - h) // 2, (size - w) // 2
        x = torch.from_numpy(images.copy()).float().div_(127.5).sub_(1.0)  # in place: 60,000 images are 188 MB a copy
        self.images = torch.nn.functional.pad(x, (left, size - w - left, top, size - h - top), value=-1.0)[:, None]
        self.num_classes = int(self.labels.max()) + 1

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        x = self.images[i]
        return (x if self.channels == 1 else x.repeat(self.channels, 1, 1)), int(self.labels[i])


class ImageFolder(Dataset):
    """A folder of image files, resized (shorter side) and centre-cropped to `size` x `size` pixels.

    Sub-folders are classes (sorted names -> labels 0..); files directly in `root` get label 0 when there
    are no sub-folders. When there are class sub-folders, files directly in `root` are not used (the
    sub-folders define the labels, so such a file has none): a warning (logger "sundae") says how many were
    ignored, or with `strict` that is an ImageError naming the folder. Every file not starting with "." is
    read once here with `read_image` (its policy for modes, EXIF, alpha and `channels`): files that cannot
    be read, and images whose shorter side is under `size`, are skipped with a warning naming the file and
    a count at the end, or with `strict` the first one raises ImageError. Items: (`c size size` float in
    [-1, 1], int label). Raises FileNotFoundError when no usable image is left. `skipped` lists (path, reason).

    Captions (`captions`: one str per item, or None for a folder without any) come from `root/metadata.jsonl`
    and `.txt` sidecars (`read_captions`); those files are never tried as images (a .txt beside no file of
    its stem is, like any other file). Images of a captioned
    folder without a caption get the empty caption, with a warning counting them.
    """

    def __init__(self, root: str | Path, size: int, channels: int = 3, strict: bool = False):
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"image folder {root} does not exist")
        self.size, self.channels = size, channels
        subdirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        self.classes = [p.name for p in subdirs]
        self.files: list[tuple[Path, int]] = []
        self.skipped: list[tuple[Path, str]] = []
        if subdirs:
            loose = [p for p in root.iterdir() if p.is_file() and not p.name.startswith(".") and not _caption_file(p)]
            if loose:
                what = (f"ignored {len(loose)} file(s) directly in {root} (e.g. {min(loose).name}): its "
                        f"{len(subdirs)} class sub-folder(s) define the labels, so a top-level file has none; "
                        f"move it into a class folder")
                if strict:
                    raise ImageError(f"{what} (--strict stops here)")
                log.warning("%s", what)
        candidates = 0
        for label, folder in enumerate(subdirs or [root]):
            for path in sorted(folder.rglob("*")):
                if (not path.is_file() or any(part.startswith(".") for part in path.relative_to(root).parts)
                        or _caption_file(path)):
                    continue
                candidates += 1
                try:
                    self._check(path)
                except ImageError as err:
                    if strict:
                        raise ImageError(f"{err} (--strict stops at the first unusable file)") from None
                    log.warning("skipped: %s", err)
                    self.skipped.append((path, str(err)))
                    continue
                self.files.append((path, label))
        if self.skipped:
            log.warning("skipped %d of %d file%s under %s (see above)", len(self.skipped), candidates,
                        "" if candidates == 1 else "s", root)
        if not self.files:
            raise FileNotFoundError(f"no usable images found under {root} ({candidates} file"
                                    f"{'' if candidates == 1 else 's'}, "
                                    f"{len(self.skipped)} skipped)")
        self.num_classes = len(self.classes)
        self.captions = read_captions(root, [path for path, _ in self.files])

    def _check(self, path: Path) -> None:
        img = read_image(path, self.channels)
        if min(img.size) < self.size:
            raise ImageError(f"image {path} is {img.height}x{img.width}, smaller than the {self.size}-pixel crop")

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        path, label = self.files[i]
        img = read_image(path, self.channels)
        scale = self.size / min(img.size)
        img = img.resize((max(self.size, round(img.width * scale)), max(self.size, round(img.height * scale))),
                         Image.Resampling.BICUBIC)
        left, top = (img.width - self.size) // 2, (img.height - self.size) // 2
        img = img.crop((left, top, left + self.size, top + self.size))
        return image_to_tensor(img), label


def open_images(path: str | Path, size: int, channels: int, split: str = "train", strict: bool = False) -> Dataset:
    """An idx folder (Fashion-MNIST; grayscale replicated when `channels` is 3) or an image folder
    (`ImageFolder`, with `strict`), as a dataset of (`channels size size`, label)."""
    path = Path(path)
    if not path.exists():
        hint = " (install it with `apt-get install dataset-fashion-mnist`)" if path == FASHION_MNIST_DIR else ""
        raise FileNotFoundError(f"dataset folder {path} does not exist{hint}")
    if path.is_file():
        raise FileNotFoundError(f"{path} is a file: expected a folder of images (or of idx files)")
    if is_idx_dataset(path):
        return IdxImages(path, split, size, channels)
    return ImageFolder(path, size, channels, strict)
