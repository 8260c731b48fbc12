"""Files that appear whole or not at all.

Every output chipscale writes (tile lists, exports, previews, debug tiles) goes through a
temporary file in the target's folder and is renamed over the target only when writing
succeeded, so an error or Ctrl-C never leaves half a file where a finished one is expected.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import IO, Any


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


#: Read once at import: os.umask can only be read by setting it, which is not thread-safe.
_UMASK = _read_umask()


@contextmanager
def atomic_write(
    path: str | os.PathLike[str], mode: str = "w", **open_kwargs: Any
) -> Iterator[IO[Any]]:
    """Open a temporary file beside ``path`` (creating its folder) and rename it over
    ``path`` when the block succeeds; on failure the temporary file is removed.

    ``mode`` is ``"w"`` or ``"wb"``; ``open_kwargs`` go to :func:`os.fdopen` (encoding,
    newline).
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes it private; outputs are meant to be shared
    try:
        with os.fdopen(fd, mode, **open_kwargs) as handle:
            yield handle
        os.replace(tmp, target)
    except BaseException:
        with suppress(OSError):
            os.unlink(tmp)
        raise
