"""sundae: Step-Unrolled Denoising Autoencoders over VQ-GAN tokens with a 2D hourglass transformer."""

__version__ = "0.1.0"
