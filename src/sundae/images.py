"""Image files, masks and captions: one policy for every verb and for Python users.

Image files (`read_image`): any mode Pillow opens (L, LA, P with or without transparency, RGB, RGBA, CMYK,
16-bit I;16 and RGB PNGs, ...); EXIF orientation applied; alpha composited onto white (`BACKGROUND`); then
converted to what the tokenizer takes: 1 channel -> grayscale "L" (ITU-R 601 luma), 3 channels -> "RGB"
(grayscale replicated). 16-bit samples are scaled to 8 bits by value (not clipped). Files that cannot be
used raise `ImageError`. Images over Pillow's decompression-bomb limit (`Image.MAX_IMAGE_PIXELS`) are
refused, and so are images over a caller's `max_pixels`, by the size their header declares, before any
pixel is decoded. Tensors are `c H W` float in [-1, 1] (`image_to_tensor`, `tensor_to_image`); grids and
PNGs are written atomically (`save_image`, `save_grid`).

Masks (`load_mask`): 1 = regenerate, 0 = keep; transparent or white pixels are regenerated.

Captions (text-to-image): an image folder may hold a `metadata.jsonl` (one JSON object per line with
`file_name`, relative to the folder, and `text`: Hugging Face imagefolder's convention) and/or `.txt`
sidecars (`a.png` + `a.txt`). Neither is read as an image (a .txt without an image of its stem is).
"""

from __future__ import annotations

import math
import numbers

import glob
import json
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch import Tensor

from sundae.io import atomic_write, log

BACKGROUND = (255, 255, 255)  # transparent pixels become white
METADATA = "metadata.jsonl"  # captions, Hugging Face imagefolder convention
_SIXTEEN_BIT = {"I;16", "I;16L", "I;16B", "I;16N", "I"}  # 16-bit grayscale PNG/TIFF modes (values 0..65535)


class ImageError(ValueError):
    """A file that cannot be used as an image; the message names the file and why."""


def open_image_file(path: str | Path, max_pixels: int | None = None) -> Image.Image:
    """Open and fully decode an image file, EXIF orientation applied, in its own mode (no conversion).

    `max_pixels` (None: no limit but Pillow's) bounds width * height as the file's header declares it,
    checked before any pixel is decoded, so a small file declaring a huge canvas costs no memory.
    Raises ImageError naming `path` for missing, empty, truncated, corrupt or non-image files, images over
    `max_pixels`, and images over Pillow's decompression-bomb limit `Image.MAX_IMAGE_PIXELS` (also between
    the limit and twice it, where Pillow itself only warns).
    """
    path = Path(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:  # reads the header only
                width, height = img.size
                if max_pixels is not None and width * height > max_pixels:
                    raise ImageError(f"image {path} declares {width}x{height} = {width * height} pixels; the "
                                     f"limit is {max_pixels} pixels")
                img.load()
                return ImageOps.exif_transpose(img)
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise ImageError(f"image {path} refused as a possible decompression bomb (Pillow's limit "
                         f"Image.MAX_IMAGE_PIXELS={Image.MAX_IMAGE_PIXELS}): {err}") from None
    except FileNotFoundError:
        raise ImageError(f"image {path} does not exist") from None
    except UnidentifiedImageError:
        raise ImageError(f"cannot read image {path}: {_not_an_image(path)}") from None
    except Exception as err:  # Pillow raises OSError, SyntaxError, ValueError, zlib/struct errors on bad data
        reason = "empty file" if path.is_file() and path.stat().st_size == 0 else str(err) or type(err).__name__
        raise ImageError(f"cannot read image {path}: {reason}") from None


def _not_an_image(path: Path) -> str:
    """Why Pillow found no image format in `path`: empty, or not an image (or a damaged header), with its
    first bytes (an HTML page or a text file saved under an image's name shows itself)."""
    try:
        with open(path, "rb") as f:
            head = f.read(16)
    except OSError as err:
        return str(err)
    if not head:
        return "empty file"
    return f"not an image Pillow can read, or its header is damaged (it starts with {head!r})"


def read_image(path: str | Path, channels: int, background: tuple[int, int, int] = BACKGROUND,
               max_pixels: int | None = None) -> Image.Image:
    """Open an image file as a loaded PIL image of mode "L" (`channels` 1) or "RGB" (`channels` 3).

    EXIF orientation is applied (`ImageOps.exif_transpose`), so phone photos load upright. Transparency
    (RGBA, LA, PA, P or L with a transparent colour) is composited onto `background` (default white).
    16-bit samples (modes I;16*, and I holding 0..65535) are scaled by 255/65535 and rounded; 16-bit RGB(A)
    PNGs are already 8-bit after Pillow's decoding. CMYK uses Pillow's conversion.
    Raises ImageError naming `path` for missing, empty, truncated, corrupt or non-image files, floating
    point images (mode F), images whose header declares more than `max_pixels` pixels (checked before
    decoding; None: no limit but Pillow's), and images over Pillow's decompression-bomb limit
    `Image.MAX_IMAGE_PIXELS`.
    """
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    path = Path(path)
    img = open_image_file(path, max_pixels)
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


def load_image(path: str | Path, channels: int) -> torch.Tensor:
    """An image file -> `c H W` float in [-1, 1] (c = 1 grayscale or 3 RGB), by `read_image`'s
    policy (EXIF orientation, alpha onto white, 16-bit scaled). Raises ImageError naming the file."""
    return image_to_tensor(read_image(path, channels))


def load_mask(path: str | Path, size: tuple[int, int]) -> torch.Tensor:
    """A mask file -> `1 H W` float, 1 = regenerate, 0 = keep; `size` = the image's (H, W).

    The convention: if the file has transparency (RGBA, LA, PA, or a transparent palette entry) and some
    pixel is not fully opaque, transparent (alpha < 128) = regenerate; otherwise white (brightness at least
    half the range: >= 128, or >= 32768 for 16-bit masks) = regenerate. EXIF orientation is applied, as for
    the image. Raises ImageError for an unreadable file, ValueError for a size other than `size`.
    """
    try:
        img = open_image_file(path)
        if img.mode in _SIXTEEN_BIT:
            mask = np.asarray(img) >= 32768
        elif img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info:
            alpha = np.asarray(img.convert("RGBA"))[:, :, 3]
            # An alpha channel that is opaque everywhere carries no mask: read the brightness instead.
            mask = alpha < 128 if (alpha < 255).any() else np.asarray(img.convert("L")) >= 128
        else:
            mask = np.asarray(img.convert("L")) >= 128
    except ImageError as err:
        raise ImageError(f"mask: {err}") from None
    except (OSError, ValueError) as err:
        raise ImageError(f"cannot read mask {path}: {err}") from None
    if mask.shape != tuple(size):
        raise ValueError(f"mask {path} is {mask.shape[0]}x{mask.shape[1]} (HxW), the image is {size[0]}x{size[1]}: "
                         f"they must be the same size")
    return torch.from_numpy(mask).float()[None]


def outpaint_canvas(image: Tensor, extend: tuple[int, int, int, int],
                    max_pixels: int | None = None) -> tuple[Tensor, Tensor]:
    """The canvas and mask of an outpainting: `image` (`c H W`) grown by `extend` = (left, top, right, bottom)
    pixels -> (canvas `c H' W'`, the image at rows top.., columns left.. and 0 (mid grey) around it; mask
    `1 H' W'` float, 1 on the new pixels = regenerate), H' = top + H + bottom, W' = left + W + right.
    Raises ValueError for an extent that is not four integers >= 0 with one of them > 0, or a canvas of
    more than `max_pixels` pixels (checked before anything is allocated)."""
    if (not isinstance(extend, (tuple, list)) or len(extend) != 4
            or any(isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v) or int(v) != v or v < 0
                   for v in extend)
            or not any(extend)):
        raise ValueError(f"extend must be four integers >= 0 (left, top, right, bottom pixels), not all 0; got "
                         f"{tuple(extend) if isinstance(extend, (tuple, list)) else extend!r}")
    left, top, right, bottom = (int(v) for v in extend)
    height, width = image.shape[-2] + top + bottom, image.shape[-1] + left + right
    if max_pixels is not None and height * width > max_pixels:
        raise ValueError(f"the outpainted canvas would be {width}x{height} = {width * height} pixels; the limit is "
                         f"{max_pixels} pixels")
    canvas = image.new_zeros(image.shape[0], height, width)
    canvas[:, top:height - bottom, left:width - right] = image
    mask = torch.ones(1, height, width)
    mask[:, top:height - bottom, left:width - right] = 0
    return canvas, mask


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
