"""Secrets out of what chipscale prints: one redaction for every URL or DSN it shows.

:func:`redact` is what messages, logs and ``store.url`` show of a database URL (any
``postgresql://``, ``postgres://`` or SQLAlchemy ``postgresql+driver://`` spelling, or a
libpq ``key=value`` string), a tile endpoint or any other URL. :func:`secrets_of` and
:func:`scrub` take the passwords out of free text (a driver's error message, a traceback)
that may quote them in any spelling; :func:`remember` and :class:`RedactingFormatter` do so
for the command line, which knows its database URL before anything can print it.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from urllib.parse import quote, unquote, urlsplit, urlunsplit

__all__ = ["RedactingFormatter", "forget", "redact", "remember", "scrub", "secrets_of"]

MASK = "***"
#: Query or keyword names whose values are secrets: password, sslpassword, access_token, ...
_SECRET_KEY = re.compile(r"pass|secret|token|key|sig|auth|credential", re.IGNORECASE)
#: A libpq ``key = value`` pair; a value is bare, or quoted with backslash escapes (an
#: unterminated quote runs to the end, as libpq would refuse it, and is hidden whole).
_KEYWORD = re.compile(r"([A-Za-z_]\w*)(\s*=\s*)('(?:[^'\\]|\\.)*(?:'|$)|[^\s']*)", re.DOTALL)
#: Schemes whose query strings are often keys (tile endpoints, presigned URLs): hidden whole.
_WEB_SCHEMES = frozenset({"http", "https"})


def _is_keywords(text: str) -> bool:
    return "://" not in text and _KEYWORD.match(text.strip()) is not None


def _mask_keywords(text: str) -> str:
    def mask(match: re.Match[str]) -> str:
        key, equals, _value = match.groups()
        return f"{key}{equals}{MASK}" if _SECRET_KEY.search(key) else match.group(0)

    return _KEYWORD.sub(mask, text)


def _mask_query(query: str) -> str:
    items = []
    for item in query.split("&"):
        key = unquote(item.split("=", 1)[0])
        items.append(f"{item.split('=', 1)[0]}={MASK}" if _SECRET_KEY.search(key) else item)
    return "&".join(items)


def _split_userinfo(rest: str) -> tuple[str | None, str]:
    """The user information and what follows it. It ends at the *last* ``@``, so that a
    password holding an unencoded ``@``, ``/`` or ``?`` is hidden whole, not shown in the
    host (over-hiding an ``@`` of the query is the safe mistake)."""
    at = rest.rfind("@")
    return (rest[:at], rest[at + 1 :]) if at >= 0 else (None, rest)


def _shown_userinfo(userinfo: str) -> str:
    """A user name is shown, a password never; anything unclear is hidden whole."""
    if re.fullmatch(r"[^:/?#]*", userinfo):
        return userinfo
    user = re.match(r"([^:/?#]*):", userinfo)
    return f"{user.group(1)}:{MASK}" if user else MASK


def _redact_web(url: str) -> str:
    """An http(s) URL without user information or query string (their parameters are
    often keys), as tile endpoints are shown."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = parts.port
    except ValueError:
        return f"{url.split('://', 1)[0]}://{MASK}"
    if ":" in host:  # an IPv6 literal
        host = f"[{host}]"
    netloc = f"{host}:{port}" if port else host
    return urlunsplit((parts.scheme, netloc, parts.path, "..." if parts.query else "", ""))


def redact(text: str) -> str:
    """``text`` (a URL, a libpq keyword string, a path) fit for messages and logs.

    A database URL keeps its user and its harmless parameters; its password (in the user
    information or a ``password=`` parameter, however encoded) is shown as ``***``. An
    http(s) URL loses its user information and query string.

    >>> redact("postgresql+psycopg2://chip:s3cret@db:5432/results?sslmode=require")
    'postgresql+psycopg2://chip:***@db:5432/results?sslmode=require'
    >>> redact("host=db password='a b' user=chip")
    'host=db password=*** user=chip'
    >>> redact("https://user:pw@h.example:8080/a/1/2/3.png?access_token=secret")
    'https://h.example:8080/a/1/2/3.png?...'
    """
    if "://" not in text:
        if _is_keywords(text):
            return _mask_keywords(text)
        head, rest = _split_userinfo(text)  # a mangled URL: postgresql:/u:pw@host/db
        return text if head is None else f"{MASK}@{rest}"
    scheme, rest = text.split("://", 1)
    if scheme.lower() in _WEB_SCHEMES:
        return _redact_web(text)
    userinfo, rest = _split_userinfo(rest)
    rest, sep, query = rest.partition("?")
    shown = "" if userinfo is None else f"{_shown_userinfo(userinfo)}@"
    return f"{scheme}://{shown}{rest}{sep}{_mask_query(query) if sep else ''}"


def _unquote_keyword(value: str) -> str:
    if value.startswith("'"):
        return re.sub(r"\\(.)", r"\1", value[1:].removesuffix("'"))
    return value


def secrets_of(text: str) -> set[str]:
    """The secrets in a URL or DSN, as written and as decoded, and the password as libpq
    reads it (up to the *first* ``@``): an error message may quote any of them."""
    found: set[str] = set()
    if "://" not in text:
        for key, _equals, value in _KEYWORD.findall(text):
            if _SECRET_KEY.search(key):
                found |= {value, _unquote_keyword(value)}
    else:
        rest = text.split("://", 1)[1]
        userinfo, after = _split_userinfo(rest)
        if userinfo is not None:
            for info in {userinfo, rest.split("@", 1)[0]}:
                if ":" in info:
                    found.add(info.split(":", 1)[1])
        _, _, query = after.partition("?")
        for item in query.split("&"):
            key, equals, value = item.partition("=")
            if equals and _SECRET_KEY.search(unquote(key)):
                found.add(value)
    for secret in list(found):
        found |= {unquote(secret), unquote(secret.replace("+", " ")), quote(secret, safe="")}
    return {secret for secret in found if secret}


def _pattern(secrets: Iterable[str]) -> re.Pattern[str] | None:
    ordered = sorted(set(secrets), key=len, reverse=True)
    if not ordered:
        return None
    either = "|".join(re.escape(secret) for secret in ordered)
    # Whole tokens only, so that a short password does not eat into ordinary words.
    return re.compile(rf"(?<![0-9A-Za-z])(?:{either})(?![0-9A-Za-z])")


def scrub(text: str, secrets: Iterable[str] | None = None) -> str:
    """``text`` with every secret (default: those :func:`remember` was given) as ``***``."""
    pattern = _pattern(secrets) if secrets is not None else _remembered
    return pattern.sub(MASK, text) if pattern is not None else text


_known: set[str] = set()
_remembered: re.Pattern[str] | None = None


def remember(text: str) -> str:
    """Note the secrets of a URL or DSN the process was given (``--db``, ``DATABASE_URL``),
    so that :func:`scrub` and :class:`RedactingFormatter` hide them; returns ``text``."""
    global _remembered
    new = secrets_of(text) - _known
    if new:
        _known.update(new)
        _remembered = _pattern(_known)
    return text


def forget() -> None:
    """Drop what :func:`remember` noted (tests)."""
    global _remembered
    _known.clear()
    _remembered = None


class RedactingFormatter(logging.Formatter):
    """A log formatter that scrubs remembered secrets from the whole record, traceback and
    chained exceptions included."""

    def format(self, record: logging.LogRecord) -> str:
        return scrub(super().format(record))
