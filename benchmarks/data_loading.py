"""Images per second read from a folder of real photos with 0, 2 and 4 DataLoader workers (`--workers N`).

What `sundae tokenize`, `train-vqgan`, `reconstruct` and `evaluate` do with an image folder, timed in two
parts: the scan (`ImageFolder` decodes every file once to skip unusable ones) and the pass (each image decoded
again, resized on its shorter side (bicubic) and centre-cropped to `--size`, in batches of 16 from
`sundae.data.data_loader`). The folder is made first from the colour photos that ship with scikit-image
(`skimage.data`: astronaut, chelsea, coffee, rocket, hubble_deep_field, immunohistochemistry, retina), each
resized (bicubic) to 1024 on its shorter side and centre-cropped to 1024x1024, saved alternately as JPEG
(quality 95) and PNG, repeated to `--count` files. Upscaled photos are smoother than real 1024x1024 photos,
so they decode somewhat faster. The files are in the page cache (just written): this measures decoding and
resizing, not the disk.

    pip install -e ".[bench]"        # scikit-image
    python benchmarks/data_loading.py                      # 200 files, 256 pixels, 0,2,4 workers
    python benchmarks/data_loading.py --count 50 --workers 0,2

Workers are processes, so they cannot go faster than the free cores allow: on a 2-core machine 4 workers
only add processes competing for the same 2 cores. The load average before and after each measurement is
recorded, since other processes on the machine change the figures, and so are the CPU seconds of the main
process and its workers per image (the work done, whatever share of the cores it got). Prints a table and writes
benchmarks/results/data_loading.json.
"""

from __future__ import annotations

import argparse
import gc
import os
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import PIL
import torch
from PIL import Image

from common import RESULTS, environment, print_table, write_json
from sundae.data import ImageFolder, data_loader

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry", "retina")
SIDE = 1024


def make_folder(root: Path, count: int) -> dict[str, int]:
    """`count` photo files of SIDE x SIDE pixels in `root`; returns how many of each format."""
    import skimage.data

    photos = []
    for name in PHOTOS:
        img = Image.fromarray(getattr(skimage.data, name)()[..., :3])
        scale = SIDE / min(img.size)
        img = img.resize((max(SIDE, round(img.width * scale)), max(SIDE, round(img.height * scale))),
                         Image.Resampling.BICUBIC)
        left, top = (img.width - SIDE) // 2, (img.height - SIDE) // 2
        photos.append(img.crop((left, top, left + SIDE, top + SIDE)))
    formats = {"jpeg": 0, "png": 0}
    for i in range(count):
        kind = "jpeg" if i % 2 == 0 else "png"
        path = root / f"{i:05d}_{PHOTOS[i % len(PHOTOS)]}.{'jpg' if kind == 'jpeg' else 'png'}"
        photos[i % len(PHOTOS)].save(path, **({"quality": 95} if kind == "jpeg" else {}))
        formats[kind] += 1
    return formats


def _cpu_seconds() -> float:
    """User + system CPU seconds of this process and of its children that have ended (the workers)."""
    return sum(r.ru_utime + r.ru_stime for r in (resource.getrusage(resource.RUSAGE_SELF),
                                                   resource.getrusage(resource.RUSAGE_CHILDREN)))


def measure(folder: Path, size: int, workers: int, batch_size: int) -> dict[str, float]:
    """Seconds of the scan and of one pass over the folder with `workers`, the CPU seconds of all processes,
    and the load around them."""
    load_before = os.getloadavg()[0]
    cpu0 = _cpu_seconds()
    t0 = time.perf_counter()
    dataset = ImageFolder(folder, size, 3, workers=workers)
    t1 = time.perf_counter()
    count = 0
    for x, _ in data_loader(dataset, workers, batch_size=batch_size):
        count += len(x)
    t2 = time.perf_counter()
    gc.collect()  # the loaders are gone and their workers joined: their CPU time is counted
    cpu = _cpu_seconds() - cpu0
    assert count == len(dataset) and tuple(x.shape[1:]) == (3, size, size)
    n = len(dataset)
    return {"workers": workers, "images": n, "scan_s": t1 - t0, "pass_s": t2 - t1,
            "scan_images_per_s": n / (t1 - t0), "pass_images_per_s": n / (t2 - t1),
            "images_per_s": n / (t2 - t0), "ms_per_image": 1000 * (t2 - t0) / n,
            "cpu_ms_per_image": 1000 * cpu / n,
            "load_1min_before": load_before, "load_1min_after": os.getloadavg()[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=200, help="photo files in the folder (default 200)")
    parser.add_argument("--size", type=int, default=256, help="pixels of the crop (default 256: ffhq256)")
    parser.add_argument("--workers", default="0,2,4", help="worker counts to measure (default 0,2,4)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--folder", type=Path, help="make the photo folder here and keep it (default: a "
                        "temporary folder, deleted at the end)")
    parser.add_argument("--out", type=Path, default=RESULTS / "data_loading.json")
    args = parser.parse_args()
    counts = [int(w) for w in args.workers.split(",")]

    with tempfile.TemporaryDirectory() as tmp:
        folder = args.folder or Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        formats = make_folder(folder, args.count)
        megabytes = sum(p.stat().st_size for p in folder.iterdir()) / 2**20
        print(f"{args.count} photos of {SIDE}x{SIDE} ({formats['jpeg']} JPEG, {formats['png']} PNG, "
              f"{megabytes:.0f} MiB) -> {args.size}x{args.size}; {len(os.sched_getaffinity(0))} cores usable, "
              f"load average {os.getloadavg()[0]:.1f}", flush=True)
        rows = []
        for workers in counts:
            rows.append(measure(folder, args.size, workers, args.batch_size))
            print(f"workers {workers}: {rows[-1]['images_per_s']:.1f} images/s", flush=True)
    base = rows[0]["images_per_s"]
    for row in rows:
        row["speedup"] = row["images_per_s"] / base
    print_table(rows, [("workers", "workers", "d"), ("scan_images_per_s", "scan img/s", ".1f"),
                       ("pass_images_per_s", "pass img/s", ".1f"), ("images_per_s", "total img/s", ".1f"),
                       ("ms_per_image", "ms/img", ".0f"), ("cpu_ms_per_image", "CPU ms/img", ".0f"),
                       ("speedup", f"vs {counts[0]}", ".2f"),
                       ("load_1min_before", "load before", ".1f"), ("load_1min_after", "load after", ".1f")])
    write_json(args.out, {
        "what": "ImageFolder scan + one pass of sundae.data.data_loader over a folder of real photos",
        "folder": {"files": args.count, "side": SIDE, "formats": formats, "mebibytes": megabytes,
                   "photos": list(PHOTOS), "source": "skimage.data, resized bicubic and centre-cropped"},
        "crop": args.size, "batch_size": args.batch_size, "rows": rows,
        "machine": {**environment(torch.device("cpu")), "usable_cores": len(os.sched_getaffinity(0)),
                    "pillow": PIL.__version__, "numpy": np.__version__},
    })


if __name__ == "__main__":
    main()
