"""The local pipeline: cover -> packs -> in-process queue -> worker threads -> store.

Each worker thread processes packs as :func:`chipscale.pipeline.process.process_pack` does,
reading its next pack while it predicts one (:mod:`chipscale.pipeline.read_ahead`). A run
resumes (it skips tiles its job already has ``ok`` or ``empty``), and Ctrl-C drops the packs
not yet started while the running ones finish their write. Figures: docs/design.md, "The local
pipeline".
"""

from __future__ import annotations

import functools
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from mercantile import Tile

from chipscale.errors import ChipscaleError, TransientError
from chipscale.grid.packs import DEFAULT_MAX_TILES, pack_tiles
from chipscale.models.predictors import Predictor
from chipscale.pipeline.messages import AssetRef, PackMessage
from chipscale.pipeline.process import PackOutcome, ReadPack, process_read, read_pack
from chipscale.pipeline.queues import LocalQueue
from chipscale.pipeline.read_ahead import read_ahead
from chipscale.results import ResultStore
from chipscale.values import JobInfo

log = logging.getLogger(__name__)

#: Worker threads: two let one read while the other predicts; more only add contention.
DEFAULT_WORKERS = 2

#: Backoff between attempts at a pack that failed transiently (model or store outage).
RETRY_DELAYS = (0.5, 1.0, 2.0, 4.0, 8.0)


def default_model_threads() -> int:
    """Torch threads for the in-process model: every core but one, which reads tiles.

    On the 2-core dev machine, one torch thread beside a reading thread ran the pipeline at
    0.92 of its slower stage; torch on both cores fought GDAL for them and reached 0.48
    (bench/pipeline.py).
    """
    return max(1, (os.cpu_count() or 2) - 1)


class RunError(ChipscaleError):
    """The run stopped before every tile was done (the store keeps what was)."""


@dataclass
class RunSummary:
    """Counts of one run; ``skipped`` were already done by an earlier run of the job."""

    job: str
    total: int
    skipped: int = 0
    ok: int = 0
    empty: int = 0
    error: int = 0
    seconds: float = 0.0
    read_seconds: float = 0.0
    predict_seconds: float = 0.0
    write_seconds: float = 0.0
    interrupted: bool = False
    failures: list[str] = field(default_factory=list)

    @property
    def processed(self) -> int:
        return self.ok + self.empty + self.error

    @property
    def tiles_per_second(self) -> float:
        return self.processed / self.seconds if self.seconds > 0 else 0.0

    def add(self, outcome: PackOutcome) -> None:
        self.ok += outcome.ok
        self.empty += outcome.empty
        self.error += outcome.error
        self.read_seconds += outcome.read_seconds
        self.predict_seconds += outcome.predict_seconds
        self.write_seconds += outcome.write_seconds


ProgressCallback = Callable[[int], None]


def run_local(
    *,
    job: str,
    source: str,
    tiles: Iterable[Tile],
    predictor: Predictor,
    store: ResultStore,
    zoom: int | None = None,
    bands: Sequence[int] | None = None,
    workers: int = DEFAULT_WORKERS,
    max_tiles: int = DEFAULT_MAX_TILES,
    on_start: Callable[[int, int], None] | None = None,
    on_progress: ProgressCallback | None = None,
    ahead: bool = True,
    extra: dict[str, Any] | None = None,
    pack_assets: Callable[[tuple[Tile, ...]], tuple[AssetRef, ...]] | None = None,
) -> RunSummary:
    """Process every tile of ``tiles`` not already done for ``job``; return the counts.

    ``on_start(todo, skipped)`` is called once the work is known, ``on_progress(n)`` after
    each pack with its tile count: the CLI draws its progress bar from them. Each worker
    reads its next pack while it predicts one (``ahead``; False: one after the other, as
    bench/pipeline.py compares). ``extra`` is recorded with the job (a mosaic's frozen asset
    list); ``pack_assets`` gives a mosaic pack's candidate assets, which its message carries.
    """
    info = predictor.info
    all_tiles = list(dict.fromkeys(tiles))
    # Recorded first, atomically: a job of another source or model is refused before any
    # work, even when another run is creating it at this moment (JobConflict).
    store.start_job(
        JobInfo(
            job=job,
            source=source,
            zoom=zoom,
            model_name=info.name,
            model_version=info.version,
            tiles_total=len(all_tiles),
            classes=info.classes,
            extra=dict(extra or {}),
        )
    )
    done = store.done_tiles(job)
    todo = [t for t in all_tiles if t not in done]
    summary = RunSummary(job=job, total=len(all_tiles), skipped=len(all_tiles) - len(todo))
    if on_start:
        on_start(len(todo), summary.skipped)
    if not todo:
        return summary

    work = LocalQueue(maxsize=max(2, workers * 2))
    lock = threading.Lock()
    stop = threading.Event()

    def read(message: PackMessage) -> ReadPack | None:
        return None if stop.is_set() else read_pack(message, info, bands=bands)

    def consume() -> None:
        stream = (
            read_ahead(work.messages(), read)
            if ahead
            else ((m, functools.partial(read, m)) for m in work.messages())
        )
        for message, first_read in stream:
            if stop.is_set():
                continue
            try:
                outcome = _with_retries(message, first_read, predictor, store, bands, stop)
            except Exception as exc:  # reported, and the run stops
                log.debug("pack failed", exc_info=True)
                with lock:
                    summary.failures.append(f"{type(exc).__name__}: {exc}")
                stop.set()
                continue
            with lock:
                summary.add(outcome)
            if on_progress:
                on_progress(outcome.tiles)

    threads = [
        threading.Thread(target=consume, name=f"worker-{i}", daemon=True)
        for i in range(max(1, workers))
    ]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    try:
        for pack in pack_tiles(todo, max_tiles, presorted=False):
            assets = pack_assets(pack) if pack_assets is not None else ()
            message = PackMessage(job=job, source=source, tiles=pack, assets=assets)
            while not work.send(message):
                if stop.is_set():
                    break
            if stop.is_set():
                break
        work.close()
        _join(threads)
    except KeyboardInterrupt:
        summary.interrupted = True
        stop.set()
        work.close(discard=True)
        _join(threads)
    summary.seconds = time.perf_counter() - started
    if summary.failures:
        left = len(todo) - summary.processed
        raise RunError(
            f"run of job {job!r} stopped with {left} tiles left ({summary.failures[0]}); "
            "re-run the same command to resume"
        )
    return summary


def _join(threads: list[threading.Thread]) -> None:
    for thread in threads:
        while thread.is_alive():
            thread.join(timeout=0.2)


def _with_retries(
    message: PackMessage,
    first_read: Callable[[], ReadPack | None],
    predictor: Predictor,
    store: ResultStore,
    bands: Sequence[int] | None,
    stop: threading.Event,
) -> PackOutcome:
    """What SQS redelivery does in the cloud: try a transiently failing pack again, its
    first attempt on ``first_read`` (read ahead, or read now), the others read again."""
    attempt = 0
    while True:
        try:
            read = first_read() if attempt == 0 else None
            if read is None:
                read = read_pack(message, predictor.info, bands=bands)
            return process_read(read, predictor=predictor, store=store)
        except TransientError as exc:
            if attempt == len(RETRY_DELAYS) or stop.is_set():
                raise
            delay = RETRY_DELAYS[attempt]
            attempt += 1
            log.warning(
                "pack of %d tiles failed (%s); retry %d in %.1f s",
                len(message.tiles),
                exc,
                attempt,
                delay,
            )
            stop.wait(delay)
