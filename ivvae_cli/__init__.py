"""ivvae: compress video into IV-VAE latents and back."""

__version__ = "0.1.0"
