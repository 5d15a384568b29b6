"""Render the emoji of Noto Color Emoji into a captioned image folder for `sundae tokenize` / `sundae train`.

    apt-get install fonts-noto-color-emoji
    python examples/render_emoji.py --out emoji --size 32      # ~1,400 PNGs + metadata.jsonl

Captions are the emoji's Unicode names in lower case ("grinning face", "red apple"); see `sundae.emoji`.
"""

import argparse
import sys

from sundae.emoji import FONT, write_emoji_folder

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("--out", default="emoji", help="folder for the PNGs and metadata.jsonl")
parser.add_argument("--size", type=int, default=32, help="image side in pixels (default 32)")
parser.add_argument("--limit", type=int, default=0, help="keep about this many emoji, spread over the font (0: all)")
parser.add_argument("--font", default=str(FONT), help=f"the font file (default {FONT})")
parser.add_argument("--overwrite", action="store_true", help="replace an earlier render in --out")
args = parser.parse_args()
try:
    count = write_emoji_folder(args.out, args.size, args.limit, args.font, args.overwrite)
except (OSError, ValueError) as err:
    print(f"render_emoji.py: error: {err}", file=sys.stderr)
    sys.exit(2)
print(f"{count} captioned emoji written to {args.out}")
