"""Demo data for text-to-image: the emoji of the Noto Color Emoji font as a captioned image folder.

Debian's `fonts-noto-color-emoji` installs NotoColorEmoji.ttf, a CBDT font of colour bitmaps drawn at 109
pixels per em (Pillow needs that size and `embedded_color=True`). Every single code point the font draws in
the Unicode blocks below is rendered, centred on white, downsampled to `size` x `size` and captioned with
its Unicode name in lower case (`unicodedata.name`: "grinning face", "red apple", ...). About 1,300 images,
written as `NNNN_<codepoint>.png` plus a `metadata.jsonl` (Hugging Face imagefolder convention), which
`sundae tokenize` reads.
"""

from __future__ import annotations

import functools
import json
import re
import unicodedata
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from sundae.images import METADATA
from sundae.io import atomic_write

FONT = Path("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf")
BITMAP_SIZE = 109  # the only size a CBDT font of Noto's draws
# Blocks holding the font's single-code-point emoji: Latin-1 (c) (r), punctuation, letterlike, arrows,
# technical, enclosed alphanumerics, geometric shapes, miscellaneous symbols, dingbats, CJK symbols, and the
# supplementary emoji planes (mahjong and cards through symbols and pictographs extended-A).
BLOCKS = ((0x00A0, 0x00FF), (0x2000, 0x2BFF), (0x3000, 0x33FF), (0x1F000, 0x1FAFF))


def emoji_code_points(font_path: str | Path = FONT) -> list[tuple[int, str]]:
    """(code point, caption) of every named code point in `BLOCKS` the font draws, in code point order.
    Raises FileNotFoundError saying which Debian package installs the font."""
    return list(_scan(str(font_path)))


@functools.lru_cache(maxsize=4)
def _scan(font_path: str) -> tuple[tuple[int, str], ...]:
    font = _font(font_path)
    found = []
    for first, last in BLOCKS:
        for cp in range(first, last + 1):
            name = unicodedata.name(chr(cp), "")
            if name and _draw(font, chr(cp)).getbbox():
                found.append((cp, name.lower()))
    return tuple(found)


def _font(font_path: str | Path) -> ImageFont.FreeTypeFont:
    if not Path(font_path).is_file():
        raise FileNotFoundError(f"emoji font {font_path} not found: install it with `apt-get install "
                                f"fonts-noto-color-emoji` (or pass the path of NotoColorEmoji.ttf)")
    try:
        return ImageFont.truetype(str(font_path), size=BITMAP_SIZE, layout_engine=ImageFont.Layout.BASIC)
    except OSError as err:
        raise ValueError(f"emoji font {font_path} is not a font file FreeType can read ({err}): pass the path of "
                         f"NotoColorEmoji.ttf") from None


def _draw(font: ImageFont.FreeTypeFont, char: str) -> Image.Image:
    """One glyph on a transparent 160x160 RGBA canvas (the bitmaps are 136x128)."""
    img = Image.new("RGBA", (160, 160), (0, 0, 0, 0))
    ImageDraw.Draw(img).text((0, 0), char, font=font, embedded_color=True)
    return img


def render_emoji(char: str, size: int = 32, font_path: str | Path = FONT) -> Image.Image:
    """One emoji as an RGB `size` x `size` image: the glyph's bounding box centred on a white square
    (its longer side plus a 6% margin), Lanczos-downsampled. Raises ValueError if the font has no glyph."""
    glyph = _draw(_font(font_path), char)
    box = glyph.getbbox()
    if box is None:
        raise ValueError(f"{FONT.name} has no glyph for {char!r} (U+{ord(char[0]):04X})")
    glyph = glyph.crop(box)
    side = round(max(glyph.size) * 1.06)
    canvas = Image.new("RGBA", (side, side), (255, 255, 255, 255))
    canvas.alpha_composite(glyph, ((side - glyph.width) // 2, (side - glyph.height) // 2))
    return canvas.convert("RGB").resize((size, size), Image.Resampling.LANCZOS)


def write_emoji_folder(out: str | Path, size: int = 32, limit: int = 0, font_path: str | Path = FONT,
                       overwrite: bool = False) -> int:
    """Render the font's emoji into the captioned image folder `out` (`NNNN_<hex>.png` + metadata.jsonl,
    each written atomically); `limit` > 0 keeps every k-th emoji so that about `limit` remain (spread over
    all blocks). A non-empty `out` is refused unless `overwrite`, which first deletes an earlier render there
    (its PNGs and metadata.jsonl; other files make it refuse still, as they would join the dataset). Returns
    the number of images. Raises FileNotFoundError when the font is missing, ValueError for a file that is
    not a font, `size` < 1, `limit` < 0 or a non-empty `out`."""
    out = Path(out)
    if size < 1:
        raise ValueError(f"size must be >= 1 pixel, got {size}")
    if limit < 0:
        raise ValueError(f"limit must be >= 0 (0: all emoji), got {limit}")
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} is a file: expected a folder for the emoji")
    found = emoji_code_points(font_path)
    old = sorted(out.iterdir()) if out.is_dir() else []
    if old and not overwrite:
        raise ValueError(f"{out} is not empty ({old[0].name}, ...): pass overwrite (--overwrite) to replace an "
                         f"earlier render, or choose another folder")
    ours = [p for p in old if p.name == METADATA or (p.suffix == ".png" and re.fullmatch(r"\d{4}_[0-9a-f]+", p.stem))]
    others = [p for p in old if p not in ours]
    if others:
        raise ValueError(f"{out} holds files that are not an emoji render ({others[0].name}, ...): they would "
                         f"join the dataset; choose another folder")
    for path in ours:
        path.unlink()
    if limit and limit < len(found):
        found = [found[round(i * len(found) / limit)] for i in range(limit)]
    lines = []
    for i, (cp, caption) in enumerate(found):
        name = f"{i:04d}_{cp:05x}.png"
        img = render_emoji(chr(cp), size, font_path)
        atomic_write(out / name, lambda tmp, img=img: img.save(tmp, format="PNG"))
        lines.append(json.dumps({"file_name": name, "text": caption}))
    atomic_write(out / METADATA, lambda tmp: Path(tmp).write_text("\n".join(lines) + "\n", encoding="utf-8"))
    return len(found)
