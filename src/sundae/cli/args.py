"""Argument types, `--set key=value` overrides, and the flags several verbs share (sampler flags generated from
`SamplerConfig`). Parsing only: nothing here is needed from Python."""

from __future__ import annotations

import argparse
import dataclasses
import os
from typing import Any, Sequence

import torch

from sundae.sundae import SamplerConfig, guidance_scales
from sundae.train import resolve_device


class UsageError(ValueError):
    """A bad argument: printed as one line, exit status 2."""


def rank() -> int:
    """This process's rank under torchrun (0 otherwise): only rank 0 prints results."""
    return int(os.environ.get("RANK", "0"))


# ---- --set key=value -------------------------------------------------------------------------------

def _parse_value(key: str, text: str, default: Any) -> Any:
    try:
        if isinstance(default, bool):
            if text.lower() not in ("true", "false", "1", "0"):
                raise ValueError
            return text.lower() in ("true", "1")
        if isinstance(default, tuple):  # 1,2,2 or (1, 2, 2) or [1, 2, 2]
            kind = type(default[0]) if default else int
            return tuple(kind(v) for v in text.strip().strip("()[]").split(",") if v.strip())
        return type(default)(text)
    except ValueError:
        example = ",".join(map(str, default)) if isinstance(default, tuple) else repr(default)
        raise UsageError(f"--set {key}={text}: expected a value like {example}") from None


def apply_overrides(pairs: Sequence[str], *configs: Any) -> list[Any]:
    """Apply `key=value` strings to whichever of the frozen dataclass `configs` has the field `key`.

    Raises UsageError for a malformed pair or a key no config has (listing the valid keys).
    """
    configs = list(configs)
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep:
            raise UsageError(f"--set expects key=value, got {pair!r}")
        for i, cfg in enumerate(configs):
            fields = {f.name for f in dataclasses.fields(cfg)}
            if key in fields:
                configs[i] = dataclasses.replace(cfg, **{key: _parse_value(key, text, getattr(cfg, key))})
                break
        else:
            valid = sorted({f.name for cfg in configs for f in dataclasses.fields(cfg)})
            raise UsageError(f"--set {key}: unknown key; valid keys: {', '.join(valid)}")
    return configs


def preset(table: dict, name: str, what: str) -> Any:
    if name not in table:
        raise UsageError(f"unknown {what} preset {name!r}; choose from {', '.join(table)}")
    return table[name]


# ---- argument types --------------------------------------------------------------------------------

def pair(text: str) -> tuple[float, float]:
    """"0.8" -> (0.8, 0.8); "1.0,0.7" -> (1.0, 0.7): a schedule's start and end."""
    try:
        parts = [float(v) for v in text.split(",")]
    except ValueError:
        parts = []
    if len(parts) not in (1, 2):
        raise argparse.ArgumentTypeError(f"expected a number START or START,END, got {text!r}")
    return (parts[0], parts[-1])


def _integer(text: str, low: int, high: int | None, what: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or value < low or (high is not None and value > high):
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
    return value


def positive(text: str) -> int:
    return _integer(text, 1, None, "a positive integer")


def non_negative(text: str) -> int:
    return _integer(text, 0, None, "an integer >= 0")


def port(text: str) -> int:
    return _integer(text, 1, 65535, "a port number in 1..65535")


def pixels(text: str) -> int:
    """"4194304" or "2048x2048" -> a pixel count."""
    height, sep, width = text.lower().partition("x")
    if sep:
        return positive(height) * positive(width)
    return positive(text)


def steps_list(text: str) -> list[int]:
    """"100" -> [100]; "4,8,16" -> [4, 8, 16] (a sweep)."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected a positive integer or a comma-separated list of them, got {text!r}")
    return values


def device(text: str) -> torch.device:
    try:
        value = resolve_device(text)
    except RuntimeError as err:
        raise argparse.ArgumentTypeError(str(err).splitlines()[0]) from None
    if value.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError("CUDA is not available in this torch build or on this machine")
    return value


class _Scale(tuple):
    """A parsed --guidance-scale (start, end) that remembers the text as typed, for error messages."""

    text: str = ""


def guidance_pair(text: str) -> tuple[float, float]:
    scale = _Scale(pair(text))
    scale.text = text
    return scale


def check_guidance(scale: tuple[float, float], conditional: bool, generator: str) -> None:
    """--guidance-scale must be finite and within float32 range, and other than 1 needs a conditional
    generator; raises UsageError otherwise."""
    text = getattr(scale, "text", "") or ",".join(map(str, scale))
    try:
        guidance_scales(tuple(scale), 1, f"--guidance-scale {text}")
    except ValueError as err:
        raise UsageError(str(err)) from None
    if tuple(scale) != (1.0, 1.0) and not conditional:
        raise UsageError(f"--guidance-scale {text}: {generator} is unconditional, there is no condition to guide by "
                         f"(guidance needs a class- or text-conditional generator)")


# ---- flags several verbs share ----------------------------------------------------------------------

def add_debug(p: argparse.ArgumentParser) -> None:
    """--debug after the verb too (SUPPRESS: without it, the top-level parser's value stands)."""
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                   help="show the Python traceback of an error instead of one line")


def add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", type=device, default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    add_debug(p)


def add_overwrite(p: argparse.ArgumentParser) -> None:
    p.add_argument("--overwrite", action="store_true", help="start a new run in an OUT that holds one, deleting "
                   "its checkpoints, log, plot and sample grids (without it, such an OUT is refused)")


def add_strict(p: argparse.ArgumentParser) -> None:
    p.add_argument("--strict", action="store_true", help="stop at the first unreadable or too small image "
                   "file instead of skipping it with a warning")


def add_workers(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workers", type=non_negative, default=0, metavar="N", help="processes that decode and "
                   "resize the image files beside this one (default 0: this process does it); the results are "
                   "the same for every N. About one per free CPU core")


# Every kind `SundaePipeline.from_pretrained` (checkpoint.resolve_checkpoint) takes; tests/test_cli.py loads each.
GENERATOR_HELP = ("the generator: a bundle folder (`sundae export`: config.json + model.safetensors, its tokenizer "
                  "in tokenizer/), an export folder (config.json + model.safetensors), a run folder of `sundae "
                  "train` (its generator.pt), a quickstart output folder (its generator/generator.pt), or a "
                  "checkpoint file (generator.pt, or a run's checkpoints/step_NNNNNNN.pt)")
TOKENIZER_HELP = ("the tokenizer the generator was trained with (checked by sha256), when it is not where the "
                  "generator names it: an export folder, a run folder of `sundae train-vqgan` (its tokenizer.pt), a "
                  "quickstart output folder (its tokenizer/tokenizer.pt), or a checkpoint file (.pt)")

# SamplerConfig field -> (flag type, help). The flags, defaults and metavars come from SamplerConfig itself.
_SAMPLER_FLAGS = {
    "steps": (int, "sampling steps T"),
    "temperature": (pair, "tau or tau_start,tau_end, linear over the steps"),
    "update_proportion": (pair, "p or p_start,p_end: the share of positions updated per step, linear over the steps"),
    "min_steps": (int, "no early stop before this many steps"),
    "update_positions": (str, "which positions take their new draw at a step: random (the paper's) or informed "
                         "(those whose current token the model finds least likely)"),
}


def add_sampler(p: argparse.ArgumentParser, steps_type: Any = None) -> None:
    """The `SamplerConfig` fields as flags (--steps, --temperature, --update-proportion, --min-steps,
    --no-early-stop). Each defaults to None: `sampler_from_args` takes an unset flag from the model's own
    sampler (a bundle's, or the one its run recorded), else from `SamplerConfig()`, whose values the help
    shows. `steps_type` replaces --steps' type (a sweep)."""
    defaults = SamplerConfig()
    for field in dataclasses.fields(SamplerConfig):
        default = getattr(defaults, field.name)
        flag = "--" + field.name.replace("_", "-")
        if field.name == "early_stop":
            p.add_argument("--no-early-stop", dest="early_stop", action="store_false", default=None,
                           help="run every sample for all T steps (default: a sample stops once a step changes "
                           "nothing)")
            continue
        kind, text = _SAMPLER_FLAGS[field.name]
        shown = default[0] if isinstance(default, tuple) and default[0] == default[1] else default
        if field.name == "steps" and steps_type is not None:
            kind, text = steps_type, text + ", or a comma-separated sweep such as 4,8,16,32"
        p.add_argument(flag, type=kind, default=None, help=f"{text} (default: the model's own, else {shown})")


def sampler_from_args(args: argparse.Namespace, steps: int | None = None,
                      base: SamplerConfig | None = None) -> SamplerConfig:
    """The `SamplerConfig` of the sampler flags (`steps` overrides --steps); a flag left unset takes the value
    of `base` (the model's sampler, `SundaePipeline.sampler`), else of `SamplerConfig()`. Its errors as
    UsageError, with the flag's name where the message names a field."""
    base = base or SamplerConfig()
    values = {f.name: getattr(base, f.name) if getattr(args, f.name) is None else getattr(args, f.name)
              for f in dataclasses.fields(SamplerConfig)}
    if steps is not None:
        values["steps"] = steps
    try:
        return SamplerConfig(**values)
    except ValueError as err:
        message = str(err)
        for field in ("min_steps", "early_stop", "update_positions"):
            if message.startswith(field):
                message = "--" + field.replace("_", "-") + message[len(field):]
        raise UsageError(message) from None


def add_guidance(p: argparse.ArgumentParser) -> None:
    p.add_argument("--guidance-scale", type=guidance_pair, default=(1.0, 1.0), metavar="S[,S_END]",
                   help="classifier-free guidance for a conditional generator: logits = uncond + s * (cond - uncond); "
                   "S_END makes s linear from S to S_END over the steps (default 1: no guidance; >1 follows the "
                   "condition more closely, at twice the compute per step)")


def add_precision(p: argparse.ArgumentParser) -> None:
    p.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32",
                   help="bf16 (or fp16, for GPUs without bf16): the network under autocast; logits and sampling "
                   "stay fp32")
    p.add_argument("--compile", action="store_true", help="torch.compile the network (slow first call)")
