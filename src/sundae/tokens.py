"""The token-folder format (`sundae tokenize`): the writer (`tokenize`, `write_token_folder`) and the reader
(`TokenDataset`).

A token folder holds `tokens.npy` (uint16 `N h w`, read as a memmap), `labels.npy` (int64 `N`) and `meta.json`
(codebook size, grid, f, the tokenizer that produced them); `sources.npy` (`N 2` int64: source image index,
flipped); from a captioned folder also `captions.json` and the text encoder's `text_features.npy` (float16
`N n e`), `text_mask.npy` (bool `N n`) and `text_pooled.npy` (float16 `N e`), computed once so that training
never runs the encoder. A held-out split (`eval_fraction`) is the token folder `eval/` inside it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from sundae.checkpoint import load_tokenizer, resolve_checkpoint
from sundae.data import data_loader
from sundae.distributed import Dist, barrier, gather_to_main, setup
from sundae.io import file_digest, save_npy, write_json
from sundae.vqgan import VQGAN


# The key under which token folders (meta.json) and generator checkpoints (`meta`) written before the codebook
# size had one name store it; readers accept it, writers write `codebook_size`.
LEGACY_CODEBOOK_KEY = "n_codes"


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
        if isinstance(self.meta, dict) and LEGACY_CODEBOOK_KEY in self.meta:  # a folder written before the rename
            if "codebook_size" in self.meta:
                raise ValueError(f"{root / 'meta.json'} has both 'codebook_size' and its old name "
                                 f"{LEGACY_CODEBOOK_KEY!r}: keep one")
            self.meta = {("codebook_size" if k == LEGACY_CODEBOOK_KEY else k): v for k, v in self.meta.items()}
        if not isinstance(self.meta, dict) or not {"grid", "codebook_size"} <= set(self.meta):
            raise ValueError(f"{root / 'meta.json'} must be an object with at least 'grid' and 'codebook_size'")
        grid, codebook_size = self.meta["grid"], self.meta["codebook_size"]
        if not (isinstance(grid, list) and len(grid) == 2 and all(isinstance(v, int) and v > 0 for v in grid)
                and isinstance(codebook_size, int) and codebook_size > 0):
            raise ValueError(f"{root / 'meta.json'}: 'grid' must be two positive integers and 'codebook_size' a "
                             f"positive integer, got grid={grid!r}, codebook_size={codebook_size!r}")
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
        if top >= int(self.meta["codebook_size"]):
            raise ValueError(f"{root}: token id {top} but meta.json says codebook_size={self.meta['codebook_size']}")
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


@torch.no_grad()
def encode_dataset(tokenizer: VQGAN, dataset: torch.utils.data.Dataset, batch_size: int,
                   device: torch.device, desc: str = "tokenize", progress: bool = True,
                   workers: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Encode every image of `dataset`, read in `workers` DataLoader processes (the same batches as 0) ->
    (tokens uint16 `N h w`, labels int64 `N`). Raises ImageError naming a file that cannot be read."""
    loader = data_loader(dataset, workers, device, batch_size=batch_size)
    tokens, labels = [], []
    for x, y in tqdm(loader, desc=desc, dynamic_ncols=True, disable=not progress or None):
        tokens.append(tokenizer.encode(x.to(device, non_blocking=True)).cpu().numpy().astype(np.uint16))
        labels.append(y.numpy().astype(np.int64))
    if not tokens:
        return np.zeros((0, 0, 0), np.uint16), np.zeros(0, np.int64)
    return np.concatenate(tokens), np.concatenate(labels)


class SourceRows(torch.utils.data.Dataset):
    """Items of `dataset` picked by `rows` (`n 2` int64: source index, flipped 0/1), horizontally flipped
    where asked: the paper stores a flipped copy of every training image (augmentation)."""

    def __init__(self, dataset: torch.utils.data.Dataset, rows: np.ndarray):
        self.dataset, self.rows = dataset, rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int):
        x, y = self.dataset[int(self.rows[i, 0])]
        return (x.flip(-1) if self.rows[i, 1] else x), y


def split_rows(n: int, eval_fraction: float, seed: int, flip: bool) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic train/eval split of `n` source images -> (train rows, eval rows), each `m 2` int64
    (source index, flipped), sorted by source index.

    round(eval_fraction * n) images chosen by a permutation seeded with `seed` go to eval; the split is made
    on source images before flipping, so an image and its flipped copy (train only, when `flip`) are always on
    the same side. Raises ValueError unless 0 <= eval_fraction < 1.
    """
    if not 0 <= eval_fraction < 1:
        raise ValueError(f"eval fraction must be in [0, 1), got {eval_fraction}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).numpy()
    held = np.sort(perm[:round(eval_fraction * n)])
    kept = np.setdiff1d(np.arange(n), held)
    train = np.stack([np.repeat(kept, 2), np.tile([0, 1], len(kept))], 1) if flip else \
        np.stack([kept, np.zeros_like(kept)], 1)
    return train.astype(np.int64), np.stack([held, np.zeros_like(held)], 1).astype(np.int64)


def write_token_folder(out: str | Path, tokens: np.ndarray, labels: np.ndarray, meta: dict[str, Any],
                       sources: np.ndarray | None = None, captions: Sequence[str] | None = None,
                       text: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None) -> None:
    """Write `tokens.npy` (uint16 `N h w`), `labels.npy`, `meta.json` and, when given, `sources.npy`
    (`N 2` int64: source image index, flipped), `captions.json` (N strings) and the text encoder's
    `text_features.npy` (float16 `N n e`), `text_mask.npy` (bool `N n`), `text_pooled.npy` (float16 `N e`)
    into `out`, each atomically. Raises OSError naming the file that could not be written (a full disk)."""
    out = Path(out)
    if captions is not None:
        write_json(out / "captions.json", list(captions))
    for name, array in zip(("text_features", "text_mask", "text_pooled"), text or ()):
        save_npy(out / f"{name}.npy", array)
    save_npy(out / "tokens.npy", tokens.astype(np.uint16))
    save_npy(out / "labels.npy", labels.astype(np.int64))
    if sources is not None:
        save_npy(out / "sources.npy", sources.astype(np.int64))
    write_json(out / "meta.json", {**meta, "grid": list(tokens.shape[1:]), "count": len(tokens)})


def _encode_rows(tokenizer: VQGAN, dataset: torch.utils.data.Dataset, rows: np.ndarray, batch_size: int,
                 ctx: Dist, desc: str, workers: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Encode `rows` of `dataset`, a contiguous share per rank, gathered on rank 0 in the original order
    (other ranks get empty arrays). Ranks never wait on each other while encoding, whatever the count."""
    share = np.array_split(np.arange(len(rows)), ctx.world)[ctx.rank]
    part = encode_dataset(tokenizer, SourceRows(dataset, rows[share]), batch_size, ctx.device, desc, ctx.main,
                          workers)
    parts = gather_to_main(part, ctx)
    if parts is None:
        return np.zeros((0, 0, 0), np.uint16), np.zeros(0, np.int64)
    parts = [p for p in parts if len(p[1])]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def tokenize(tokenizer_path: str | Path, dataset: torch.utils.data.Dataset, out: str | Path,
             device: torch.device, batch_size: int = 256, class_names: Sequence[str] = (), flip: bool = False,
             eval_fraction: float = 0.0, split_seed: int = 0, text_encoder: str | None = "all-MiniLM-L6-v2",
             before_write: Callable[[], None] | None = None, workers: int = 0) -> Path:
    """Encode `dataset` with the tokenizer checkpoint into a token folder (see `sundae.tokens`), the images
    read in `workers` DataLoader processes (0: in this one; the files written are the same).

    A captioned dataset (`dataset.captions`, see `sundae.images.read_captions`) also gets `captions.json` and,
    unless `text_encoder` is None, the features of `sundae.text.TextEncoder(text_encoder)` for every row
    (each caption encoded once, on rank 0), so training never runs the encoder.

    `flip` adds a horizontally flipped copy of every training image; `eval_fraction` > 0 holds out that
    share of the images (`split_rows`, unflipped) in the token folder `out/eval`. `sources.npy` says which
    image each row came from. Under torchrun the images are split across ranks and rank 0 writes one folder,
    identical to a single-process run's. `before_write` (if given) is called once the tokenizer and the text
    encoder are loaded and the captions encoded, before any image is encoded (the CLI clears the earlier
    outputs there).
    """
    ctx = setup(device)
    tokenizer_path = resolve_checkpoint(tokenizer_path, "tokenizer")  # a run or quickstart folder: its .pt
    tokenizer = load_tokenizer(tokenizer_path, ctx.device)
    if tokenizer.cfg.codebook_size > 65536:
        raise ValueError(f"{tokenizer_path}: {tokenizer.cfg.codebook_size} codes do not fit the uint16 token file")
    train_rows, eval_rows = split_rows(len(dataset), eval_fraction, split_seed, flip)
    num_classes = int(getattr(dataset, "num_classes", 0))
    image_size = list(dataset[0][0].shape[-2:]) if len(dataset) else None  # pixels, before the tokenizer's padding
    meta = {"codebook_size": tokenizer.cfg.codebook_size, "f": tokenizer.cfg.f,
            "tokenizer": str(Path(tokenizer_path).resolve()),
            "tokenizer_sha256": file_digest(tokenizer_path), "num_classes": num_classes,
            "class_names": list(class_names or getattr(dataset, "classes", []) or []),
            "channels": tokenizer.cfg.in_channels, "image_size": image_size, "flip": flip,
            "eval_fraction": eval_fraction, "split_seed": split_seed}
    captions = getattr(dataset, "captions", None)
    text = None
    if captions is not None and text_encoder and ctx.main:
        from sundae.text import encode_captions, load_text_encoder
        encoder = load_text_encoder(str(text_encoder), str(ctx.device))
        text = encode_captions(encoder, captions)
        meta.update(text_encoder=encoder.name, text_dim=encoder.dim, text_len=int(text[0].shape[1]))
    if before_write is not None:
        before_write()
    for split, rows, folder in (("train", train_rows, Path(out)), ("eval", eval_rows, Path(out) / "eval")):
        if len(rows) == 0:
            continue
        tokens, labels = _encode_rows(tokenizer, dataset, rows, batch_size, ctx, f"tokenize {split}", workers)
        if ctx.main:
            src = rows[:, 0]
            write_token_folder(folder, tokens, labels, {**meta, "split": split}, sources=rows,
                               captions=None if captions is None else [captions[i] for i in src],
                               text=None if text is None else tuple(a[src] for a in text))
    barrier(ctx)
    return Path(out)
