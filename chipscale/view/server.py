"""``chipscale view``'s local web server: the page, its map library, the imagery tiles and the
overlay's JSON, all from one process (the standard library's HTTP server).

Routes (every ``job`` is a query parameter):

- ``/`` the page; ``/static/...`` its script, style and the vendored Leaflet;
- ``/api/jobs``: the store's jobs and the one to show first;
- ``/api/job?job=J``: the job's summary (counts, progress, classes, extent) and whether its
  imagery reads;
- ``/api/overlay/Z/X/Y?job=J``: map tile ``Z/X/Y``'s result tiles, cells or features
  (:class:`chipscale.view.overlay.Overlay`);
- ``/api/tile?job=J&z=Z&x=X&y=Y``: one result tile's scores, status, error and assets;
- ``/imagery/Z/X/Y.png?job=J``: the imagery as a PNG, or 204 (no content) where the source
  has no pixel.

Requests run on a fixed pool of threads (each keeps its own tile readers). A failure answers
that one request with a one-line error (JSON ``{"error": ...}`` or text for imagery); the
server keeps serving.
"""

from __future__ import annotations

import contextlib
import logging
import mimetypes
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import orjson

from chipscale.errors import ChipscaleError, InvalidTileError, one_line
from chipscale.redaction import scrub
from chipscale.results.base import ResultStore
from chipscale.view.imagery import Imagery, ImageryError
from chipscale.view.overlay import Overlay, UnknownJob

log = logging.getLogger(__name__)

STATIC = Path(__file__).parent / "static"
#: Names and addresses of the loopback interface (the Host headers a local server accepts).
LOOPBACK = frozenset({"127.0.0.1", "localhost", "::1"})
#: Worker threads answering requests (the browser opens about six connections at once).
WORKERS = 8

_TILE_PATH = re.compile(
    r"^/(imagery|api/overlay)/(\d{1,2})/(\d{1,10})/(\d{1,10})(?:\.png|\.json)?$"
)


class BadRequest(ChipscaleError):
    """A request the page would not make: a missing or malformed parameter."""


class ViewApp:
    """What the server answers from: one results store, its jobs, their imagery."""

    def __init__(
        self, store: ResultStore, *, job: str | None = None, source: str | None = None
    ) -> None:
        self.store = store
        self.overlay = Overlay(store)
        self.imagery = Imagery()
        self.source = source
        self.default_job = job

    def warm(self) -> str | None:
        """Pay the start-up costs before the URL is printed, not on the page's first
        requests: importing the raster libraries (seconds on a busy machine), the first job's
        view and first count (started), its imagery's first open. An unknown ``--job`` is
        :class:`~chipscale.view.overlay.UnknownJob` here. Returns why the first job's imagery
        cannot be read, or None."""
        import chipscale.sources  # noqa: F401

        job = self.jobs()["job"]
        if job is None:
            return None
        self.overlay.job(job)
        return self.imagery.check(self.source_of(job))

    def jobs(self) -> dict[str, Any]:
        names = [info.job for info in self.store.jobs()]
        default = self.default_job or (names[-1] if names else None)
        return {"jobs": names, "job": default, "store": self.store.url}

    def source_of(self, job: str | None) -> str:
        if self.source:
            return self.source
        if not job:
            raise BadRequest("no job given, and no --source to show")
        return self.overlay.job(job).info.source

    def job(self, job: str) -> dict[str, Any]:
        summary = dict(self.overlay.summary(job))
        source = self.source_of(job)
        summary["imagery"] = {"source": source, "error": self.imagery.check(source)}
        return summary

    def close(self) -> None:
        self.overlay.close()
        self.imagery.close()


class Handler(BaseHTTPRequestHandler):
    """One request: routed by path, answered in JSON, PNG or a static file."""

    server: ViewServer
    server_version = "chipscale-view"

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s %s", self.address_string(), format % args)

    def do_GET(self) -> None:
        try:
            self._route()
        except (BadRequest, InvalidTileError) as exc:
            self._json({"error": one_line(exc)}, HTTPStatus.BAD_REQUEST)
        except UnknownJob as exc:
            self._json({"error": one_line(exc)}, HTTPStatus.NOT_FOUND)
        except ImageryError as exc:
            self._text(scrub(one_line(exc)), HTTPStatus.BAD_GATEWAY)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the browser cancelled the request (a pan): nobody to answer
        except Exception as exc:  # one request failed; the server keeps serving
            log.warning("%s failed: %s", self.path, one_line(exc), exc_info=True)
            with contextlib.suppress(OSError):
                self._json({"error": scrub(one_line(exc))}, HTTPStatus.INTERNAL_SERVER_ERROR)

    def _route(self) -> None:
        app = self.server.app
        if not self.server.host_allowed(self.headers.get("Host", "")):
            # A page of another site that renamed itself to 127.0.0.1 (DNS rebinding) sends
            # its own name: the job's results are not its to read.
            self._json({"error": "unknown Host header"}, HTTPStatus.FORBIDDEN)
            return
        url = urlsplit(self.path)
        query = {key: values[-1] for key, values in parse_qs(url.query).items()}
        path = url.path
        if path in ("/", "/index.html"):
            self._file(STATIC / "index.html")
        elif path.startswith("/static/"):
            self._static(path[len("/static/") :])
        elif path == "/api/jobs":
            self._json(app.jobs())
        elif path == "/api/job":
            self._json(app.job(_job(query)))
        elif path == "/api/tile":
            job = _job(query)
            z, x, y = (_int(query, key) for key in ("z", "x", "y"))
            found = app.overlay.tile(job, z, x, y)
            if found is None:
                self._json({"error": f"no result for tile {z}/{x}/{y}"}, HTTPStatus.NOT_FOUND)
            else:
                self._json(found)
        elif match := _TILE_PATH.match(path):
            kind, z, x, y = match.group(1), *(int(v) for v in match.groups()[1:])
            _check_tile(z, x, y)
            if kind == "imagery":
                png = app.imagery.png(app.source_of(query.get("job")), z, x, y)
                if png is None:
                    self._send(HTTPStatus.NO_CONTENT, b"", "image/png", cache=True)
                else:
                    self._send(HTTPStatus.OK, png, "image/png", cache=True)
            else:
                self._json(app.overlay.map_tile(_job(query), z, x, y))
        else:
            self._json({"error": f"no such page: {url.path}"}, HTTPStatus.NOT_FOUND)

    def _static(self, relative: str) -> None:
        target = (STATIC / relative).resolve()
        if not target.is_relative_to(STATIC.resolve()) or not target.is_file():
            self._json({"error": f"no such file: {relative}"}, HTTPStatus.NOT_FOUND)
            return
        self._file(target)

    def _file(self, path: Path) -> None:
        kind = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        if kind.startswith("text/") or kind.endswith("javascript"):
            kind += "; charset=utf-8"
        self._send(HTTPStatus.OK, path.read_bytes(), kind)

    def _json(self, value: Any, status: HTTPStatus = HTTPStatus.OK) -> None:
        self._send(status, orjson.dumps(value), "application/json")

    def _text(self, text: str, status: HTTPStatus) -> None:
        self._send(status, text.encode() + b"\n", "text/plain; charset=utf-8")

    def _send(self, status: HTTPStatus, body: bytes, kind: str, *, cache: bool = False) -> None:
        self.send_response(status)
        if status != HTTPStatus.NO_CONTENT:
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
        # Imagery is kept a few minutes: a restart with another --source shows soon enough.
        self.send_header("Cache-Control", "private, max-age=300" if cache else "no-store")
        self.end_headers()
        if body:
            self.wfile.write(body)


def _job(query: dict[str, str]) -> str:
    job = query.get("job")
    if not job:
        raise BadRequest("give the job: ?job=NAME")
    return job


def _int(query: dict[str, str], key: str) -> int:
    try:
        return int(query[key])
    except (KeyError, ValueError):
        raise BadRequest(f"give {key} as an integer") from None


def _check_tile(z: int, x: int, y: int) -> None:
    if not (z <= 30 and x < 2**z and y < 2**z):
        raise InvalidTileError(f"tile {z}/{x}/{y} is not on the web-mercator grid")


class ViewServer(ThreadingHTTPServer):
    """The viewer's HTTP server: requests on a fixed pool of :data:`WORKERS` threads, so each
    thread's tile readers are reused (a thread per request would open a reader each time)."""

    daemon_threads = True

    def __init__(self, app: ViewApp, host: str = "127.0.0.1", port: int = 0) -> None:
        # Before binding: a failed bind calls server_close, which needs them.
        self.app = app
        self._pool = ThreadPoolExecutor(WORKERS, thread_name_prefix="chipscale-view")
        self._thread: threading.Thread | None = None
        super().__init__((host, port), Handler)

    @property
    def url(self) -> str:
        address, port = self.server_address[:2]
        host = address.decode() if isinstance(address, bytes) else str(address)
        shown = f"[{host}]" if ":" in host else host
        return f"http://{shown}:{port}/"

    def host_allowed(self, header: str) -> bool:
        """Whether a request's Host header names this server: any name when it listens on
        another address than loopback (the user chose to share it), else only a loopback
        name or address."""
        address = self.server_address[0]
        address = address.decode() if isinstance(address, bytes) else str(address)
        if address not in LOOPBACK:
            return True
        name = urlsplit(f"//{header}").hostname or ""
        return name in LOOPBACK

    def process_request(self, request: Any, client_address: Any) -> None:
        self._pool.submit(self.process_request_thread, request, client_address)

    def start(self) -> ViewServer:
        """Serve from a background thread (tests, the bench); :meth:`stop` ends it."""
        self._thread = threading.Thread(target=self.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving, wait for the requests in flight, close the readers."""
        self.shutdown()
        self.server_close()

    def server_close(self) -> None:
        super().server_close()
        self._pool.shutdown(wait=True, cancel_futures=True)
        self.app.close()
