"""The version of ivvae, read by the package build and written into every latent file."""

__version__ = "0.1.0"
