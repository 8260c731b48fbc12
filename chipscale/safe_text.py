"""Stored text made safe where people read it, and counts in words.

Job names, sources, model names and error texts come from users, model files and remote
servers, and are stored as given. :func:`printable` is how any of them reaches a terminal
(control characters escaped, so ``ESC[2J`` cannot clear the screen), :func:`cell` how it
reaches a rich table (markup such as ``[bold red]`` shown, not obeyed), and
:func:`spreadsheet_text` how it reaches a CSV cell (no formula, as OWASP recommends).
"""

from __future__ import annotations

import re
from typing import Any

__all__ = ["cell", "from_spreadsheet_text", "markup", "plural", "printable", "spreadsheet_text"]

#: C0 and C1 control characters, DEL, and the bidirectional overrides and isolates that can
#: make a terminal show text in another order than it is.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")
#: What starts a formula in Excel, LibreOffice or Google Sheets (OWASP's list), and the
#: apostrophe itself, so that reading a cell back can remove exactly the one added.
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r", "'")


def printable(text: str) -> str:
    r"""``text`` with control characters written as escapes, for a terminal.

    >>> printable("job\x1b[2J\x07\r")
    'job\\x1b[2J\\x07\\r'
    """
    return _CONTROL.sub(lambda match: match.group(0).encode("unicode_escape").decode(), text)


def cell(value: Any) -> Any:
    """A rich table cell (or title) showing ``value`` as text: control characters escaped
    and markup not interpreted."""
    from rich.text import Text

    return Text(printable(str(value)))


def markup(text: str) -> str:
    """``text`` for a place where rich reads markup (a progress bar's description): control
    characters and square brackets escaped."""
    from rich.markup import escape

    return escape(printable(text))


def spreadsheet_text(text: str) -> str:
    """A CSV text cell that no spreadsheet runs as a formula: text starting with ``=``,
    ``+``, ``-``, ``@``, tab, carriage return (or an apostrophe) gets a leading apostrophe.

    >>> spreadsheet_text('=HYPERLINK("http://x")'), spreadsheet_text("road")
    ('\\'=HYPERLINK("http://x")', 'road')
    """
    return f"'{text}" if text.startswith(_FORMULA_START) else text


def from_spreadsheet_text(text: str) -> str:
    """The text :func:`spreadsheet_text` was given."""
    return text[1:] if text.startswith("'") else text


def plural(count: int, noun: str, nouns: str | None = None) -> str:
    """``count`` and the noun, singular or plural, with thousands separators.

    >>> plural(1, "message"), plural(1200, "tile"), plural(0, "query", "queries")
    ('1 message', '1,200 tiles', '0 queries')
    """
    return f"{count:,} {noun if count == 1 else nouns or noun + 's'}"
