"""TorchServe over HTTP as a :class:`~chipscale.models.predictors.Predictor` (the cloud adapter).

:class:`TorchServePredictor` scores a pack's tiles through the wire protocol of
``model_server/chipscale_handler.py`` (``.npy`` bodies, JSON answers) with urllib3 alone (no
torch): balanced concurrent requests, retries, splits on 413 and 507, ``error`` rows for the
tiles a 4xx refuses, and every answer checked (:class:`ModelChanged`). Why it works so, and
its measured defaults: docs/design.md, section 9.3.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import random
import re
import time
from collections.abc import Callable, Collection
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any

import numpy as np
import urllib3
from urllib3.connectionpool import connection_from_url
from urllib3.util import parse_url

from chipscale.errors import (
    ChipscaleError,
    ModelFormatError,
    PartialPrediction,
    PredictorUnavailable,
)
from chipscale.models.mask_answer import answer_headers, decode_masks, empty_answer
from chipscale.models.model_info import model_info
from chipscale.models.request_body import (
    DEFAULT_CONTENT_ENCODING,
    encode,
    encoding_refused,
    negotiate,
    npy,
)
from chipscale.models.scores import non_finite_rows
from chipscale.retry import RETRY_STATUSES, Backoff, RetryPolicy
from chipscale.values import ModelInfo

log = logging.getLogger(__name__)

#: Tiles per request and requests in flight: the best of 4 sizes x 3 depths, measured with
#: the demo model behind a real TorchServe on the 2-core dev machine (bench/request_shape.py;
#: figures and why in docs/design.md 9.3; a GPU host re-measures with bench/gpu_serving.py).
DEFAULT_TILES_PER_REQUEST = 8
DEFAULT_CONCURRENCY = 4
#: A little under ``max_request_size`` of model_server/config.properties (128 MiB): the
#: body is the .npy file, whose header this client counts.
DEFAULT_MAX_REQUEST_BYTES = 127 * 2**20
#: Connecting inside a VPC takes milliseconds: a host that has not accepted in 3 s is gone.
DEFAULT_CONNECT_TIMEOUT = 3.0
#: An answer covers TorchServe's queue and the model: well under a second for 8 tiles on a
#: healthy GPU host, a few seconds behind a full queue. A hung host costs 20 s an attempt, so
#: all five attempts (100 s, plus at most 7.5 s of backoff) fit in the worker Lambda's 120 s.
DEFAULT_READ_TIMEOUT = 20.0
#: Retries per request, then the pack goes back to the queue (which retries it again later).
DEFAULT_RETRIES = 4
DEFAULT_BACKOFF = 0.5
DEFAULT_BACKOFF_MAX = 10.0

#: Answers worth another try are :data:`chipscale.retry.RETRY_STATUSES` (here: 503 queue
#: full or no worker, 507 out of memory, 502/504 from the load balancer). While scoring, 404
#: is retried too: a host the Auto Scaling group just started answers "model not found"
#: until its model is registered. At start it is a wrong URL instead.
#: 507 (the handler ran out of memory) is not retried as it is: the request is split.
PREDICT_RETRY_STATUSES = (RETRY_STATUSES - {507}) | {404}
#: Answers that mean "send fewer tiles at once": too large for the server, out of memory.
SPLIT_STATUSES = frozenset({413, 507})

_HEADERS = {"Content-Type": "application/octet-stream", "Accept": "application/json"}
#: Room for the .npy header when sizing requests (numpy pads it to 64 bytes; 4 KiB is plenty).
_NPY_HEADER_ALLOWANCE = 4096
_PATH = re.compile(r"/predictions/[^/]+(?:/[^/]+)?/?$")


class ModelChanged(PredictorUnavailable):
    """The endpoint now serves another model or version than the one this run started with.

    Transient, not a tile error: behind a load balancer it happens while hosts roll to a new
    model, and storing ``error`` rows would lose tiles that the old (or a restarted) worker
    can still score. The pack goes back to the queue; a worker rebuilds its predictor to
    move a job to the new version on purpose.
    """


@dataclass(frozen=True, slots=True)
class _Answer:
    status: int
    data: bytes


@dataclass(frozen=True, slots=True)
class _Scored:
    start: int
    stop: int
    scores: np.ndarray
    #: The server's reason for each row it has no scores for (batch row -> reason).
    unscored: dict[int, str]


@dataclass(frozen=True, slots=True)
class _Refused:
    start: int
    stop: int
    reason: str


@dataclass(frozen=True, slots=True)
class _TooLarge:
    start: int
    stop: int
    status: int


_Outcome = _Scored | _Refused | _TooLarge


class TorchServePredictor:
    """Scores tiles with the model a chipscale TorchServe endpoint serves.

    ``url`` is ``http(s)://HOST:PORT/predictions/NAME`` (or ``.../NAME/VERSION``). The model's
    metadata is read from the endpoint at construction, so ``info`` is what the server runs:
    :class:`~chipscale.errors.ChipscaleError` when the URL is not a chipscale endpoint,
    :class:`~chipscale.errors.PredictorUnavailable` when it cannot be reached.

    Parameters:

    - ``tiles_per_request``, ``concurrency``: see the defaults below;
    - ``max_request_bytes``: largest body sent (keep it under the server's
      ``max_request_size``; a 413 still splits the request);
    - ``connect_timeout``, ``read_timeout``: seconds, per attempt;
    - ``retries``, ``backoff``, ``backoff_max``: a failed attempt ``k`` (0-based) waits a
      uniformly random time in ``[0, min(backoff_max, backoff * 2**k)]`` ("full jitter": many
      Lambdas retrying a restarted server do not all come back at once);
    - ``content_encoding``: ``auto`` (zstd-compressed bodies when the server decodes them,
      else ``.npy``), ``zstd`` (required) or ``identity`` (never);
    - ``sleep``, ``rng``, ``clock``: injectable for tests.

    Defaults, measured: 8 tiles a request, 4 requests in flight. The demo model behind the
    ``torchserve`` test fixture (real TorchServe 0.12, one CPU worker, ``batchSize`` 4,
    ``maxBatchDelay`` 5 ms) on the 2-core dev machine, 512 real aerial tiles (3x256x256
    uint8) sent as packs of 100, every setting measured once per round, rounds interleaved,
    median of 8 rounds, tiles/s (in-process in the same rounds: 906):

    ==================  =====  =====  =====
    tiles per request    c=2    c=4    c=8
    ==================  =====  =====  =====
    8                    429    522    592
    16                   512    437    423
    32                   387    386    409
    64                   363    388    461
    ==================  =====  =====  =====

    Other sessions kept the load average at 3.5-9 on the 2 cores, so differences under about
    20 % are noise; but three more runs (5, 10 and 4 rounds) ranked 8-tile requests first
    every time, and counting CPU seconds of client plus server showed small requests cost no
    more per tile. Why: a pack then goes out as 13 requests instead of 4 (at 32) or 2 (at 64),
    so TorchServe decodes and answers some while the model runs others; the per-request
    overhead is small beside the per-tile work. 4 and 8 in flight were within the noise (8
    ahead by 0-13 % in three runs, 7 % behind in one); 4 it is, because a fleet of Lambdas
    multiplies it: TorchServe's ``job_queue_size`` of 1000 then admits 250 busy Lambdas
    before answering 503, not 125.
    On a GPU host, one handler call gets ``batchSize`` x 8 tiles: give the model-config a
    ``batchSize`` of ``sub_batch / 8`` (8 for 64) so a call fills a sub-batch, or raise
    ``tiles_per_request``.

    Thread safety: ``predict`` may be called from several threads at once (the local runner's
    workers do); they share the pool and the ``concurrency`` slots.
    """

    def __init__(
        self,
        url: str,
        *,
        tiles_per_request: int = DEFAULT_TILES_PER_REQUEST,
        concurrency: int = DEFAULT_CONCURRENCY,
        max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        read_timeout: float = DEFAULT_READ_TIMEOUT,
        retries: int = DEFAULT_RETRIES,
        backoff: float = DEFAULT_BACKOFF,
        backoff_max: float = DEFAULT_BACKOFF_MAX,
        sleep: Callable[[float], None] = time.sleep,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
        content_encoding: str = DEFAULT_CONTENT_ENCODING,
    ) -> None:
        for name, value in (
            ("tiles_per_request", tiles_per_request),
            ("concurrency", concurrency),
            ("max_request_bytes", max_request_bytes),
        ):
            if value < 1:
                raise ChipscaleError(f"TorchServePredictor {name} must be >= 1, got {value}")
        self.policy = RetryPolicy.of_retries(
            retries, backoff, backoff_max, owner="TorchServePredictor"
        )
        self.url = url
        self.tiles_per_request = tiles_per_request
        self.concurrency = concurrency
        self.max_request_bytes = max_request_bytes
        self._sleep = sleep
        self._backoff = Backoff(self.policy, rng)
        self._connect_timeout, self._read_timeout = connect_timeout, read_timeout
        self._timeouts = urllib3.Timeout(connect=connect_timeout, read=read_timeout)
        self._clock = clock
        self._path, self._pool = _open_pool(url, concurrency, self._timeouts)
        self._executor: ThreadPoolExecutor | None = None
        try:
            document = self._read_metadata()
            self.info = _model_info(url, document)
            #: Request bodies go as ``zstd`` or ``identity`` (see ``content_encoding``).
            self.content_encoding = negotiate(
                content_encoding, document.get("content_encodings"), url
            )
        except BaseException:
            self._pool.close()
            raise
        #: Headers the answers need (a segmentation model's: the mask encodings decoded here).
        self._answer_headers = answer_headers(self.info)
        #: The model's metadata document as the server reports it (``chipscale.json``).
        self.metadata: dict[str, Any] = document["metadata"]
        #: The answering worker's placement and settings (device, precision...); empty from a
        #: handler older than issue 17.
        self.worker: dict[str, Any] = document.get("worker") or {}
        self._executor = ThreadPoolExecutor(concurrency, thread_name_prefix="torchserve")

    def __repr__(self) -> str:
        return (
            f"TorchServePredictor({self.url!r}, model={self.info.name!r} v{self.info.version}, "
            f"tiles_per_request={self.tiles_per_request}, concurrency={self.concurrency}, "
            f"content_encoding={self.content_encoding!r})"
        )

    # ------------------------------------------------------------------------- the port

    def predict(self, batch: np.ndarray, *, deadline: float | None = None) -> np.ndarray:
        """``(N, bands, size, size)`` -> ``(N, classes)`` float32, in the batch's order (a
        segmentation model: ``(N, S, S)`` uint8 class indices, decoded from its answer).

        ``deadline`` (a :func:`time.monotonic` instant) bounds the whole call, retries
        included: a Lambda passes its remaining time, so a slow host fails this pack alone
        (``PredictorUnavailable``) instead of timing out the invocation and its whole batch.

        Raises :class:`~chipscale.errors.PartialPrediction` when some requests were refused
        (4xx), :class:`~chipscale.errors.PredictorUnavailable` when one still failed after
        the retries or the deadline, :class:`ModelChanged` when the endpoint's model changed.
        """
        executor = self._executor
        if executor is None:
            raise ChipscaleError(f"TorchServePredictor for {self.url} is closed")
        if not isinstance(batch, np.ndarray) or batch.ndim != 4:
            shape = getattr(batch, "shape", type(batch).__name__)
            raise ModelFormatError(f"a batch must be (N, bands, size, size), got {shape}")
        scores = empty_answer(self.info, len(batch))
        refused: dict[int, str] = {}
        unscored: dict[int, str] = {}
        pending = {self._submit(executor, batch, rows, deadline) for rows in self._chunks(batch)}
        try:
            while pending:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for future in done:
                    if future.cancelled():  # close() ran in another thread
                        raise ChipscaleError(f"TorchServePredictor for {self.url} was closed")
                    outcome = future.result()  # re-raises PredictorUnavailable, ModelChanged
                    if isinstance(outcome, _Scored):
                        scores[outcome.start : outcome.stop] = outcome.scores
                        unscored.update(outcome.unscored)
                    elif isinstance(outcome, _Refused):
                        rows = range(outcome.start, outcome.stop)
                        refused.update(dict.fromkeys(rows, outcome.reason))
                    else:
                        pending |= self._split(executor, batch, outcome, deadline)
        except BaseException:
            for future in pending:  # the pack fails whole: send no more of it
                future.cancel()
            raise
        if self.info.task == "segmentation":  # a tile the server has no mask for
            failed = unscored
        else:  # NaN is no score: refuse it
            failed = {r: unscored.get(r, why) for r, why in non_finite_rows(scores).items()}
        for row, reason in failed.items():
            refused.setdefault(row, reason)
        if refused:
            raise PartialPrediction(scores, refused)
        return scores

    def close(self) -> None:
        """Stop the request threads and close the connections; idempotent."""
        executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=True, cancel_futures=True)
        self._pool.close()

    def __enter__(self) -> TorchServePredictor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------------- requests

    def _chunks(self, batch: np.ndarray) -> list[tuple[int, int]]:
        """``(start, stop)`` rows of each request: as few as the limits allow, sizes balanced."""
        n = len(batch)
        if n == 0:
            return []
        tile_bytes = max(1, batch[0].nbytes)
        by_bytes = max(1, (self.max_request_bytes - _NPY_HEADER_ALLOWANCE) // tile_bytes)
        count = -(-n // min(self.tiles_per_request, by_bytes))
        size, extra = divmod(n, count)
        bounds = [0]
        for i in range(count):
            bounds.append(bounds[-1] + size + (1 if i < extra else 0))
        return list(itertools.pairwise(bounds))

    def _split(
        self,
        executor: ThreadPoolExecutor,
        batch: np.ndarray,
        too_large: _TooLarge,
        deadline: float | None,
    ) -> set[Future[_Outcome]]:
        start, stop = too_large.start, too_large.stop
        middle = (start + stop) // 2
        why = (
            f"max_request_bytes={self.max_request_bytes} is above the server's max_request_size"
            if too_large.status == 413
            else "the model ran out of memory (lower tiles_per_request or the handler sub_batch)"
        )
        log.warning(
            "TorchServe at %s answered %d to %d tiles: sending them in halves; %s",
            self.url,
            too_large.status,
            stop - start,
            why,
        )
        return {
            self._submit(executor, batch, (start, middle), deadline),
            self._submit(executor, batch, (middle, stop), deadline),
        }

    def _submit(
        self,
        executor: ThreadPoolExecutor,
        batch: np.ndarray,
        rows: tuple[int, int],
        deadline: float | None,
    ) -> Future[_Outcome]:
        try:
            return executor.submit(self._send, batch, *rows, deadline)
        except RuntimeError as exc:  # close() ran in another thread
            raise ChipscaleError(f"TorchServePredictor for {self.url} is closed") from exc

    def _send(self, batch: np.ndarray, start: int, stop: int, deadline: float | None) -> _Outcome:
        """One request (run in the pool): its scores, its refusal, or "too large"."""
        tiles = batch[start:stop]
        what = f"{stop - start} tiles"
        body, headers = encode(tiles, self.content_encoding)
        headers = {**headers, **self._answer_headers}
        answer = self._post(body, what, PREDICT_RETRY_STATUSES, deadline, headers)
        if (
            self.content_encoding == "zstd"
            and answer.status in (400, 415)
            and encoding_refused(answer.status, _server_message(answer.data))
        ):  # a host of a mixed fleet that does not decode zstd: send it plain
            log.warning("%s refused a zstd body: sending it as .npy", self.url)
            plain = {**_HEADERS, **self._answer_headers}
            answer = self._post(npy(tiles), what, PREDICT_RETRY_STATUSES, deadline, plain)
        if 200 <= answer.status < 300:
            scores, unscored = self._scores(answer.data, stop - start)
            return _Scored(start, stop, scores, {start + i: r for i, r in unscored.items()})
        if answer.status in SPLIT_STATUSES and stop - start > 1:
            return _TooLarge(start, stop, answer.status)
        if answer.status == 507:  # one tile and still out of memory: a busy GPU, try later
            raise PredictorUnavailable(
                f"TorchServe at {self.url} ran out of memory on a single tile: "
                f"{_server_message(answer.data)}"
            )
        if answer.status == 413:
            reason = (
                f"the tile ({tiles.nbytes} bytes) exceeds the server's max_request_size "
                f"(HTTP 413 from {self.url})"
            )
            return _Refused(start, stop, reason)
        if 400 <= answer.status < 500 or _model_raised(answer):
            reason = f"HTTP {answer.status} from {self.url}: {_server_message(answer.data)}"
            return _Refused(start, stop, reason)
        raise ChipscaleError(
            f"TorchServe at {self.url} answered an unexpected HTTP {answer.status}: "
            f"{_server_message(answer.data)}"
        )

    def _post(
        self,
        body: bytes,
        what: str,
        retry_statuses: Collection[int],
        deadline: float | None = None,
        headers: dict[str, str] = _HEADERS,
    ) -> _Answer:
        """POST ``body``, retrying what a retry may fix (until ``deadline``, if given); the
        final answer otherwise."""
        last, final = "", None
        for attempt in range(self.policy.max_attempts):
            if attempt:
                delay = self._backoff.delay(attempt)
                if deadline is not None and self._clock() + delay >= deadline:
                    break
                self._sleep(delay)
            timeout = self._timeout(deadline)
            if timeout is None:
                break
            try:
                response = self._pool.urlopen(
                    "POST",
                    self._path,
                    body=body,
                    headers=headers,
                    retries=False,
                    redirect=False,
                    preload_content=True,
                    timeout=timeout,
                )
            except (urllib3.exceptions.HTTPError, OSError) as exc:
                last = f"{type(exc).__name__}: {exc}"
                log.info("TorchServe at %s, %s, attempt %d: %s", self.url, what, attempt + 1, last)
                continue
            if response.status not in retry_statuses:
                return _Answer(response.status, response.data)
            final = _Answer(response.status, response.data)
            last = f"HTTP {response.status}: {_server_message(response.data)}"
            log.info("TorchServe at %s, %s, attempt %d: %s", self.url, what, attempt + 1, last)
        if final is not None and _model_raised(final):
            # The model itself raised on these tiles every time, on its own (the handler
            # isolates the request that breaks a batch): refuse them, don't retry forever.
            return final
        if deadline is not None and self._clock() + self.policy.base_delay >= deadline:
            raise PredictorUnavailable(
                f"TorchServe at {self.url}: no time left for {what} before the deadline; "
                f"last: {last or 'no attempt'}"
            )
        raise PredictorUnavailable(
            f"TorchServe at {self.url} failed on {what} after {self.policy.max_attempts} attempts; "
            f"last: {last}"
        )

    def _timeout(self, deadline: float | None) -> urllib3.Timeout | None:
        """This attempt's timeouts, cut to the time left; None when none is left."""
        if deadline is None:
            return self._timeouts
        left = deadline - self._clock()
        if left <= 0.05:
            return None
        return urllib3.Timeout(
            connect=min(self._connect_timeout, left), read=min(self._read_timeout, left)
        )

    # ------------------------------------------------------------------------- answers

    def read_metadata(self) -> dict[str, Any]:
        """Ask again for the handler's metadata answer (whichever worker takes it answers:
        ``verify`` samples the workers' devices this way)."""
        return self._read_metadata()

    def _read_metadata(self) -> dict[str, Any]:
        """The handler's answer to an empty body: ``{"model", "version", "metadata", "worker"}``."""
        answer = self._post(b"", "the metadata request", RETRY_STATUSES)
        if answer.status != 200:
            raise ChipscaleError(
                f"{self.url} is not a chipscale TorchServe endpoint: the metadata request got "
                f"HTTP {answer.status}: {_server_message(answer.data)}"
            )
        document = _json(answer.data)
        if not isinstance(document, dict) or not isinstance(document.get("metadata"), dict):
            raise ChipscaleError(
                f"{self.url} is not a chipscale TorchServe endpoint: its metadata answer is "
                f"{_excerpt(answer.data)}"
            )
        return document

    def _scores(self, data: bytes, tiles: int) -> tuple[np.ndarray, dict[int, str]]:
        """The ``(tiles, classes)`` scores of a 200 answer (a segmentation model: its
        ``(tiles, S, S)`` masks), after checking whose they are, and the server's reason for
        each row it has no scores for (``null``, read as NaN; a mask of 255)."""
        document = _json(data)
        key = "masks" if self.info.task == "segmentation" else "scores"
        if not isinstance(document, dict) or key not in document:
            raise ChipscaleError(
                f"TorchServe at {self.url} answered 200 without {key}: {_excerpt(data)}"
            )
        info = self.info
        model, version = document.get("model"), document.get("version")
        if (model, version) != (info.name, info.version):
            raise ModelChanged(
                f"TorchServe at {self.url} now serves model {model!r} version {version!r}, but "
                f"this run started with {info.name!r} version {info.version!r}: scores of two "
                "model versions must not mix; finish or restart the job on one version"
            )
        classes = document.get("classes")
        if classes is not None and tuple(classes) != info.classes:
            raise ModelChanged(
                f"TorchServe at {self.url} answered classes {classes}, expected "
                f"{list(info.classes)}"
            )
        if key == "masks":
            return decode_masks(document[key], tiles, info, self.url), _unscored(document, tiles)
        rows = document["scores"]
        if isinstance(rows, list):
            rows = [[math.nan] * len(info.classes) if row is None else row for row in rows]
        try:
            scores = np.asarray(rows, dtype=np.float32)
        except (TypeError, ValueError) as exc:
            raise ChipscaleError(
                f"TorchServe at {self.url} answered scores that are not a table of numbers: {exc}"
            ) from exc
        expected = (tiles, len(info.classes))
        if scores.shape != expected:
            raise ChipscaleError(
                f"TorchServe at {self.url} answered scores of shape {scores.shape} for "
                f"{tiles} tiles, expected {expected} (tiles, classes)"
            )
        return scores, _unscored(document, tiles)


# ----------------------------------------------------------------------------- helpers


def _open_pool(
    url: str, concurrency: int, timeouts: urllib3.Timeout
) -> tuple[str, urllib3.HTTPConnectionPool]:
    """The request path and a keep-alive pool of ``concurrency`` connections to the host."""
    parsed = parse_url(url)
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise ChipscaleError(f"{url!r} is not an http(s) URL")
    path = parsed.path or "/"
    if not _PATH.search(path):
        raise ChipscaleError(
            f"{url!r} is not a TorchServe predictions URL: expected "
            "http(s)://HOST:PORT/predictions/NAME (or .../NAME/VERSION)"
        )
    pool = connection_from_url(
        url,
        maxsize=concurrency,
        block=False,
        timeout=timeouts,
        retries=False,
    )
    return path, pool


def _model_info(url: str, document: dict[str, Any]) -> ModelInfo:
    meta = document["metadata"]
    try:
        return model_info(meta, name=document.get("model"), version=document.get("version"))
    except (KeyError, TypeError, ValueError) as exc:
        raise ChipscaleError(
            f"{url} is not a chipscale TorchServe endpoint: its model metadata lacks or "
            f"garbles {exc}"
        ) from exc


def _unscored(document: dict[str, Any], tiles: int) -> dict[int, str]:
    """The server's reason for each row of an answer it has no scores (or mask) for."""
    errors = document.get("errors")
    return {
        int(row): " ".join(str(reason).split())
        for row, reason in (errors.items() if isinstance(errors, dict) else ())
        if str(row).isdigit() and int(row) < tiles
    }


def _model_raised(answer: _Answer) -> bool:
    """A 500 the chipscale handler wrote for a model that raised on the request's tiles (not
    TorchServe's own 500s, e.g. a worker that died), after the retries: the same tiles broke
    the model each time."""
    if answer.status != 500:
        return False
    try:
        document = json.loads(answer.data)
    except ValueError:
        return False
    return isinstance(document, dict) and document.get("status") == 500 and "error" in document


def _json(data: bytes) -> Any:
    try:
        return json.loads(data)
    except ValueError:
        return None


def _server_message(data: bytes) -> str:
    """The reason in an error body: the handler's ``error``, TorchServe's ``message``."""
    document = _json(data)
    if isinstance(document, dict):
        for key in ("error", "message"):
            if document.get(key):
                return " ".join(str(document[key]).split())
    return _excerpt(data)


def _excerpt(data: bytes, limit: int = 200) -> str:
    text = " ".join(data[:limit].decode("utf-8", errors="replace").split())
    if not text:
        return "(empty body)"
    return text + ("..." if len(data) > limit else "")
