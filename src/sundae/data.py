"""Image datasets: a folder of image files and a folder of MNIST-style idx files.

Images leave this module as float tensors `c H W` in [-1, 1] with integer labels (0 where a dataset has
no classes). Two sources: a folder of image files (class = first-level sub-folder, sorted by name) and a
folder holding MNIST-style idx files (Fashion-MNIST as Debian's `dataset-fashion-mnist` installs it).
Image files are read by `sundae.images.read_image`'s policy. Idx images are grayscale and follow the same
rule: replicated into three equal channels for a 3-channel tokenizer. Files that cannot be used raise
`ImageError`; `ImageFolder` skips them with a warning (or stops at the first with `strict=True`).
Captions come from `metadata.jsonl` and `.txt` sidecars (`sundae.images.read_captions`).

Decoding and resizing a photo takes tens of milliseconds, so every reader of image files takes `workers`:
`data_loader` (batches, in `workers` DataLoader processes) and `stack_items` (a few items, stacked) for the
training loop, `sundae tokenize`, `reconstruct` and `evaluate`, and `ImageFolder`'s scan of its files. Items
come back in the same order, and a file that fails in a worker raises the same ImageError as without workers.
"""

from __future__ import annotations

import gzip
import signal
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler, Subset, default_collate

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
    read once here with `read_image` (its policy for modes, EXIF, alpha and `channels`; in `workers`
    processes when > 0, with the same results in the same order): files that cannot be read, and images
    whose shorter side is under `size`, are skipped with a warning naming the file and a count at the end,
    or with `strict` the first one raises ImageError. Items: (`c size size` float in
    [-1, 1], int label). Raises FileNotFoundError when no usable image is left. `skipped` lists (path, reason).

    Captions (`captions`: one str per item, or None for a folder without any) come from `root/metadata.jsonl`
    and `.txt` sidecars (`read_captions`); those files are never tried as images (a .txt beside no file of
    its stem is, like any other file). Images of a captioned
    folder without a caption get the empty caption, with a warning counting them.
    """

    def __init__(self, root: str | Path, size: int, channels: int = 3, strict: bool = False, workers: int = 0):
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
        found = [(path, label) for label, folder in enumerate(subdirs or [root]) for path in sorted(folder.rglob("*"))
                 if path.is_file() and not any(part.startswith(".") for part in path.relative_to(root).parts)
                 and not _caption_file(path)]
        candidates = len(found)
        for (path, label), problem in zip(found, _problems(_Checks([p for p, _ in found], size, channels), workers)):
            if problem is None:
                self.files.append((path, label))
                continue
            if strict:
                raise ImageError(f"{problem} (--strict stops at the first unusable file)")
            log.warning("skipped: %s", problem)
            self.skipped.append((path, problem))
        if self.skipped:
            log.warning("skipped %d of %d file%s under %s (see above)", len(self.skipped), candidates,
                        "" if candidates == 1 else "s", root)
        if not self.files:
            raise FileNotFoundError(f"no usable images found under {root} ({candidates} file"
                                    f"{'' if candidates == 1 else 's'}, "
                                    f"{len(self.skipped)} skipped)")
        self.num_classes = len(self.classes)
        self.captions = read_captions(root, [path for path, _ in self.files])

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


def open_images(path: str | Path, size: int, channels: int, split: str = "train", strict: bool = False,
                workers: int = 0) -> Dataset:
    """An idx folder (Fashion-MNIST; grayscale replicated when `channels` is 3) or an image folder
    (`ImageFolder`, with `strict`, scanned in `workers` processes), as a dataset of (`channels size size`,
    label)."""
    path = Path(path)
    if not path.exists():
        hint = " (install it with `apt-get install dataset-fashion-mnist`)" if path == FASHION_MNIST_DIR else ""
        raise FileNotFoundError(f"dataset folder {path} does not exist{hint}")
    if path.is_file():
        raise FileNotFoundError(f"{path} is a file: expected a folder of images (or of idx files)")
    if is_idx_dataset(path):
        return IdxImages(path, split, size, channels)
    return ImageFolder(path, size, channels, strict, workers)


# ---- reading items in worker processes -------------------------------------------------------------------

STACK_CHUNK = 8  # items per message when `stack_items` reads in workers: 8 photos are ~0.5 s of decoding


class _Checks(Dataset):
    """Item i: None when image file `paths[i]` can be used at `size` pixels, else why not (the ImageError's
    message): `ImageFolder`'s scan, run where the DataLoader runs it."""

    def __init__(self, paths: Sequence[Path], size: int, channels: int):
        self.paths, self.size, self.channels = list(paths), size, channels

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> str | None:
        path = self.paths[i]
        try:
            img = read_image(path, self.channels)
        except ImageError as err:
            return str(err)
        if min(img.size) < self.size:
            return f"image {path} is {img.height}x{img.width}, smaller than the {self.size}-pixel crop"
        return None


def _problems(checks: _Checks, workers: int) -> Iterator[str | None]:
    """The items of `checks` in order, lazily (a --strict scan stops at the first problem), in `workers`
    processes when > 0."""
    if workers == 0:
        return (checks[i] for i in range(len(checks)))
    return iter(DataLoader(checks, batch_size=None, num_workers=workers, worker_init_fn=_worker_init,
                           generator=torch.Generator().manual_seed(0)))


def _worker_init(worker_id: int) -> None:
    """Workers ignore SIGINT and SIGTERM: Ctrl-C reaches the whole process group and batch schedulers signal
    every process of a job, and a worker killed by them makes the main process fail ("DataLoader worker exited
    unexpectedly") instead of stopping at a step boundary with a checkpoint. The main process decides, and
    shuts its workers down when it stops (they also exit when it dies)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


class _Guarded(Dataset):
    """`dataset` whose ImageError comes back as the item (to `_collate`) instead of being raised in a worker,
    where torch would re-raise it in the main process as "Caught ImageError in DataLoader worker process 0"
    followed by a traceback, hiding the one line that names the file."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: Any) -> Any:
        try:
            return self.dataset[i]
        except ImageError as err:
            return err


def _collate(items: list[Any]) -> Any:
    """The batch of `items`, or the first ImageError among them (raised by `_Loader` in the main process)."""
    failed = next((item for item in items if isinstance(item, ImageError)), None)
    return failed if failed is not None else default_collate(items)


class _Loader(DataLoader):
    """A DataLoader over a `_Guarded` dataset that raises an item's ImageError in the main process, as
    iterating over the dataset there would have."""

    def __iter__(self) -> Iterator[Any]:
        for batch in super().__iter__():
            if isinstance(batch, ImageError):
                raise batch
            yield batch


def data_loader(dataset: Dataset, workers: int = 0, device: str | torch.device = "cpu", batch_size: int = 1,
                batch_sampler: Sampler | None = None, seed: int = 0) -> DataLoader:
    """Batches of `dataset` in order (`batch_size` items, the last one partial; or the index lists of
    `batch_sampler`), read in `workers` DataLoader processes (0: in this one). The batches are the same
    whatever `workers` is, and so is the error: an ImageError raised by an item is raised here, as is.

    Memory is pinned when `device` is CUDA (faster copies to the GPU), not otherwise. Worker k of each pass
    over the loader is seeded base + k (torch's rule: its `torch`, `random` and `numpy` generators), the base
    drawn from a generator seeded with `seed`, so random transforms in a dataset differ between workers and
    between passes, and a run is reproducible for a given `seed` and `workers`; the global RNG of this process
    is not drawn from. Workers ignore SIGINT and SIGTERM (the main process stops them). A pass creates its
    workers once: the training loop's endless loader makes one pass, so persistent workers gain nothing there.
    Raises ValueError for a negative `workers`.
    """
    if workers < 0:
        raise ValueError(f"workers must be >= 0, got {workers}")
    return _Loader(_Guarded(dataset), batch_size=1 if batch_sampler is not None else batch_size,
                   batch_sampler=batch_sampler, num_workers=workers, collate_fn=_collate,
                   pin_memory=torch.device(device).type == "cuda", worker_init_fn=_worker_init,
                   generator=torch.Generator().manual_seed(seed))


def stack_items(dataset: Dataset, rows: Sequence[int], workers: int = 0) -> tuple[Tensor, Tensor]:
    """Items `rows` of `dataset` (`c H W` image, int label), stacked: (`n c H W`, labels `n` int64), read
    `STACK_CHUNK` at a time in `workers` processes (0: in this one). Raises ImageError as reading them here
    would, ValueError for no rows."""
    if not len(rows):
        raise ValueError("no items to read")
    parts = list(data_loader(Subset(dataset, list(rows)), workers, batch_size=STACK_CHUNK))
    return torch.cat([x for x, _ in parts]), torch.cat([y for _, y in parts]).to(torch.int64)
