"""The in-process queue: the local stand-in for SQS.

Bounded, so the producer (cover and packing) never runs far ahead of the workers and memory
stays flat however large the area; closable, so Ctrl-C can drop what was not started.
"""

from __future__ import annotations

import queue
from collections.abc import Iterator

from chipscale.pipeline.messages import PackMessage

_CLOSED = object()


class LocalQueue:
    """A bounded FIFO of pack messages shared by a producer and worker threads."""

    def __init__(self, maxsize: int) -> None:
        self._queue: queue.Queue[object] = queue.Queue(maxsize=maxsize)

    def send(self, message: PackMessage, *, timeout: float = 0.2) -> bool:
        """Enqueue one message; False when the queue stayed full for ``timeout`` seconds.

        Callers loop on it, so the main thread stays responsive to Ctrl-C.
        """
        try:
            self._queue.put(message, timeout=timeout)
        except queue.Full:
            return False
        return True

    def messages(self) -> Iterator[PackMessage]:
        """Yield messages until the queue is closed (one consumer thread each)."""
        while True:
            item = self._queue.get()
            if item is _CLOSED:
                self._queue.put(_CLOSED)  # let the other consumers see it too
                return
            assert isinstance(item, PackMessage)
            yield item

    def close(self, *, discard: bool = False) -> int:
        """Tell consumers no more messages come; with ``discard`` drop the waiting ones.

        Returns how many messages were dropped.
        """
        dropped = 0
        if discard:
            while True:
                try:
                    self._queue.get_nowait()
                    dropped += 1
                except queue.Empty:
                    break
        self._queue.put(_CLOSED)
        return dropped
