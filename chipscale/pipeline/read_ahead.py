"""Read the next pack while the current one is predicted: at most one pack ahead.

:func:`read_ahead` serves the local runner's workers (one reading thread each, which also
takes their next message); :class:`ReadAheadSlot` serves the cloud worker, whose Lambda batch
hands it records one at a time. GDAL and torch release the GIL, so a read overlaps a
prediction. A read's exception is raised where its pack is taken, as a serial read would
have raised it. Figures: docs/design.md, "The local pipeline".
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Generic, TypeVar

M = TypeVar("M")
R = TypeVar("R")


class _Outcome(Generic[R]):
    """A read's value or exception, raised again by :meth:`get`."""

    __slots__ = ("_error", "_value")

    def __init__(self, value: R | None = None, error: BaseException | None = None) -> None:
        self._value, self._error = value, error

    def get(self) -> R:
        if self._error is not None:
            raise self._error
        return self._value  # type: ignore[return-value]  # set whenever no error is


def _attempt(read: Callable[[M], R], message: M) -> _Outcome[R]:
    try:
        return _Outcome(read(message))
    except Exception as exc:  # raised again where the pack is taken
        return _Outcome(error=exc)


def read_ahead(
    messages: Iterable[M], read: Callable[[M], R]
) -> Iterator[tuple[M, Callable[[], R]]]:
    """Each message with a getter of its read (which raises the read's exception); the next
    message is taken and read in a background thread while the caller works on this one.

    One pack ahead at most: the read of message k+1 starts only when message k is handed
    over, and k+2's only when the caller comes back for k+1. The caller must exhaust the
    iterator (the reading thread may be waiting on ``messages``).
    """
    source = iter(messages)

    def fetch() -> tuple[M, _Outcome[R]] | None:
        for message in source:  # one at a time: the next call takes the next message
            return message, _attempt(read, message)
        return None

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="read-ahead") as pool:
        pending = pool.submit(fetch)
        while True:
            got = pending.result()
            if got is None:
                return
            message, outcome = got
            pending = pool.submit(fetch)
            yield message, outcome.get


class ReadAheadSlot(Generic[M, R]):
    """One background read, keyed by the caller (an SQS message id): :meth:`start` it while
    predicting another pack, :meth:`take` it when its turn comes. Starting another drops the
    one not taken, so at most one pack is held ahead."""

    def __init__(self, read: Callable[[M], R]) -> None:
        self._read = read
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()
        self._key: str | None = None
        self._future: Future[_Outcome[R]] | None = None

    def start(self, key: str, message: M) -> None:
        """Read ``message`` in the background, dropping any read not taken (one thread: a
        dropped read still running delays this one, never runs beside it)."""
        self.drop()
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="read-ahead")
            self._key, self._future = key, self._pool.submit(_attempt, self._read, message)

    def take(self, key: str) -> Callable[[], R] | None:
        """The getter of ``key``'s read (it waits for the read to end), or None when none was
        started for it. The slot is free again either way."""
        with self._lock:
            if self._key != key or self._future is None:
                return None
            future, self._key, self._future = self._future, None, None
        return lambda: future.result().get()

    def drop(self) -> None:
        """Forget the read not taken, without waiting for it (a Lambda batch ends at once)."""
        with self._lock:
            future, self._key, self._future = self._future, None, None
        if future is not None:
            future.cancel()

    @property
    def pending(self) -> str | None:
        """The key of the read held, if any."""
        return self._key

    def close(self) -> None:
        self.drop()
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True)
