"""Exceptions, split by what the caller should do next.

A *permanent* failure (bad tile, bad message, unreadable source, wrong model file) can never
succeed on retry: the worker records it as an ``error`` result with the reason and moves on.
A *transient* failure (model server, database, throttling) is raised so the queue delivers
the message again; nothing is dropped.
"""

import re
from collections.abc import Mapping
from typing import Any


def one_line(exc: BaseException) -> str:
    """An exception as one line of text (GDAL and torch messages often span several)."""
    return " ".join(str(exc).split()) or type(exc).__name__


#: How much of a user's text an error message quotes.
QUOTE_LIMIT = 80


def quoted(text: str, limit: int = QUOTE_LIMIT) -> str:
    """``repr(text)``, cut to ``limit`` characters: error messages quote user input (a tile
    list line, an option, a GeoJSON member), which can be megabytes long.

    >>> quoted("17-44-6")
    "'17-44-6'"
    >>> quoted("x" * 1000, limit=5)
    "'xxxxx'... (1,000 characters)"
    """
    if len(text) <= limit:
        return repr(text)
    return f"{text[:limit]!r}... ({len(text):,} characters)"


def cut(text: str, limit: int = 4 * QUOTE_LIMIT) -> str:
    """``text`` cut to ``limit`` characters: for a message that may quote user input (e.g. a
    parser's) inside an error of ours.

    >>> cut("could not convert " + "x" * 1000, limit=20)
    'could not convert xx... (1,018 characters)'
    """
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text):,} characters)"


def storable_text(text: str) -> str:
    """``text`` with what no results store can keep replaced by U+FFFD: NUL (PostgreSQL's
    text refuses it) and lone surrogates (UTF-8 has none). Error texts quote servers and
    files, so either can turn up in them, and a row that cannot be stored would fail its
    message on every delivery.

    >>> storable_text("bad\\x00byte \\ud800")
    'bad\\ufffdbyte \\ufffd'
    """
    return _UNSTORABLE_TEXT.sub("\ufffd", text)


_UNSTORABLE_TEXT = re.compile("[\x00\ud800-\udfff]")


class ChipscaleError(Exception):
    """Base class for every error chipscale raises on purpose."""

    #: Whether retrying can never help. The worker records permanent errors as results.
    permanent: bool = True


class InvalidTileError(ChipscaleError, ValueError):
    """A tile index is malformed or outside the web-mercator grid."""


class TileListError(ChipscaleError):
    """A tile-list file cannot be read or has a malformed line."""


class InvalidMessageError(ChipscaleError):
    """A queue message does not follow the message schema."""


class SourceError(ChipscaleError):
    """A raster source is missing, unreadable or not a raster."""


class AOIError(ChipscaleError):
    """An area of interest is unreadable, empty, or misses the source."""


class ModelFormatError(ChipscaleError):
    """A model file does not follow the model contract (e.g. a bare state_dict)."""


class PartialPrediction(ModelFormatError):
    """Some tiles of a batch were refused by the model server (a 4xx answer); the others have
    scores. Permanent for the refused tiles only: the worker stores the scores it got and an
    ``error`` row, with the server's reason, for each tile in ``failed``.
    """

    def __init__(self, scores: Any, failed: Mapping[int, str]) -> None:
        self.scores = scores  #: (N, classes) float32; rows listed in ``failed`` are NaN
        self.failed = dict(failed)  #: batch row -> reason
        first = next(iter(self.failed.values()), "")
        super().__init__(f"{len(self.failed)} of {len(scores)} tiles refused by the model: {first}")


class MissingExtraError(ChipscaleError):
    """An optional module a command needs is not installed (see chipscale.extras)."""


class StoreError(ChipscaleError):
    """A results store URL or file is unusable."""


class JobConflict(StoreError):
    """A job exists with another source or model: its source and model are fixed when it is
    created, so its rows never mix two images or two models."""


class OutputError(ChipscaleError):
    """An output cannot be written where asked: it names an input or the results store, or
    its folder is a file."""


class TransientError(ChipscaleError):
    """A failure that a retry may fix: the message must go back to the queue."""

    permanent = False


class PredictorUnavailable(TransientError):
    """The model server could not be reached or answered with a server error."""


class SourceUnavailable(TransientError, SourceError):
    """A remote raster could not be reached (timeout, refused connection, HTTP 429 or 5xx)."""


class StoreUnavailable(TransientError):
    """The results database could not be reached."""
