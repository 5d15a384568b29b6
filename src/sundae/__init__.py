"""sundae: Step-Unrolled Denoising Autoencoders over VQ-GAN tokens with a 2D hourglass transformer.

The public API; everything else is importable from its module (see docs/layout.md):

    from sundae import SundaePipeline
    pipe = SundaePipeline.from_pretrained("quickstart")    # a bundle, export, run folder or .pt checkpoint
    images = pipe(num=8, seed=0).images                     # PIL images
"""

from __future__ import annotations

import importlib
import importlib.metadata
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the same names as _PUBLIC, for type checkers and readers
    from sundae.hourglass import PRESETS as HOURGLASS_PRESETS
    from sundae.hourglass import Hourglass, HourglassConfig
    from sundae.pipeline import SundaeOutput, SundaePipeline
    from sundae.sundae import SAMPLER_PRESETS, SamplerConfig, corrupt, sample, unrolled_loss
    from sundae.vqgan import PRESETS as VQGAN_PRESETS
    from sundae.vqgan import VQGAN, VQGANConfig


def _package_version(root: Path = Path(__file__).resolve().parents[2]) -> str:
    """The installed distribution's version (importlib.metadata); in a source checkout that is not installed,
    the `version` of the checkout's pyproject.toml at `root`; "unknown" without either."""
    try:
        return importlib.metadata.version("sundae")
    except importlib.metadata.PackageNotFoundError:
        pass
    try:
        found = re.search(r'^version\s*=\s*"([^"]+)"', (root / "pyproject.toml").read_text(), flags=re.M)
    except OSError:
        found = None
    return found.group(1) if found else "unknown"


__version__ = _package_version()

# Imported on first use (PEP 562), so that importing `sundae.cli` does not load torch before the command line
# has made its OpenMP settings (`sundae.cli.openmp`): the runtime reads them once, when torch loads it.
# Public name -> (module, name there).
_PUBLIC = {
    "SundaePipeline": ("sundae.pipeline", "SundaePipeline"), "SundaeOutput": ("sundae.pipeline", "SundaeOutput"),
    "SamplerConfig": ("sundae.sundae", "SamplerConfig"), "SAMPLER_PRESETS": ("sundae.sundae", "SAMPLER_PRESETS"),
    "VQGAN": ("sundae.vqgan", "VQGAN"), "VQGANConfig": ("sundae.vqgan", "VQGANConfig"),
    "VQGAN_PRESETS": ("sundae.vqgan", "PRESETS"), "Hourglass": ("sundae.hourglass", "Hourglass"),
    "HourglassConfig": ("sundae.hourglass", "HourglassConfig"), "HOURGLASS_PRESETS": ("sundae.hourglass", "PRESETS"),
    "sample": ("sundae.sundae", "sample"), "unrolled_loss": ("sundae.sundae", "unrolled_loss"),
    "corrupt": ("sundae.sundae", "corrupt"),
}
__all__ = list(_PUBLIC)


def __getattr__(name: str) -> Any:
    if name not in _PUBLIC:
        raise AttributeError(f"module 'sundae' has no attribute {name!r}")
    module, attribute = _PUBLIC[name]
    value = getattr(importlib.import_module(module), attribute)
    globals()[name] = value  # later lookups find it without this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_PUBLIC})
