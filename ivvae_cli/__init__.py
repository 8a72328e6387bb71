"""ivvae: compress video into IV-VAE latents and back.

The library's public names; ``ivvae_cli.cli`` is the command line built on them. The file-level
jobs (``ivvae_cli.pipeline``, ``ivvae_cli.dataset``) are imported when first named: they need PyAV,
and the model and training from a frame cache do not.
"""

from importlib import import_module
from typing import Any

from ivvae_cli.latent_file import LatentFile, LatentHeader, read_latent_file, write_latent_file
from ivvae_cli.model import IVVAE, SPATIAL_STRIDE, TEMPORAL_STRIDE, Posterior, VideoSize
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
    "decode_tensor",
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

_LAZY = dict.fromkeys(
    (
        "EncodeOptions",
        "MemoryOptions",
        "WriteOptions",
        "decode_latent",
        "decode_tensor",
        "encode_video",
        "reconstruct_video",
    ),
    "pipeline",
) | dict.fromkeys(("ClipOptions", "LatentDataset", "encode_dataset", "merge_index", "read_sources"), "dataset")


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(f"ivvae_cli.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'ivvae_cli' has no attribute '{name}'")
