"""Leaving as a Unix tool does when the reader of its output has gone.

``chipscale cover ... | head -1``: once ``head`` exits, the next write to stdout fails with
EPIPE. The convention (``yes | head``, every coreutils tool) is to die by SIGPIPE, quietly:
the shell shows status 141. The command line cannot simply restore SIGPIPE's default action
at start, as a C program does, because then a closed *socket* (a model server, a database)
would kill the process silently too; so a BrokenPipeError is turned into that death only
when stdout or stderr is a pipe whose reader is gone.
"""

from __future__ import annotations

import os
import select
import signal
import sys
from typing import Any, NoReturn

#: The exit status a shell shows for a process killed by SIGPIPE.
SIGPIPE_STATUS = 128 + 13


def reader_gone() -> bool:
    """Whether stdout or stderr is a pipe nobody reads any more (poll reports an error)."""
    if not hasattr(select, "poll"):
        return False
    poller = select.poll()
    for stream in (sys.stdout, sys.stderr):
        try:
            poller.register(stream.fileno(), select.POLLOUT)
        except (AttributeError, ValueError, OSError):  # no real file (a test runner's buffer)
            continue
    return any(event & (select.POLLERR | select.POLLHUP) for _, event in poller.poll(0))


def die_of_sigpipe() -> NoReturn:
    """End the process as SIGPIPE's default action does, saying nothing.

    stdout and stderr are pointed at the null device first, so that nothing (Python's
    final flush of buffered output included) complains about the broken pipe.
    """
    devnull = os.open(os.devnull, os.O_WRONLY)
    for fd in (1, 2):
        os.dup2(devnull, fd)
    if hasattr(signal, "SIGPIPE"):
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGPIPE)
    sys.exit(SIGPIPE_STATUS)  # where the signal is missing (Windows) or blocked


def stdout_console(**options: Any) -> Any:
    """A rich Console on stdout that dies of SIGPIPE when its reader has gone, as the rest of
    the command line does (rich's own ``on_broken_pipe`` exits 1)."""
    from rich.console import Console

    class _Console(Console):
        def on_broken_pipe(self) -> None:
            die_of_sigpipe()

    return _Console(**options)
