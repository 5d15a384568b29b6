"""sundae: Step-Unrolled Denoising Autoencoders over VQ-GAN tokens with a 2D hourglass transformer.

The public API; everything else is importable from its module (see docs/layout.md):

    from sundae import SundaePipeline
    pipe = SundaePipeline.from_pretrained("quickstart")    # a bundle, export, run folder or .pt checkpoint
    images = pipe(num=8, seed=0).images                     # PIL images
"""

from sundae.hourglass import PRESETS as HOURGLASS_PRESETS
from sundae.hourglass import Hourglass, HourglassConfig
from sundae.pipeline import SundaeOutput, SundaePipeline
from sundae.sundae import SAMPLER_PRESETS, SamplerConfig, corrupt, sample, unrolled_loss
from sundae.vqgan import PRESETS as VQGAN_PRESETS
from sundae.vqgan import VQGAN, VQGANConfig

__version__ = "0.1.0"
__all__ = ["SundaePipeline", "SundaeOutput", "SamplerConfig", "SAMPLER_PRESETS", "VQGAN", "VQGANConfig",
           "VQGAN_PRESETS", "Hourglass", "HourglassConfig", "HOURGLASS_PRESETS", "sample", "unrolled_loss", "corrupt"]
