"""One retry policy: how many attempts, the full-jitter wait before each retry, which HTTP
answers are worth another try, what a ``Retry-After`` asks, and one error for bad settings.

The tile-endpoint reader, the TorchServe client and push take their waits from here; each
keeps its own loop, since what a failed attempt means differs from one to the other.
"""

from __future__ import annotations

import email.utils
import random
import threading
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Final

from chipscale.errors import ChipscaleError

#: HTTP answers worth another try: the request timed out, throttling, server-side failures.
RETRY_STATUSES: Final = frozenset({408, 429}) | frozenset(range(500, 600))


class RetrySettingsError(ChipscaleError, ValueError):
    """Retry settings that cannot work: no attempt at all, or a negative count or wait."""


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Exponential backoff with full jitter (AWS's advice for many clients at once).

    At most ``max_attempts`` tries; retry ``n`` (1 for the first retry) waits a uniformly
    random time in ``[0, min(max_delay, base_delay * 2**(n-1))]``, so many clients retrying
    a recovering server do not all come back at once.

    >>> policy = RetryPolicy(max_attempts=5, base_delay=0.5, max_delay=2.0)
    >>> [policy.ceiling(n) for n in range(1, policy.max_attempts)]
    [0.5, 1.0, 2.0, 2.0]
    """

    max_attempts: int = 8
    base_delay: float = 0.1
    max_delay: float = 10.0

    def __post_init__(self) -> None:
        if self.max_attempts < 1 or self.base_delay < 0 or self.max_delay < 0:
            raise RetrySettingsError(
                "max_attempts must be >= 1 and base_delay, max_delay >= 0; got "
                f"{self.max_attempts}, {self.base_delay}, {self.max_delay}"
            )

    @classmethod
    def of_retries(
        cls, retries: int, backoff: float, backoff_max: float, *, owner: str
    ) -> RetryPolicy:
        """The policy of a client set as ``retries`` after the first attempt, waits of
        ``backoff * 2**k`` up to ``backoff_max``; a bad setting is named as ``owner`` has it.

        >>> RetryPolicy.of_retries(3, 0.25, 4.0, owner="reader").max_attempts
        4
        """
        if retries < 0 or backoff < 0 or backoff_max < 0:
            raise RetrySettingsError(
                f"{owner} retries, backoff and backoff_max must be >= 0, got "
                f"{retries}, {backoff}, {backoff_max}"
            )
        return cls(max_attempts=retries + 1, base_delay=backoff, max_delay=backoff_max)

    @property
    def retries(self) -> int:
        """Tries after the first."""
        return self.max_attempts - 1

    def ceiling(self, retry: int) -> float:
        """The longest wait before retry number ``retry`` (1 for the first retry)."""
        return min(self.max_delay, self.base_delay * 2.0 ** (retry - 1))

    def delay(self, retry: int, rng: random.Random) -> float:
        """Seconds to wait before retry number ``retry`` (1 for the first retry)."""
        return rng.uniform(0.0, self.ceiling(retry))


class Backoff:
    """A policy's waits drawn from one random generator that threads may share: the draw
    is under a lock, as ``random.Random`` is not documented as thread-safe. ``rng`` is
    injectable for tests (its ``uniform`` is the only method called)."""

    def __init__(self, policy: RetryPolicy, rng: random.Random | None = None) -> None:
        self.policy = policy
        self._rng = rng or random.Random()
        self._lock = threading.Lock()

    def delay(self, retry: int) -> float:
        """Seconds to wait before retry number ``retry`` (1 for the first retry)."""
        with self._lock:
            return self.policy.delay(retry, self._rng)


def retry_after(value: str | None) -> float:
    """Seconds a ``Retry-After`` header asks to wait (delta-seconds or an HTTP date); 0
    when absent or unreadable, and for a date already past.

    >>> retry_after("120"), retry_after(None), retry_after("soon")
    (120.0, 0.0, 0.0)
    """
    if not value:
        return 0.0
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return 0.0
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


__all__ = ["RETRY_STATUSES", "Backoff", "RetryPolicy", "RetrySettingsError", "retry_after"]
