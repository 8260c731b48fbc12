"""Files that appear whole or not at all, and never over what a command reads.

Every output chipscale writes (tile lists, exports, previews, debug tiles) goes through a
temporary file in the target's folder and is renamed over the target only when writing
succeeded, so an error or Ctrl-C never leaves half a file where a finished one is expected.
:func:`refuse_overwrite` stops an output that is the command's own input or results store
before any work.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import IO, Any

from chipscale.errors import OutputError


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
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
    except OSError as exc:
        raise _unwritable(target, exc) from exc
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes it private; outputs are meant to be shared
    try:
        with os.fdopen(fd, mode, **open_kwargs) as handle:
            yield handle
        try:
            os.replace(tmp, target)
        except OSError as exc:
            raise _unwritable(target, exc) from exc
    except BaseException:
        with suppress(OSError):
            os.unlink(tmp)
        raise


def _unwritable(target: Path, exc: OSError) -> OutputError:
    """Why ``target`` cannot be written, in one line (not ``[Errno 17] File exists``)."""
    if isinstance(exc, FileExistsError | NotADirectoryError):
        folder = next((p for p in target.parents if p.exists() and not p.is_dir()), target.parent)
        why = f"{str(folder)!r} is a file, not a folder"
    elif isinstance(exc, IsADirectoryError):
        why = "it is a folder"
    else:
        why = exc.strerror or type(exc).__name__
    return OutputError(f"cannot write {str(target)!r}: {why}")


PathLike = str | os.PathLike[str]


def refuse_overwrite(
    outputs: Iterable[PathLike], *, store: Iterable[PathLike] = (), inputs: Iterable[PathLike] = ()
) -> None:
    """:class:`OutputError` when an output is one of the files of the results ``store`` (see
    :func:`chipscale.results.store_files`) or one of the ``inputs``; call it before any work.

    Paths are compared resolved (relative or absolute, ``./`` and ``..``, symlinks) and, for
    files that exist, by device and inode (hard links), so no spelling gets past.
    """
    protected = [(Path(p), "the results store") for p in store]
    protected += [(Path(p), "the input") for p in inputs]
    for output in outputs:
        for path, what in protected:
            if _same_file(Path(output), path):
                raise OutputError(f"refusing to write {output}: it is {what} {path}")


def _same_file(a: Path, b: Path) -> bool:
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist (yet)
        return False
