"""Latent datasets: a video collection in, one latent file per clip and an index out, on as many
processes as there are devices; and a torch ``Dataset`` that reads them back for training.

The work list is the sorted sources (manifest rows, or the videos of a folder or glob), cut into a
fixed number of work units by a hash of each source's name. Process ``rank`` of ``world`` takes
units ``rank, rank + world, ...`` (torchrun's ``RANK``/``WORLD_SIZE``/
``LOCAL_RANK``, else SLURM's ``SLURM_PROCID``/``SLURM_NTASKS``/``SLURM_LOCALID``), so no process
ever waits on another. Every clip is written atomically, and a source is done when its record (the
index rows of its clips) is written, also atomically; a failed source leaves an error record
instead, which a later success removes. So a stopped job resumes where it stopped with any number
of processes, and whichever process finds every source accounted for writes the index.

Decoding, resizing and cropping run in worker processes (a torch ``DataLoader``) that hand the
model uint8 frames a piece at a time, so decoding overlaps the model and memory stays bounded
whatever the videos' lengths.

One module per stage: ``sources`` (the work list), ``clips`` (cutting clips), ``messages`` (what
the decoding workers hand the model), ``decoding`` (the workers), ``spec`` (what a job is),
``store`` and ``shards`` (where outputs go, in either layout), ``job`` (this process's share),
``reading`` (``LatentDataset``).
"""

from ivvae_cli.dataset.clips import ClipOptions, Geometry, clip_name, clip_pieces, parse_buckets
from ivvae_cli.dataset.job import check_batch, clip_seed, encode_dataset
from ivvae_cli.dataset.keeping import Tally
from ivvae_cli.dataset.reading import LatentDataset
from ivvae_cli.dataset.sources import Columns, Source, World, read_sources, work_unit
from ivvae_cli.dataset.spec import DamagedSpecError, JobSpec, Storage, check_folder, prepare_folder, work_units
from ivvae_cli.dataset.store import SourceRecord, Store, merge_index, open_store

__all__ = [
    "ClipOptions",
    "Columns",
    "DamagedSpecError",
    "Geometry",
    "JobSpec",
    "LatentDataset",
    "Source",
    "SourceRecord",
    "Storage",
    "Store",
    "Tally",
    "World",
    "check_batch",
    "check_folder",
    "clip_name",
    "clip_pieces",
    "clip_seed",
    "encode_dataset",
    "merge_index",
    "open_store",
    "parse_buckets",
    "prepare_folder",
    "read_sources",
    "work_unit",
    "work_units",
]  # fmt: skip
