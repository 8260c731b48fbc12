"""TorchServePredictor: the HTTP client of the GPU fleet.

Two servers: a scripted stdlib HTTP server in a thread (fast, deterministic: it answers what a
test tells it, counts connections and overlapping requests) for the retry, split and refusal
rules, and the real TorchServe of the ``torchserve`` fixture for the wire protocol, the scores,
the worker path and ``chipscale run``.
"""

from __future__ import annotations

import contextlib
import io
import json
import random
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import free_port
from mercantile import Tile

from chipscale.cli import cli
from chipscale.errors import ChipscaleError, PartialPrediction, PredictorUnavailable
from chipscale.models.predictors import InProcessPredictor, open_predictor
from chipscale.models.torchserve_client import ModelChanged, TorchServePredictor
from chipscale.pipeline.messages import PackMessage
from chipscale.pipeline.process import process_pack
from chipscale.results import open_store
from chipscale.sources import read_tiles
from chipscale.sources.footprint import cover

ROOT = Path(__file__).resolve().parents[1]

# ----------------------------------------------------------------------------- scripted server

#: What the scripted server says about its model (the handler's metadata answer).
METADATA = {
    "model": "fake",
    "version": "1",
    "metadata": {
        "name": "fake",
        "version": "1",
        "classes": ["a", "b"],
        "bands": 3,
        "band_counts": [3],
        "tile_size": 4,
    },
}
NO_WORKER = {
    "code": 503,
    "type": "ServiceUnavailableException",
    "message": 'Model "fake" has no worker to serve inference request.',
}

#: An answer: status and a JSON-able body, or raw bytes (b"" for TorchServe's empty 413).
Answer = tuple[int, Any]


def tiles(n: int) -> np.ndarray:
    """``n`` tiny 3x4x4 tiles; tile ``i`` is filled with ``i`` so answers show their order."""
    return np.broadcast_to(np.arange(n, dtype=np.float32)[:, None, None, None], (n, 3, 4, 4)).copy()


def scores_of(batch: np.ndarray, **override: Any) -> Answer:
    """The 200 answer of the handler for ``batch``: row ``i`` is ``[v, -v]``, v its value."""
    values = batch[:, 0, 0, 0].astype(float)
    body = {
        "model": "fake",
        "version": "1",
        "classes": ["a", "b"],
        "scores": [[v, -v] for v in values],
        "batch": {"requests": 1, "tiles": len(batch)},
    }
    body.update(override)
    return 200, body


def expected(n: int) -> np.ndarray:
    values = np.arange(n, dtype=np.float32)
    return np.stack([values, -values], axis=1)


class ScriptedServer:
    """A keep-alive HTTP/1.1 server in a thread; ``script(tiles)`` answers each scoring
    request (metadata requests, an empty body, always get :data:`METADATA`).

    Records the tile values of every scoring request, the connections accepted and the most
    requests it was serving at one time.
    """

    def __init__(self, script: Callable[[np.ndarray], Answer], delay: float = 0.0) -> None:
        self.script, self.delay = script, delay
        self.requests: list[list[int]] = []  # tile values of each scoring request, in arrival
        self.metadata_requests = 0
        self.connections = 0
        self.sockets: list[socket.socket] = []
        self.active = self.max_active = 0
        self._lock = threading.Lock()
        self.http = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self.http.daemon_threads = True
        self.http.owner = self  # type: ignore[attr-defined]
        self.url = f"http://127.0.0.1:{self.http.server_address[1]}/predictions/fake"
        self._thread = threading.Thread(
            target=self.http.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )
        self._thread.start()

    def sizes(self) -> list[int]:
        return [len(r) for r in self.requests]

    @contextmanager
    def serving(self) -> Iterator[None]:
        with self._lock:
            self.active += 1
            self.max_active = max(self.max_active, self.active)
        try:
            yield
        finally:
            with self._lock:
                self.active -= 1

    def answer(self, body: bytes) -> Answer:
        if not body:
            with self._lock:
                self.metadata_requests += 1
            return 200, METADATA
        batch = np.load(io.BytesIO(body), allow_pickle=False)
        with self._lock:
            self.requests.append([int(v) for v in batch[:, 0, 0, 0]])
        if self.delay:
            time.sleep(self.delay)
        return self.script(batch)

    def stop(self) -> None:
        """Stop listening and drop the open keep-alive connections: a server gone."""
        self.http.shutdown()
        self.http.server_close()
        for sock in self.sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as TorchServe

    def setup(self) -> None:
        super().setup()
        # Headers and body go out in two writes: without this, Nagle's algorithm holds the
        # body for the client's delayed ACK (40 ms a request).
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        owner: ScriptedServer = self.server.owner  # type: ignore[attr-defined]
        with owner._lock:
            owner.connections += 1
            owner.sockets.append(self.connection)

    def do_POST(self) -> None:
        owner: ScriptedServer = self.server.owner  # type: ignore[attr-defined]
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        with owner.serving():
            status, payload = owner.answer(body)
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: Any) -> None:  # quiet
        pass


@pytest.fixture
def serve() -> Iterator[Callable[..., ScriptedServer]]:
    started: list[ScriptedServer] = []

    def start(script: Callable[[np.ndarray], Answer] = scores_of, delay: float = 0.0):
        started.append(ScriptedServer(script, delay))
        return started[-1]

    yield start
    for server in started:
        server.stop()


class Sleeps(list[float]):
    """An injected ``sleep`` that records the backoff delays instead of waiting."""

    def __call__(self, seconds: float) -> None:
        self.append(seconds)


@pytest.fixture
def sleeps() -> Sleeps:
    return Sleeps()


@pytest.fixture
def client(sleeps: Sleeps) -> Iterator[Callable[..., TorchServePredictor]]:
    opened: list[TorchServePredictor] = []

    def open_client(server: ScriptedServer | str, **kwargs: Any) -> TorchServePredictor:
        url = server if isinstance(server, str) else server.url
        kwargs.setdefault("sleep", sleeps)
        opened.append(TorchServePredictor(url, **kwargs))
        return opened[-1]

    yield open_client
    for predictor in opened:
        predictor.close()


def fail_first(count: int, answer: Answer) -> Callable[[np.ndarray], Answer]:
    """A script answering ``answer`` to the first ``count`` scoring requests, then scores."""
    seen = {"n": 0}

    def script(batch: np.ndarray) -> Answer:
        seen["n"] += 1
        return answer if seen["n"] <= count else scores_of(batch)

    return script


# ----------------------------------------------------------------------------- metadata


def test_info_comes_from_the_servers_metadata(serve, client) -> None:
    predictor = client(serve())
    assert predictor.info.name == "fake" and predictor.info.version == "1"
    assert predictor.info.classes == ("a", "b")
    assert predictor.metadata == METADATA["metadata"]
    assert (predictor.info.bands, predictor.info.tile_size, predictor.info.band_counts) == (
        3,
        4,
        (3,),
    )


def test_an_endpoint_that_is_not_chipscale_is_refused_clearly(serve, client, sleeps) -> None:
    server = serve()
    not_found = {"code": 404, "type": "ModelNotFoundException", "message": "Model not found: x"}
    server.answer = lambda body: (404, not_found)  # type: ignore[method-assign]
    with pytest.raises(ChipscaleError, match=r"not a chipscale TorchServe endpoint.*Model not"):
        client(server)
    assert sleeps == []  # a wrong URL is not retried at start

    server.answer = lambda body: (200, b"<html>hello</html>")  # type: ignore[method-assign]
    with pytest.raises(ChipscaleError, match=r"not a chipscale TorchServe endpoint.*<html>"):
        client(server)
    with pytest.raises(ChipscaleError, match="predictions/NAME"):
        client(server.url.replace("/predictions/fake", "/models"))


def test_a_refused_connection_is_retried_then_unavailable(client, sleeps) -> None:
    url = f"http://127.0.0.1:{free_port()}/predictions/fake"  # nothing listens there
    with pytest.raises(PredictorUnavailable, match=r"after 4 attempts.*(refused|NewConnection)"):
        client(url, retries=3)
    assert len(sleeps) == 3


def test_a_server_gone_in_mid_job_is_transient(serve, client) -> None:
    server = serve()
    predictor = client(server, retries=2)
    server.stop()
    with pytest.raises(PredictorUnavailable) as raised:
        predictor.predict(tiles(4))
    assert raised.value.permanent is False  # the worker re-raises: the pack is retried


# ----------------------------------------------------------------------------- requests


def test_requests_are_balanced_under_the_tile_and_byte_limits(serve, client) -> None:
    server = serve()
    predictor = client(server, tiles_per_request=32)
    np.testing.assert_array_equal(predictor.predict(tiles(33)), expected(33))
    assert sorted(server.sizes()) == [16, 17]  # not 32 + 1

    server.requests.clear()
    tile_bytes = tiles(1)[0].nbytes
    small = client(server, tiles_per_request=32, max_request_bytes=4096 + 3 * tile_bytes)
    np.testing.assert_array_equal(small.predict(tiles(9)), expected(9))
    assert server.sizes() == [3, 3, 3]
    assert small.predict(tiles(0)).shape == (0, 2)


def test_503_twice_then_200_is_retried_and_succeeds(serve, client, sleeps) -> None:
    server = serve(fail_first(2, (503, NO_WORKER)))
    predictor = client(server)
    np.testing.assert_array_equal(predictor.predict(tiles(5)), expected(5))
    assert server.sizes() == [5, 5, 5]
    assert len(sleeps) == 2


@pytest.mark.parametrize("status", [404, 408, 429, 500, 502])
def test_retryable_statuses_are_retried(serve, client, sleeps, status) -> None:
    """404 too while scoring: a fresh host answers it until its model is registered."""
    server = serve(fail_first(1, (status, {"error": "try again", "status": status})))
    np.testing.assert_array_equal(client(server).predict(tiles(3)), expected(3))
    assert len(server.requests) == 2 and len(sleeps) == 1


def test_retries_run_out_into_predictor_unavailable(serve, client, sleeps) -> None:
    server = serve(lambda batch: (503, NO_WORKER))
    predictor = client(server, retries=3)
    with pytest.raises(PredictorUnavailable, match=r"after 4 attempts; last: HTTP 503: Model"):
        predictor.predict(tiles(2))
    assert len(server.requests) == 4 and len(sleeps) == 3


class Ceiling(random.Random):
    """An injected rng whose "random" delay is always the ceiling: shows the growth."""

    def uniform(self, a: float, b: float) -> float:
        return b


def test_backoff_grows_exponentially_to_its_cap_with_full_jitter(serve, client, sleeps) -> None:
    server = serve(lambda batch: (503, NO_WORKER))
    settings = {"retries": 6, "backoff": 0.1, "backoff_max": 1.0}
    caps = [0.1, 0.2, 0.4, 0.8, 1.0, 1.0]
    with pytest.raises(PredictorUnavailable):
        client(server, rng=Ceiling(), **settings).predict(tiles(1))
    assert sleeps == pytest.approx(caps)

    jittered: list[list[float]] = []
    for seed in (1, 2):
        sleeps.clear()
        with pytest.raises(PredictorUnavailable):
            client(server, rng=random.Random(seed), **settings).predict(tiles(1))
        assert all(0 <= s <= cap for s, cap in zip(sleeps, caps, strict=True))
        jittered.append(list(sleeps))
    assert jittered[0] != jittered[1]  # random, so many clients do not retry in step
    assert all(s < cap for s, cap in zip(jittered[0], caps, strict=True))


def test_real_sleeps_are_taken_between_attempts(serve, client) -> None:
    server = serve(fail_first(2, (503, NO_WORKER)))
    predictor = client(server, sleep=time.sleep, rng=Ceiling(), backoff=0.1)
    started = time.perf_counter()
    predictor.predict(tiles(1))
    assert time.perf_counter() - started >= 0.3  # 0.1 + 0.2


def test_413_splits_the_request_in_halves(serve, client) -> None:
    server = serve(lambda batch: (413, b"") if len(batch) > 4 else scores_of(batch))
    predictor = client(server, tiles_per_request=8)
    np.testing.assert_array_equal(predictor.predict(tiles(8)), expected(8))
    assert server.requests[0] == list(range(8))
    assert sorted(server.requests[1:]) == [[0, 1, 2, 3], [4, 5, 6, 7]]


def test_out_of_memory_splits_the_request_then_a_single_tile_is_transient(
    serve, client, sleeps
) -> None:
    """507: the handler ran out of memory; the same request again would too, so it is split;
    one tile still out of memory is a busy GPU, not a bad tile: the pack goes back."""
    oom = (507, {"error": "out of memory running the model, retry smaller", "status": 507})
    server = serve(lambda batch: oom if len(batch) > 2 else scores_of(batch))
    np.testing.assert_array_equal(
        client(server, tiles_per_request=8).predict(tiles(8)), expected(8)
    )
    assert sorted(server.sizes(), reverse=True) == [8, 4, 4, 2, 2, 2, 2]
    assert sleeps == []  # split at once, not retried as it was

    always = serve(lambda batch: oom)
    with pytest.raises(PredictorUnavailable, match="out of memory on a single tile"):
        client(always, tiles_per_request=2).predict(tiles(2))


def test_a_deadline_bounds_the_call_retries_included(serve, client) -> None:
    """A hung host: each attempt is cut to the time left, then the pack fails alone, long
    before retries x read_timeout (here 5 x 20 s) would have run out."""
    server = serve(delay=2.0)
    predictor = client(server, read_timeout=20.0)
    with pytest.raises(PredictorUnavailable, match="before the deadline"):
        predictor.predict(tiles(1), deadline=time.monotonic() + 0.5)
    assert len(server.requests) == 1  # no time left for a second attempt


def test_a_single_tile_still_too_large_is_refused(serve, client) -> None:
    server = serve(lambda b: (413, b"") if len(b) > 1 or b[0, 0, 0, 0] == 2 else scores_of(b))
    predictor = client(server, tiles_per_request=4)
    with pytest.raises(PartialPrediction) as raised:
        predictor.predict(tiles(4))
    assert list(raised.value.failed) == [2]
    assert "413" in raised.value.failed[2] and "max_request_size" in raised.value.failed[2]
    got = raised.value.scores
    assert np.isnan(got[2]).all()
    np.testing.assert_array_equal(np.delete(got, 2, axis=0), np.delete(expected(4), 2, axis=0))


@pytest.mark.parametrize(
    ("status", "message"),
    [
        (400, "the body is not a .npy file (numpy.save of the tile array)"),
        (422, "model 'fake' takes 3 bands, got 5 (batch (3, 5, 4, 4))"),
    ],
)
def test_a_client_error_refuses_only_its_requests_tiles(
    serve, client, sleeps, status, message
) -> None:
    def script(batch: np.ndarray) -> Answer:
        if batch[0, 0, 0, 0] == 3:  # the second request: tiles 3, 4, 5
            return status, {"error": message, "status": status}
        return scores_of(batch)

    server = serve(script)
    predictor = client(server, tiles_per_request=3)
    with pytest.raises(PartialPrediction) as raised:
        predictor.predict(tiles(9))
    refused = raised.value
    assert set(refused.failed) == {3, 4, 5}
    assert all(f"HTTP {status}" in r and message in r for r in refused.failed.values())
    assert np.isnan(refused.scores[3:6]).all()
    keep = [0, 1, 2, 6, 7, 8]
    np.testing.assert_array_equal(refused.scores[keep], expected(9)[keep])
    assert len(server.requests) == 3 and sleeps == []  # a 4xx is never retried


def test_requests_really_overlap(serve, client) -> None:
    server = serve(delay=0.3)
    predictor = client(server, tiles_per_request=2, concurrency=4)
    np.testing.assert_array_equal(predictor.predict(tiles(16)), expected(16))
    assert len(server.requests) == 8
    assert server.max_active == 4  # concurrency, never more


def test_connections_are_kept_alive_and_reused(serve, client) -> None:
    server = serve()
    predictor = client(server, tiles_per_request=1, concurrency=2)
    for _ in range(3):
        np.testing.assert_array_equal(predictor.predict(tiles(8)), expected(8))
    assert len(server.requests) + server.metadata_requests == 25
    assert server.connections <= 2


def test_predict_from_several_threads_shares_the_pool(serve, client) -> None:
    server = serve(delay=0.05)
    predictor = client(server, tiles_per_request=2, concurrency=3)
    results: list[np.ndarray] = []

    def work() -> None:
        results.append(predictor.predict(tiles(10)))

    threads = [threading.Thread(target=work) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 4
    for result in results:
        np.testing.assert_array_equal(result, expected(10))
    assert server.max_active <= 3 and server.connections <= 3


# ----------------------------------------------------------------------------- answers


def test_a_wrong_row_count_is_an_error(serve, client) -> None:
    server = serve(lambda batch: scores_of(batch[:-1]))
    with pytest.raises(ChipscaleError, match=r"shape \(2, 2\) for 3 tiles, expected \(3, 2\)"):
        client(server).predict(tiles(3))


def test_an_answer_that_is_not_scores_is_an_error(serve, client) -> None:
    server = serve(lambda batch: (200, b"<html>proxy</html>"))
    with pytest.raises(ChipscaleError, match=r"200 without scores.*proxy"):
        client(server).predict(tiles(3))
    server.script = lambda batch: scores_of(batch, scores=[["x", None]] * len(batch))
    with pytest.raises(ChipscaleError, match="not a table of numbers"):
        client(server).predict(tiles(3))


def test_a_model_swapped_under_the_job_raises_naming_both_versions(serve, client) -> None:
    # Transient: while hosts roll to a new model, the pack goes back to the queue; error rows
    # would lose tiles an old-model host can still score.
    assert issubclass(ModelChanged, PredictorUnavailable)
    server = serve(lambda batch: scores_of(batch, version="2"))
    with pytest.raises(ModelChanged, match=r"version '2'.*started with 'fake' version '1'"):
        client(server).predict(tiles(3))
    server.script = lambda batch: scores_of(batch, classes=["b", "a"])
    with pytest.raises(ModelChanged, match=r"classes \['b', 'a'\], expected \['a', 'b'\]"):
        client(server).predict(tiles(3))


def test_close_stops_the_pool_and_is_idempotent(serve) -> None:
    server = serve()
    with TorchServePredictor(server.url) as predictor:
        predictor.predict(tiles(2))
    predictor.close()
    with pytest.raises(ChipscaleError, match="closed"):
        predictor.predict(tiles(2))
    assert not [t for t in threading.enumerate() if t.name.startswith("torchserve")]


# ----------------------------------------------------------------------------- real TorchServe


@pytest.fixture(scope="module")
def in_process(demo_model_file: Path) -> Iterator[InProcessPredictor]:
    with InProcessPredictor(demo_model_file) as predictor:
        yield predictor


@pytest.fixture(scope="module")
def remote(torchserve: Any) -> Iterator[TorchServePredictor]:
    predictor = open_predictor(torchserve.predictions_url)
    assert isinstance(predictor, TorchServePredictor)
    yield predictor
    predictor.close()


def real_tiles(aerial: Path, zoom: int) -> np.ndarray:
    images = read_tiles(str(aerial), cover(zoom, source=str(aerial)))
    return np.stack([image.data for _, image in images if not image.is_empty])


def test_metadata_of_the_real_server(remote, in_process) -> None:
    assert remote.info == in_process.info
    assert remote.info.classes == ("snow", "forest", "bare_ground", "road")


@pytest.mark.parametrize("zoom", [19, 20])
def test_scores_through_torchserve_equal_in_process(remote, in_process, aerial, zoom) -> None:
    batch = real_tiles(aerial, zoom)
    assert batch.dtype == np.uint8 and len(batch) >= 50
    got = remote.predict(batch)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, in_process.predict(batch), atol=1e-5, rtol=0)


def test_five_band_tiles_are_refused_alone(torchserve, in_process, aerial) -> None:
    """A pack of 5-band tiles (two requests) beside a good pack sent at the same time: only
    the 5-band tiles are refused, with TorchServe's 422 reason; the good pack is scored."""
    good = real_tiles(aerial, 19)[:16]
    bad = np.concatenate([good[:8], good[:8, :2]], axis=1)  # 5 bands
    outcome: dict[str, Any] = {}
    with TorchServePredictor(torchserve.predictions_url, tiles_per_request=4) as predictor:
        start = threading.Barrier(2)

        def send(name: str, batch: np.ndarray) -> None:
            start.wait()
            try:
                outcome[name] = predictor.predict(batch)
            except Exception as exc:
                outcome[name] = exc

        threads = [
            threading.Thread(target=send, args=args) for args in (("bad", bad), ("good", good))
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    refused = outcome["bad"]
    assert isinstance(refused, PartialPrediction)
    assert set(refused.failed) == set(range(8)) and np.isnan(refused.scores).all()
    assert all("HTTP 422" in r and "got 5" in r for r in refused.failed.values())
    np.testing.assert_allclose(outcome["good"], in_process.predict(good), atol=1e-5, rtol=0)


def test_opening_an_endpoint_imports_no_torch(torchserve) -> None:
    """The Lambda bundle has no torch: the client path must not need it."""
    code = (
        "import sys, chipscale.models.torchserve_client\n"
        "from chipscale.models.predictors import open_predictor\n"
        f"p = open_predictor({torchserve.predictions_url!r}, threads=3, device='cuda')\n"
        "p.predict(__import__('numpy').zeros((1, 3, 256, 256), 'uint8')); p.close()\n"
        "bad = {'torch', 'model_server'} & {m.split('.')[0] for m in sys.modules}\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=120)


FAR_AWAY = Tile(0, 0, 19)  # a valid tile that misses the image: empty, never sent


def test_the_worker_through_torchserve_stores_what_in_process_does(
    remote, in_process, aerial, tmp_path
) -> None:
    pack = (*cover(19, source=str(aerial)), FAR_AWAY)
    with open_store(f"sqlite:///{tmp_path}/results.db") as store:
        for job, predictor in (("remote", remote), ("local", in_process)):
            message = PackMessage(job=job, source=str(aerial), tiles=pack)
            outcome = process_pack(message, predictor=predictor, store=store)
            assert outcome.error == 0 and outcome.ok >= 50 and outcome.empty >= 1
        rows = {job: list(store.iter_results(job)) for job in ("remote", "local")}
    assert len(rows["remote"]) == len(rows["local"]) == len(pack)
    for got, want in zip(rows["remote"], rows["local"], strict=True):
        assert (got.x, got.y, got.status) == (want.x, want.y, want.status)
        assert got.error is None and (got.model_name, got.model_version) == ("demo-landcover", "1")
        if want.status == "ok":
            assert got.output.keys() == want.output.keys()
            for name, value in want.output.items():
                assert got.output[name] == pytest.approx(value, abs=1e-5)


def test_chipscale_run_with_a_torchserve_url(torchserve, aerial, tmp_path) -> None:
    out = tmp_path / "out"
    args = ["run", "--source", str(aerial), "--zoom", "19", "--out", str(out), "--no-preview"]
    result = CliRunner().invoke(cli, [*args, "--model", torchserve.predictions_url])
    assert result.exit_code == 0, result.output
    with open_store(f"sqlite:///{out / 'results.db'}") as store:
        rows = list(store.iter_results())
    assert {(r.x, r.y, r.z) for r in rows} == set(cover(19, source=str(aerial)))
    assert {r.status for r in rows} <= {"ok", "empty"}
    assert sum(r.status == "ok" for r in rows) >= 50
    assert {r.model_name for r in rows} == {"demo-landcover"}
    assert (out / "results.csv").is_file()
