"""Images in, tokens out, grids written: datasets, the token memmap format and image grids.

Images leave this module as float tensors `c H W` in [-1, 1] with integer labels (0 where a dataset has
no classes). Two sources: a folder of image files (class = first-level sub-folder, sorted by name) and a
folder holding MNIST-style idx files (Fashion-MNIST as Debian's `dataset-fashion-mnist` installs it).

Image files, one policy for every verb (`read_image`): any mode Pillow opens (L, LA, P with or without
transparency, RGB, RGBA, CMYK, 16-bit I;16 and RGB PNGs, ...); EXIF orientation applied; alpha composited
onto white (`BACKGROUND`); then converted to what the tokenizer takes: 1 channel -> grayscale "L" (ITU-R
601 luma), 3 channels -> "RGB" (grayscale replicated). 16-bit samples are scaled to 8 bits by value (not
clipped). Idx images are grayscale and follow the same rule: replicated into three equal channels for a
3-channel tokenizer. Files that cannot be used raise `ImageError`; `ImageFolder` skips them with a warning
(or stops at the first with `strict=True`). Images over Pillow's decompression-bomb limit
(`Image.MAX_IMAGE_PIXELS`) are refused.

Captions (text-to-image): an image folder may hold a `metadata.jsonl` (one JSON object per line with
`file_name`, relative to the folder, and `text`: Hugging Face imagefolder's convention) and/or `.txt`
sidecars (`a.png` + `a.txt`). Neither is read as an image (a .txt without an image of its stem is).

Token datasets (`sundae tokenize`) are a folder with `tokens.npy` (uint16 `N h w`, read as a memmap),
`labels.npy` (int64 `N`) and `meta.json` (codebook size, grid, f, the tokenizer that produced them); from a
captioned folder also `captions.json` and the text encoder's `text_features.npy` (float16 `N n e`),
`text_mask.npy` (bool `N n`) and `text_pooled.npy` (float16 `N e`), computed once so that training never
runs the encoder.
"""

from __future__ import annotations

import glob
import gzip
import json
import logging
import os
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from torch import Tensor
from torch.utils.data import Dataset

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
BACKGROUND = (255, 255, 255)  # transparent pixels become white
METADATA = "metadata.jsonl"  # captions, Hugging Face imagefolder convention
_SIXTEEN_BIT = {"I;16", "I;16L", "I;16B", "I;16N", "I"}  # 16-bit grayscale PNG/TIFF modes (values 0..65535)
log = logging.getLogger("sundae")


class ImageError(ValueError):
    """A file that cannot be used as an image; the message names the file and why."""


def open_image_file(path: str | Path) -> Image.Image:
    """Open and fully decode an image file, EXIF orientation applied, in its own mode (no conversion).

    Raises ImageError naming `path` for missing, empty, truncated, corrupt or non-image files and images over
    Pillow's decompression-bomb limit `Image.MAX_IMAGE_PIXELS` (also between the limit and twice it, where
    Pillow itself only warns).
    """
    path = Path(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                img.load()
                return ImageOps.exif_transpose(img)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise ImageError(f"{path} refused as a possible decompression bomb (Pillow's limit "
                         f"Image.MAX_IMAGE_PIXELS={Image.MAX_IMAGE_PIXELS}): {err}") from None
    except FileNotFoundError:
        raise ImageError(f"image {path} does not exist") from None
    except Exception as err:  # Pillow raises OSError, SyntaxError, ValueError, zlib/struct errors on bad data
        reason = "empty file" if path.is_file() and path.stat().st_size == 0 else str(err) or type(err).__name__
        raise ImageError(f"cannot read image {path}: {reason}") from None


def read_image(path: str | Path, channels: int, background: tuple[int, int, int] = BACKGROUND) -> Image.Image:
    """Open an image file as a loaded PIL image of mode "L" (`channels` 1) or "RGB" (`channels` 3).

    EXIF orientation is applied (`ImageOps.exif_transpose`), so phone photos load upright. Transparency
    (RGBA, LA, PA, P or L with a transparent colour) is composited onto `background` (default white).
    16-bit samples (modes I;16*, and I holding 0..65535) are scaled by 255/65535 and rounded; 16-bit RGB(A)
    PNGs are already 8-bit after Pillow's decoding. CMYK uses Pillow's conversion.
    Raises ImageError naming `path` for missing, empty, truncated, corrupt or non-image files, floating
    point images (mode F), and images over Pillow's decompression-bomb limit `Image.MAX_IMAGE_PIXELS`.
    """
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    path = Path(path)
    img = open_image_file(path)
    if img.mode == "F":
        raise ImageError(f"{path} is a floating-point image (mode F): convert it to 8 or 16-bit integers")
    if img.mode in _SIXTEEN_BIT:
        values = np.asarray(img, dtype=np.float64) * (255 / 65535)
        img = Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8), "L")
    try:
        if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
            rgba = img.convert("RGBA")
            img = Image.alpha_composite(Image.new("RGBA", rgba.size, (*background, 255)), rgba)
        return img.convert("L" if channels == 1 else "RGB")
    except (ValueError, OSError) as err:
        raise ImageError(f"cannot convert image {path} (mode {img.mode}) to {'L' if channels == 1 else 'RGB'}: "
                         f"{err}") from None


def atomic_write(path: str | Path, write) -> None:
    """Call write(tmp_path) on a temporary file beside `path`, then rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the permissions open() would
        os.replace(tmp, path)
    except OSError as err:  # a full disk, a read-only folder, ...: name the file that could not be written
        Path(tmp).unlink(missing_ok=True)
        raise OSError(err.errno, f"cannot write {path}: {err.strerror or err}") from err
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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
        x = torch.from_numpy(images.copy()).float().div(127.5).sub(1.0)
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


def _caption_file(path: Path) -> bool:
    """metadata.jsonl, or a .txt beside a file of the same stem (a sidecar caption); a lone .txt is not a
    caption and is tried (and skipped) like any other file."""
    if path.name == METADATA:
        return True
    return path.suffix == ".txt" and any(p != path for p in path.parent.glob(f"{glob.escape(path.stem)}.*"))


def _read_text(path: Path) -> str:
    """A caption file's text, UTF-8 with or without a byte-order mark (dropped). Raises ValueError naming the
    file and line for other bytes."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data[:err.start].count(b"\n") + 1
        raise ValueError(f"caption file {path} is not UTF-8 text: line {line}: {err.reason} "
                         f"(byte {data[err.start]:#04x}; save it as UTF-8)") from None


def check_text(text: str, what: str) -> str:
    """`text` unchanged when it is valid Unicode text (encodable as UTF-8: no unpaired surrogate, such as a
    JSON "\\ud800" escape or an undecodable command-line byte); ValueError starting with `what` otherwise."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise ValueError(f"{what}: not valid text ({err.reason}, {text[err.start]!r} at character {err.start}; "
                         f"captions and prompts must be UTF-8)") from None
    return text


def read_captions(root: str | Path, images: list[Path]) -> list[str] | None:
    """The caption of each of `images` (files under `root`), or None when the folder has no captions.

    Sources: `metadata.jsonl` files in `root` and in any folder below it (class sub-folders too, as in a
    Hugging Face imagefolder), one JSON object per line with string fields `file_name` (relative to the
    metadata file's folder, sub-folders allowed) and `text` (other fields are ignored; blank lines too; UTF-8,
    a byte-order mark is dropped), and `.txt` sidecars
    (image `a.png`, caption `a.txt` beside it, UTF-8, surrounding whitespace stripped). An image without a
    caption gets "" (the empty caption is valid), with a warning counting them. Raises ValueError naming the
    file (and line) for invalid JSON, missing or non-string fields, a `file_name` outside `root` or listed
    twice, an image captioned both ways, non-UTF-8 text; FileNotFoundError for a listed image that does not
    exist.
    """
    root = Path(root)
    captions: dict[Path, str] = {}
    source: dict[Path, Path] = {}  # image -> the metadata file that captions it
    metas = sorted(p for p in root.rglob(METADATA) if p.is_file())
    for meta in metas:
        base = meta.parent.resolve()
        for n, line in enumerate(_read_text(meta).splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{meta} line {n}: not valid JSON ({err.msg} at column {err.colno})") from None
            if not (isinstance(record, dict) and isinstance(record.get("file_name"), str)
                    and isinstance(record.get("text"), str)):
                raise ValueError(f"{meta} line {n}: expected an object with string fields \"file_name\" and "
                                 f"\"text\", got {line.strip()[:80]}")
            path = (meta.parent / record["file_name"]).resolve()
            if base not in path.parents:
                raise ValueError(f"{meta} line {n}: file_name {record['file_name']!r} is outside {meta.parent}")
            if not path.is_file():
                raise FileNotFoundError(f"{meta} line {n}: image {record['file_name']!r} does not exist in "
                                        f"{meta.parent}")
            if path in captions:
                where = "" if source[path] == meta else f" (also in {source[path]})"
                raise ValueError(f"{meta} line {n}: {record['file_name']!r} is listed twice{where}")
            captions[path] = check_text(record["text"], f"{meta} line {n}")
            source[path] = meta
    sidecars = 0
    for image in images:
        txt = image.with_suffix(".txt")
        if txt.is_file():
            if image.resolve() in captions:
                raise ValueError(f"{image} has a caption in {source[image.resolve()]} and in {txt}: keep one of them")
            captions[image.resolve()] = _read_text(txt).strip()
            sidecars += 1
    if not metas and not sidecars:
        return None
    out = [captions.get(image.resolve()) for image in images]
    missing = [image for image, text in zip(images, out) if text is None]
    if missing:
        log.warning("%d of %d images under %s have no caption (neither in %s nor a .txt beside them, e.g. %s): "
                    "they get the empty caption", len(missing), len(images), root, METADATA, missing[0].name)
    return [text or "" for text in out]


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


def image_to_tensor(img: Image.Image) -> Tensor:
    """PIL image (L or RGB) -> `c H W` float in [-1, 1]."""
    arr = np.asarray(img, dtype=np.float32)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return torch.from_numpy(arr).permute(2, 0, 1).div(127.5).sub(1.0)


def tensor_to_image(x: Tensor) -> Image.Image:
    """`c H W` float in [-1, 1] (c = 1 or 3) -> PIL image (L or RGB)."""
    arr = x.detach().float().clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(arr[:, :, 0] if arr.shape[2] == 1 else arr)


def make_grid(images: Tensor, nrow: int, pad: int = 2, value: float = 1.0) -> Tensor:
    """`b c H W` -> `c H' W'`: images in rows of `nrow`, separated by `pad` pixels of `value`."""
    b, c, h, w = images.shape
    ncol = nrow
    nrows = -(-b // ncol)
    grid = images.new_full((c, pad + nrows * (h + pad), pad + ncol * (w + pad)), value)
    for i in range(b):
        r, col = divmod(i, ncol)
        top, left = pad + r * (h + pad), pad + col * (w + pad)
        grid[:, top:top + h, left:left + w] = images[i]
    return grid


def save_image(x: Tensor, path: str | Path) -> None:
    """Write `c H W` float in [-1, 1] as a PNG, atomically."""
    img = tensor_to_image(x)
    atomic_write(path, lambda tmp: img.save(tmp, format="PNG"))


def save_grid(images: Tensor, path: str | Path, nrow: int, pad: int = 2) -> None:
    """Write `b c H W` images in [-1, 1] as one PNG grid with `nrow` images per row, atomically."""
    save_image(make_grid(images, nrow, pad), path)


def write_json(path: str | Path, obj) -> None:
    """Write `obj` as indented JSON, atomically."""
    text = json.dumps(obj, indent=2, sort_keys=True) + "\n"
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


class TokenDataset(Dataset):
    """A `sundae tokenize` folder: items are (`h w` int64 tokens, int label), and for a folder with text
    features (meta.json `text_dim` > 0) also the caption's (features `n e` float32, mask `n` bool, pooled
    `e` float32), read from float16 memmaps.

    Raises FileNotFoundError naming the missing file, ValueError when the files disagree.
    """

    def __init__(self, root: str | Path):
        root = Path(root)
        for name in ("tokens.npy", "labels.npy", "meta.json"):
            if not (root / name).is_file():
                raise FileNotFoundError(f"{root / name} is missing: make the folder with `sundae tokenize`")
        try:
            self.meta = json.loads((root / "meta.json").read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{root / 'meta.json'} is not valid JSON: {err}") from None
        if not isinstance(self.meta, dict) or not {"grid", "n_codes"} <= set(self.meta):
            raise ValueError(f"{root / 'meta.json'} must be an object with at least 'grid' and 'n_codes'")
        grid, n_codes = self.meta["grid"], self.meta["n_codes"]
        if not (isinstance(grid, list) and len(grid) == 2 and all(isinstance(v, int) and v > 0 for v in grid)
                and isinstance(n_codes, int) and n_codes > 0):
            raise ValueError(f"{root / 'meta.json'}: 'grid' must be two positive integers and 'n_codes' a positive "
                             f"integer, got grid={grid!r}, n_codes={n_codes!r}")
        try:
            self.tokens = np.load(root / "tokens.npy", mmap_mode="r")
            self.labels = np.load(root / "labels.npy")
        except (OSError, ValueError, EOFError) as err:
            raise ValueError(f"cannot read the token files in {root} (truncated? re-run `sundae tokenize`): "
                             f"{err}") from None
        if self.tokens.ndim != 3 or len(self.tokens) != len(self.labels):
            raise ValueError(f"{root}: tokens {self.tokens.shape} and labels {self.labels.shape} do not match")
        if list(self.tokens.shape[1:]) != list(self.meta["grid"]):
            raise ValueError(f"{root}: tokens grid {self.tokens.shape[1:]} but meta.json says {self.meta['grid']}")
        top = int(self.tokens.max()) if len(self.tokens) else 0
        if top >= int(self.meta["n_codes"]):
            raise ValueError(f"{root}: token id {top} but meta.json says n_codes={self.meta['n_codes']}")
        n = self.num_classes
        if n and len(self.labels) and not 0 <= int(self.labels.min()) <= int(self.labels.max()) < n:
            raise ValueError(f"{root}: labels outside 0..{n - 1} (meta.json num_classes)")
        self.text = None
        if self.text_dim:
            names = ("text_features.npy", "text_mask.npy", "text_pooled.npy")
            for name in names:
                if not (root / name).is_file():
                    raise FileNotFoundError(f"{root / name} is missing (meta.json says text_dim={self.text_dim}): "
                                            f"re-run `sundae tokenize`")
            try:
                self.text = tuple(np.load(root / name, mmap_mode="r") for name in names)
            except (OSError, ValueError, EOFError) as err:
                raise ValueError(f"cannot read the text files in {root}: {err}") from None
            features, mask, pooled = self.text
            if (features.shape[0] != len(self.labels) or features.shape[2] != self.text_dim
                    or mask.shape != features.shape[:2] or pooled.shape != (len(self.labels), self.text_dim)):
                raise ValueError(f"{root}: text features {features.shape}, mask {mask.shape}, pooled {pooled.shape} "
                                 f"do not fit {len(self.labels)} rows of text_dim {self.text_dim}")

    @property
    def num_classes(self) -> int:
        return int(self.meta.get("num_classes", 0))

    @property
    def text_dim(self) -> int:
        """Width of the stored text features; 0 for a folder without captions."""
        return int(self.meta.get("text_dim", 0))

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple:
        item = (torch.from_numpy(self.tokens[i].astype(np.int64)), int(self.labels[i]))
        if self.text is None:
            return item
        features, mask, pooled = self.text
        return (*item, torch.from_numpy(features[i].astype(np.float32)), torch.from_numpy(mask[i].copy()),
                torch.from_numpy(pooled[i].astype(np.float32)))
