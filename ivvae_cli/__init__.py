"""ivvae: compress video into IV-VAE latents and back.

The library's public names; ``ivvae_cli.cli`` is the command line built on them.
"""

from ivvae_cli.dataset import ClipOptions, LatentDataset, encode_dataset, merge_index, read_sources
from ivvae_cli.latent_file import LatentFile, LatentHeader, read_latent_file, write_latent_file
from ivvae_cli.model import IVVAE, SPATIAL_STRIDE, TEMPORAL_STRIDE, Posterior, VideoSize
from ivvae_cli.pipeline import (
    EncodeOptions,
    MemoryOptions,
    WriteOptions,
    decode_latent,
    encode_video,
    reconstruct_video,
)
from ivvae_cli.stream import StreamDecoder, StreamEncoder, Tiling, decode, decode_clip, encode, encode_clip
from ivvae_cli.version import __version__
from ivvae_cli.weights import LoadedModel, find_weights, load_model

__all__ = [
    "IVVAE",
    "SPATIAL_STRIDE",
    "TEMPORAL_STRIDE",
    "ClipOptions",
    "EncodeOptions",
    "LatentDataset",
    "LatentFile",
    "LatentHeader",
    "LoadedModel",
    "MemoryOptions",
    "Posterior",
    "StreamDecoder",
    "StreamEncoder",
    "Tiling",
    "VideoSize",
    "WriteOptions",
    "__version__",
    "decode",
    "decode_clip",
    "decode_latent",
    "encode",
    "encode_clip",
    "encode_dataset",
    "encode_video",
    "find_weights",
    "load_model",
    "merge_index",
    "read_latent_file",
    "read_sources",
    "reconstruct_video",
    "write_latent_file",
]
