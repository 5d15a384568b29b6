"""The one on-disk format: a dict of tensors and primitives, loadable with `torch.load(weights_only=True)`.

Keys: `format` ("sundae"), `version`, `kind` ("tokenizer" or "generator"), `config` (the model's dataclass
as a dict), `model` and `ema` state dicts, and for resumable training `optimizer` (and `scheduler`,
`scaler`, `disc`, ...), `step`, `data` (batches seen, global batch size, seed), `rng`, `world` (processes
that wrote it), `train` (the training config as a dict) and free-form `meta` (for a generator: token grid,
tokenizer path, class names). Weights are always the unwrapped module's (no DDP/FSDP prefixes), so a
checkpoint written by N processes loads in one. Writes are atomic: a temporary file beside the target, then
a rename.

For sharing, `export` writes a folder with `config.json` (kind, model config, meta) and `model.safetensors`
(the EMA weights); every loader here also accepts such a folder, and a run folder (its last checkpoint).
`export_bundle` writes a generator with its tokenizer and a model card; `resolve_tokenizer` and
`check_pair` find and check the tokenizer a generator was trained with.
"""

from __future__ import annotations

import dataclasses
import json
import pickle
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn

from sundae.hourglass import Hourglass, HourglassConfig
from sundae.io import atomic_write, file_digest, refused_globals, save_torch, write_json
from sundae.sundae import SamplerConfig
from sundae.vqgan import VQGAN, VQGANConfig

FORMAT, VERSION = "sundae", 1
C = TypeVar("C")


# Keys that configs stored before the codebook size had one name use (checkpoints, exports): old -> new.
LEGACY_KEYS: dict[type, dict[str, str]] = {HourglassConfig: {"vocab_size": "codebook_size"},
                                           VQGANConfig: {"n_codes": "codebook_size"}}


def config_from_dict(cls: type[C], values: dict[str, Any], source: str = "config") -> C:
    """Build the frozen dataclass `cls` from a dict (lists become tuples). A stored config may use a field's
    old name (`LEGACY_KEYS`: `vocab_size` of HourglassConfig, `n_codes` of VQGANConfig, both now
    `codebook_size`).

    Raises ValueError naming `source` for unknown keys, a field given under both its old and its new name, or
    values of the wrong type."""
    for old, new in LEGACY_KEYS.get(cls, {}).items():
        if old in values:
            if new in values:
                raise ValueError(f"{source}: {cls.__name__} has both {new!r} and its old name {old!r}: keep one")
            values = {(new if k == old else k): v for k, v in values.items()}
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(values) - names
    if unknown:
        raise ValueError(f"{source}: unknown {cls.__name__} keys {sorted(unknown)}")
    try:
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})
    except TypeError as err:  # a value of the wrong type (a string where a number belongs, ...)
        raise ValueError(f"{source}: invalid {cls.__name__}: {err}") from None


def save_checkpoint(path: str | Path, kind: str, config: Any, model: nn.Module | dict[str, Any],
                    **extra: Any) -> None:
    """Write a checkpoint atomically. `config` is the model's dataclass, `model` a module or its state dict;
    `extra` adds keys (ema, step, ...). Raises OSError "cannot write PATH: ..." (errno ENOSPC for a full disk)
    when the file cannot be written; a checkpoint already at `path` then stays as it was."""
    state = model if isinstance(model, dict) else model.state_dict()
    payload = {"format": FORMAT, "version": VERSION, "kind": kind, "config": dataclasses.asdict(config),
               "model": state, **extra}
    save_torch(path, payload)


def resolve_checkpoint(path: str | Path, kind: str | None) -> Path:
    """The checkpoint file a folder stands for: a run folder -> its `KIND.pt`, a quickstart output folder ->
    its `KIND/KIND.pt`. Files, export folders (config.json) and anything else come back unchanged."""
    path = Path(path)
    if kind is not None and path.is_dir() and not (path / "config.json").is_file():
        for inner in (path / f"{kind}.pt", path / kind / f"{kind}.pt"):
            if inner.is_file():
                return inner
    return path


def load_checkpoint(path: str | Path, kind: str | None) -> dict[str, Any]:
    """Read a checkpoint of `kind` (None: either) with weights_only=True, an `export` folder (which holds
    only `kind`, `config`, `model` and `meta`), or the checkpoint of a run or quickstart folder
    (`resolve_checkpoint`).

    Raises FileNotFoundError, or ValueError naming the file when it is truncated, not a sundae checkpoint,
    or of the other kind.
    """
    path = resolve_checkpoint(path, kind)
    if path.is_dir():
        return _load_export(path, kind)  # names the missing file of an export folder
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        # torch's own text suggests weights_only=False (running the file's pickled code): never repeat that.
        refused = refused_globals(path, err) if isinstance(err, pickle.UnpicklingError) else []
        if refused or "Unsupported global" in str(err):
            raise ValueError(f"{path}: refused: it holds pickled objects beyond tensors and plain data "
                             f"({', '.join(refused) or 'unnamed'}), and loading those could run code: it is not "
                             f"a sundae checkpoint") from None
        raise ValueError(f"{path} is not a readable checkpoint (truncated, corrupt or not a checkpoint file)") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise ValueError(f"{path} is not a sundae checkpoint")
    if ckpt.get("kind") != kind and (kind is not None or ckpt.get("kind") not in ("tokenizer", "generator")):
        raise ValueError(f"{path} holds a {ckpt.get('kind')}, but a {kind or 'tokenizer or generator'} was expected")
    return ckpt


def _build(ckpt: dict[str, Any], path: Path, cls: type[nn.Module], cfg_cls: type, ema: bool) -> nn.Module:
    if not isinstance(ckpt.get("config"), dict) or not isinstance(ckpt.get("model"), dict):
        raise ValueError(f"{path} lacks a 'config' or 'model' entry: not a complete sundae checkpoint")
    model = cls(config_from_dict(cfg_cls, ckpt["config"], str(path)))
    state = ckpt["ema"] if ema and ckpt.get("ema") is not None else ckpt["model"]
    bad = [k for k, v in state.items() if isinstance(v, torch.Tensor) and v.is_floating_point()
           and not torch.isfinite(v).all()]
    if bad:  # a run that diverged: sampling from it would draw pictures from NaN logits without a word
        which = "EMA weights" if state is ckpt.get("ema") else "weights"
        raise ValueError(f"{path}: the {which} hold NaN or infinite values ({', '.join(bad[:3])}"
                         f"{f' and {len(bad) - 3} more' if len(bad) > 3 else ''}): the run diverged; use an "
                         f"earlier checkpoint from its checkpoints/ folder")
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


def export(path: str | Path, out: str | Path, ema: bool = True, extra: dict[str, Any] | None = None) -> Path:
    """Write the model of checkpoint `path` (EMA weights by default) to the folder `out` as `config.json`
    (format, version, kind, model config, meta, source file and its sha256, and the `extra` keys) and
    `model.safetensors`, each atomically. Returns `out`. Raises what `load_checkpoint` raises, and OSError naming
    the file that could not be written (errno ENOSPC for a full disk).
    """
    import hashlib

    from safetensors.torch import save_file

    path, out = Path(path), Path(out)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist (export reads a .pt checkpoint)")
    ckpt = load_checkpoint(path, None)
    state = ckpt["ema"] if ema and ckpt.get("ema") is not None else ckpt["model"]
    tensors = {k: v.contiguous().clone() for k, v in state.items()}  # safetensors refuses shared storage
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    atomic_write(out / "model.safetensors", lambda tmp: save_file(tensors, tmp, metadata={"format": FORMAT}))
    write_json(out / "config.json", {"format": FORMAT, "version": VERSION, "kind": ckpt["kind"],
                                     "config": ckpt["config"], "meta": ckpt.get("meta", {}),
                                     "weights": "ema" if state is ckpt.get("ema") else "model",
                                     "source": str(path.resolve()), "source_sha256": digest, **(extra or {})})
    return out


def _load_export(path: Path, kind: str) -> dict[str, Any]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    for name in ("config.json", "model.safetensors"):
        if not (path / name).is_file():
            other = [p.name for p in (path / "tokenizer.pt", path / "generator.pt") if p.is_file()]
            if kind is not None and other:
                raise ValueError(f"{path} holds a {other[0]}, but a {kind} was expected")
            raise FileNotFoundError(f"{path / name} is missing: an exported model folder holds config.json and "
                                    f"model.safetensors (`sundae export`), a run folder its {kind or 'model'}.pt")
    try:
        info = json.loads((path / "config.json").read_text())
        state = load_file(path / "model.safetensors")
    except (json.JSONDecodeError, SafetensorError, OSError) as err:
        raise ValueError(f"{path} is not a readable exported model: {err}") from None
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        raise ValueError(f"{path / 'config.json'} is not a sundae export")
    if kind is not None and info.get("kind") != kind:
        raise ValueError(f"{path} holds a {info.get('kind')}, but a {kind} was expected")
    return {"format": FORMAT, "kind": info.get("kind"), "config": info["config"], "model": state,
            "meta": info.get("meta", {})}


# ---- a generator's tokenizer, and bundles --------------------------------------------------------


def stored_sampler(info: dict[str, Any]) -> SamplerConfig | None:
    """The sampler a bundle's config.json or a checkpoint's meta recommends (key "sampler": the fields of
    `SamplerConfig`), or None. Raises ValueError for settings `SamplerConfig` refuses."""
    stored = info.get("sampler")
    return SamplerConfig(**stored) if isinstance(stored, dict) else None


def bundle_info(path: str | Path) -> dict[str, Any]:
    """The `config.json` of an export or bundle folder as a dict ({} for anything else: a checkpoint file, a
    run folder, or an unreadable file, which the loaders then name)."""
    try:
        info = json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}


def export_bundle(generator: str | Path, out: str | Path, tokenizer: str | Path | None = None, ema: bool = True,
                  sampler: SamplerConfig | None = None) -> Path:
    """Write a generator and the tokenizer it was trained with into one folder that works wherever it is
    moved or copied: `out/config.json` + `out/model.safetensors` (the generator, `sundae.checkpoint.export`),
    `out/tokenizer/config.json` + `out/tokenizer/model.safetensors`, each component in the
    `config.json` + `model.safetensors` layout of huggingface_hub's `PyTorchModelHubMixin`; the generator's
    config.json names its tokenizer by the relative path "tokenizer" (key "bundle") and holds the default
    `sampler` settings; `out/README.md` is a model card (training data, steps, sampler, metrics if a
    `metrics.json` or `evaluation.json` lies beside the run).

    `generator`: a run folder, a checkpoint or a quickstart folder; `tokenizer`: default the one the
    generator was trained with (`resolve_tokenizer`); `sampler`: default the one its checkpoint recommends
    (`stored_sampler`), else `SamplerConfig()`. EMA weights by default. Returns `out`.
    Raises FileNotFoundError or ValueError as `SundaePipeline.from_pretrained` does.
    """
    source = resolve_checkpoint(generator, "generator")
    if not source.is_file():
        raise FileNotFoundError(f"{generator}: expected a generator checkpoint (.pt) or its run folder (an export "
                                f"or bundle is already shareable: copy it)")
    net, meta = load_generator(source)
    tokenizer_path = resolve_tokenizer(source, meta, tokenizer)
    check_pair(net, meta, load_tokenizer(tokenizer_path), source, tokenizer_path)
    if Path(tokenizer_path).is_dir():
        raise ValueError(f"{tokenizer_path} is an exported folder: pass the tokenizer's .pt checkpoint to bundle it")
    out = Path(out)
    sampler = sampler or stored_sampler(meta) or SamplerConfig()
    export(tokenizer_path, out / "tokenizer", ema=ema)
    export(source, out, ema=ema, extra={"bundle": {"tokenizer": "tokenizer"},
                                        "sampler": dataclasses.asdict(sampler)})
    ckpt_step = load_checkpoint(source, "generator").get("step")
    atomic_write(out / "README.md", lambda tmp: Path(tmp).write_text(
        _model_card(net, meta, sampler, ckpt_step, _run_metrics(source))))
    return out


def _run_metrics(checkpoint: Path) -> dict[str, float]:
    """Numbers measured on a run, if its folder or the quickstart folder above it holds them (metrics.json of
    `sundae quickstart`, evaluation.json of `sundae evaluate`): flat `name: value` pairs."""
    found: dict[str, float] = {}
    for folder in (checkpoint.parent, checkpoint.parent.parent):
        for name in ("metrics.json", "evaluation.json"):
            try:
                data = json.loads((folder / name).read_text())
            except (OSError, ValueError):
                continue
            for key, value in data.items() if isinstance(data, dict) else ():
                inner = value.items() if isinstance(value, dict) else [("", value)]
                for sub, number in inner:
                    if isinstance(number, (int, float)) and not isinstance(number, bool):
                        found[f"{key}.{sub}" if sub else key] = number
    return found


def _model_card(net: Hourglass, meta: dict[str, Any], sampler: SamplerConfig, step: int | None,
                metrics: dict[str, float]) -> str:
    cfg = net.cfg
    params = sum(p.numel() for p in net.parameters()) / 1e6
    condition = (f"class-conditional ({cfg.num_classes} classes: {', '.join(meta.get('class_names') or [])})"
                 if cfg.num_classes else f"text-conditional ({meta.get('text_encoder')})" if cfg.text_dim
                 else "unconditional")
    size = meta.get("image_size") or [g * int(meta.get("f") or 1) for g in meta.get("grid", [])]
    lines = ["# SUNDAE image generator", "",
             "A Step-Unrolled Denoising Autoencoder (SUNDAE) over VQ-GAN tokens with a 2D hourglass transformer "
             "(McKinney & Willcocks, arXiv 2206.12351), made with `sundae`.", "",
             "```python", "from sundae import SundaePipeline",
             'pipe = SundaePipeline.from_pretrained("THIS_FOLDER")',
             "images = pipe(num=8, seed=0).images   # PIL images", "```", "",
             "## Model", "",
             f"- generator: {params:.1f}M parameters, {condition}, codebook of {cfg.codebook_size} codes, "
             f"token grid {'x'.join(map(str, meta.get('grid', [])))}, images {'x'.join(map(str, size))} pixels",
             f"- trained for {step} steps" if step is not None else "- training steps: unknown",
             f"- tokenizer: `tokenizer/` (sha256 of its source checkpoint {meta.get('tokenizer_sha256', 'unknown')})",
             "", "## Sampler defaults", "",
             f"steps {sampler.steps}, temperature {sampler.temperature[0]} -> {sampler.temperature[1]}, update "
             f"proportion {sampler.update_proportion[0]} -> {sampler.update_proportion[1]}, min steps "
             f"{sampler.min_steps}, early stop {'on' if sampler.early_stop else 'off'}", "",
             "## Metrics", ""]
    lines += [f"- {k}: {v:.4g}" for k, v in metrics.items()] or ["Not measured (see `sundae evaluate`)."]
    return "\n".join(lines) + "\n"


def resolve_tokenizer(generator: str | Path, meta: dict[str, Any], tokenizer: str | Path | None = None) -> Path:
    """The tokenizer a generator was trained with. `tokenizer`, when given, is used as is (and checked by
    `check_pair`). Otherwise, in order: the tokenizer folder a bundle names (`config.json`'s "bundle"), the
    path recorded at training time, then the same file found relative to the generator (the run folder moved
    or copied along with its tokenizer: the recorded relative path, or the `tokenizer/` run folder beside
    the generator's as a quickstart lays them out), accepted only if its sha256 is the recorded one.
    Raises ValueError when the generator names none or none of these exists."""
    if tokenizer is not None:
        return resolve_checkpoint(tokenizer, "tokenizer")
    generator = Path(generator)
    bundled = bundle_info(generator).get("bundle", {}).get("tokenizer")
    if bundled:
        return generator / bundled
    recorded = meta.get("tokenizer")
    if not recorded:
        raise ValueError(f"{generator} names no tokenizer: pass --tokenizer")
    if Path(recorded).exists():
        return Path(recorded)
    here = generator if generator.is_dir() else generator.parent
    candidates = [here / meta["tokenizer_relpath"]] if meta.get("tokenizer_relpath") else []
    candidates += [here.parent / "tokenizer" / "tokenizer.pt", here / "tokenizer.pt"]
    digest = meta.get("tokenizer_sha256")
    for candidate in candidates:
        if candidate.is_file() and digest and file_digest(candidate) == digest:
            return candidate
    raise ValueError(f"the tokenizer {generator} was trained with, {recorded}, does not exist (moved?): "
                     f"pass --tokenizer PATH")


def check_pair(net: Hourglass, meta: dict[str, Any], tokenizer: VQGAN, generator: str | Path,
               tokenizer_path: str | Path) -> None:
    """Raise ValueError unless `tokenizer` (read from `tokenizer_path`) is the one the generator was trained
    with: the sha256 recorded at training time, and the codebook size."""
    digest = meta.get("tokenizer_sha256")
    if digest and file_digest(tokenizer_path) != digest:
        raise ValueError(f"{tokenizer_path} is not the tokenizer {generator} was trained with (its sha256 "
                         f"differs from the one recorded at training time)")
    if tokenizer.cfg.codebook_size != net.cfg.codebook_size:
        raise ValueError(f"tokenizer {tokenizer_path} has {tokenizer.cfg.codebook_size} codes, "
                         f"generator {generator} expects {net.cfg.codebook_size}")
