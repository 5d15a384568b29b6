"""The one on-disk format: a dict of tensors and primitives, loadable with `torch.load(weights_only=True)`.

Keys: `format` ("sundae"), `version`, `kind` ("tokenizer" or "generator"), `config` (the model's dataclass
as a dict), `model` and `ema` state dicts, and for resumable training `optimizer`, `step`, `rng`, `train`
(the training config as a dict) and free-form `meta` (for a generator: token grid, tokenizer path,
class names). Writes are atomic: a temporary file beside the target, then a rename.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn

from sundae.data import atomic_write
from sundae.hourglass import Hourglass, HourglassConfig
from sundae.vqgan import VQGAN, VQGANConfig

FORMAT, VERSION = "sundae", 1
C = TypeVar("C")


def config_from_dict(cls: type[C], values: dict[str, Any], source: str = "config") -> C:
    """Build the frozen dataclass `cls` from a dict (lists become tuples). Unknown keys are a ValueError."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(values) - names
    if unknown:
        raise ValueError(f"{source}: unknown {cls.__name__} keys {sorted(unknown)}")
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


def save_checkpoint(path: str | Path, kind: str, config: Any, model: nn.Module | dict[str, Any],
                    **extra: Any) -> None:
    """Write a checkpoint atomically. `config` is the model's dataclass, `model` a module or its state dict;
    `extra` adds keys (ema, step, ...)."""
    state = model if isinstance(model, dict) else model.state_dict()
    payload = {"format": FORMAT, "version": VERSION, "kind": kind, "config": dataclasses.asdict(config),
               "model": state, **extra}
    atomic_write(path, lambda tmp: torch.save(payload, tmp))


def load_checkpoint(path: str | Path, kind: str) -> dict[str, Any]:
    """Read a checkpoint of `kind` with weights_only=True.

    Raises FileNotFoundError, or ValueError naming the file when it is truncated, not a sundae checkpoint,
    or of the other kind.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(f"{path} is not a readable checkpoint (truncated or corrupt?): {err}") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise ValueError(f"{path} is not a sundae checkpoint")
    if ckpt.get("kind") != kind:
        raise ValueError(f"{path} holds a {ckpt.get('kind')}, but a {kind} was expected")
    return ckpt


def _build(ckpt: dict[str, Any], path: Path, cls: type[nn.Module], cfg_cls: type, ema: bool) -> nn.Module:
    model = cls(config_from_dict(cfg_cls, ckpt["config"], str(path)))
    state = ckpt["ema"] if ema and ckpt.get("ema") is not None else ckpt["model"]
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise ValueError(f"{path}: the weights do not match the config: {err}") from None
    return model.eval()


def load_tokenizer(path: str | Path, device: str | torch.device = "cpu", ema: bool = True) -> VQGAN:
    """The VQGAN of a tokenizer checkpoint, EMA weights by default, in eval mode on `device`."""
    return _build(load_checkpoint(path, "tokenizer"), Path(path), VQGAN, VQGANConfig, ema).to(device)


def load_generator(path: str | Path, device: str | torch.device = "cpu",
                   ema: bool = True) -> tuple[Hourglass, dict[str, Any]]:
    """(Hourglass with EMA weights by default, eval mode on `device`; the checkpoint's `meta` dict)."""
    ckpt = load_checkpoint(path, "generator")
    return _build(ckpt, Path(path), Hourglass, HourglassConfig, ema).to(device), ckpt.get("meta", {})
