"""The Ray engine (``--engine ray``): the job of ``encode_dataset`` as a Ray Data pipeline, for
clusters that grow, shrink and mix machines, where a fixed share per process would leave the job
waiting on its slowest.

The work list (the sources not yet done) is a Ray dataset. Decoding, cutting and resizing run as
CPU tasks, each handing one source on whole as one row: the messages the plain engine's decoding
workers send, frames already resized, uint8. Encoding runs in an actor pool, one actor per GPU or
``actors`` CPU actors where there is none; whichever actor is free takes the next batch, so a fast
one does more. An actor keeps nothing: it returns each clip's latent file and each source's end or
failure (a ``Collector``'s outcomes), and the driver keeps them through the plain engine's store,
so the folder, index, errors and resume are the same whichever engine made them.
"""

from __future__ import annotations

import logging
import os
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ivvae_cli.dataset.decoding import SourceDecoder
from ivvae_cli.dataset.job import _Job, _StopOnSigterm, check_batch
from ivvae_cli.dataset.keeping import Collector, Keeper, Tally
from ivvae_cli.dataset.sources import Source
from ivvae_cli.dataset.spec import JobSpec
from ivvae_cli.dataset.store import merge_index, open_store
from ivvae_cli.errors import InputError
from ivvae_cli.pipeline import MemoryOptions, default_dtype
from ivvae_cli.weights import LoadedModel, load_model

DECODING_CPUS = 0.5


def import_ray() -> Any:
    """Ray, or one line saying how to get it."""
    try:
        import ray
        import ray.data
    except ImportError:
        raise InputError("--engine ray needs Ray Data: pip install 'ivvae-cli[ray]'") from None
    return ray


def encode_with_ray(
    sources: list[Source],
    folder: Path,
    loaded: LoadedModel,
    spec: JobSpec,
    *,
    address: str | None = None,
    actors: int = 1,
    dtype: torch.dtype | None = None,
    memory: MemoryOptions | None = None,
    batch_size: int = 1,
    progress: Callable[[Tally], None] | None = None,
) -> tuple[Tally, dict[str, int] | None]:
    """Encode every source of ``sources`` not yet done into ``folder`` (``prepare_folder`` first) on
    Ray: a local Ray when ``address`` is None, else the cluster it names (``auto``: the one this
    machine belongs to). ``actors``: encoding actors where the cluster has no GPU (else one per
    GPU); ``dtype``: theirs (None: the default on their device). Returns as ``encode_dataset``."""
    ray = import_ray()
    check_batch(spec.options, batch_size)
    tally = Tally(sources=len(sources))
    with open_store(folder, spec) as store:
        done = store.records(sources)
        todo = [(i, source) for i, source in enumerate(sources) if source.name not in done]
        tally.done = len(done)
        tally.skipped = sum(record.skipped is not None for record in done.values())
        keeper = Keeper(sources, store, tally)
        if todo:
            started = not ray.is_initialized()
            if started:
                ray.init(address=address, include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
            try:
                with _StopOnSigterm():
                    for row in _pipeline(ray, todo, loaded, spec, actors, dtype, memory, batch_size).iter_rows():
                        outcomes, model_seconds = pickle.loads(row["outcomes"])
                        for outcome in outcomes:
                            keeper.apply(outcome)
                        tally.model_seconds += model_seconds
                        if progress:
                            progress(tally)
            finally:
                if started:
                    ray.shutdown()
    merged = merge_index(folder, sources) if store.accounted(sources) else None
    return tally, merged


def _pipeline(ray: Any, todo, loaded, spec, actors, dtype, memory, batch_size) -> Any:
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.ERROR)
    gpus = int(ray.cluster_resources().get("GPU", 0))
    threads = max(1, torch.get_num_threads() // actors)
    items = [{"source": pickle.dumps(item)} for item in todo]
    work = ray.data.from_items(items, override_num_blocks=len(items))
    # Half a CPU a decoding task (short clips decode fast), unlike the actors' whole one, also keeps
    # Ray Data from fusing decoding into the actors: it runs beside them, as tasks.
    decoded = work.map(_decode, fn_kwargs={"spec": spec}, num_cpus=DECODING_CPUS)
    setup = _Setup(str(loaded.path), dtype, spec, memory or MemoryOptions(), batch_size, threads)
    return decoded.map_batches(
        _Encoder, fn_constructor_args=(setup,), batch_size=batch_size, concurrency=gpus or actors,
        num_gpus=1 if gpus else 0, num_cpus=1, udf_modifying_row_count=True,
    )  # fmt: skip


def _decode(row: dict[str, Any], spec: JobSpec) -> dict[str, Any]:
    """A CPU task: one source's messages, as the plain engine's decoding workers send them."""
    index, source = pickle.loads(row["source"])
    messages = list(SourceDecoder([], spec.options, None, spec.fingerprint).messages(index, source))
    return {"source": row["source"], "messages": pickle.dumps(messages)}


@dataclass(frozen=True)
class _Setup:
    """What every encoding actor is made with."""

    weights: str
    dtype: torch.dtype | None
    spec: JobSpec
    memory: MemoryOptions
    batch_size: int
    threads: int  # on the CPU


class _Encoder:
    """An actor: the model, loaded once, on its GPU or the CPU; each call encodes a batch of
    sources as the plain engine does and returns what a ``Keeper`` should keep."""

    def __init__(self, setup: _Setup) -> None:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if device.type == "cpu":
            torch.set_num_threads(setup.threads)
        self.loaded = load_model(setup.weights, device=device, dtype=setup.dtype or default_dtype(device))
        self.spec, self.memory, self.batch_size = setup.spec, setup.memory, setup.batch_size

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        sources = dict(pickle.loads(item) for item in batch["source"])
        collector = Collector()
        job = _Job(sources, collector, self.loaded, self.spec, self.memory, 1, self.batch_size)
        with torch.inference_mode():
            for messages in batch["messages"]:
                for message in pickle.loads(messages):
                    job.take(message)
            job.flush()
        outcomes = pickle.dumps((collector.outcomes, collector.tally.model_seconds))
        return {"outcomes": np.array([outcomes], dtype=object), "pid": np.array([os.getpid()])}
