"""The TorchServe side, against real TorchServe: packaging, the handler's per-request answers
inside one TorchServe batch, the deployed config.properties, and a restart in mid-run."""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
import urllib3
import yaml
from click.testing import CliRunner
from conftest import free_port, start_torchserve

from chipscale.cli import cli
from chipscale.errors import ModelFormatError
from chipscale.models.predictors import open_predictor
from chipscale.models.serving import CONFIG_PROPERTIES, ServingConfig, ServingError, package_model
from chipscale.pipeline.runner import run_local
from chipscale.results import open_store
from chipscale.sources.footprint import cover
from model_server.chipscale_runtime import ModelMetadata, Scaling, save_torchscript

POISON = 1.0e6  # a pixel value that makes the poison model raise


def npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def post(http: urllib3.PoolManager, url: str, body: bytes) -> tuple[int, dict | None]:
    answer = http.request(
        "POST", url, body=body, headers={"Content-Type": "application/octet-stream"}
    )
    try:
        return answer.status, json.loads(answer.data) if answer.data else None
    except ValueError:
        return answer.status, None


def pickled_npy() -> bytes:
    """A .npy of Python objects: loading it would unpickle, which the handler refuses."""
    buf = io.BytesIO()
    np.save(buf, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    return buf.getvalue()


class PoisonModel(torch.nn.Module):
    """Mean brightness classifier that raises on a poison pixel: a model bug on some input."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if bool((x >= 1.0e6).any()):  # POISON
            raise RuntimeError("poison pixel")
        m = x.mean(dim=(1, 2, 3)).unsqueeze(1) / 255.0
        return torch.cat([m, 1.0 - m], dim=1)


@pytest.fixture(scope="module")
def poison_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    meta = ModelMetadata(
        name="poison",
        version="1",
        classes=("bright", "dark"),
        bands=3,
        tile_size=256,
        scaling=Scaling.none(),
    )
    path = tmp_path_factory.mktemp("poison") / "poison.pt"
    return save_torchscript(torch.jit.script(PoisonModel()), path, meta)


@pytest.fixture(scope="module")
def slow_batcher(poison_model: Path, tmp_path_factory: pytest.TempPathFactory):
    """TorchServe holding requests up to 3 s to fill a batch of 8: requests sent together
    share one handler call, which each answer's ``batch`` reports."""
    out = tmp_path_factory.mktemp("slowmar")
    mar = package_model(
        poison_model, out, config=ServingConfig(batch_size=8, max_batch_delay_ms=3000)
    )
    server = start_torchserve(mar, tmp_path_factory.mktemp("slowts"))
    yield server
    server.stop()


def max_request_size() -> int:
    return int(CONFIG_PROPERTIES.read_text().split("max_request_size=")[1].split()[0])


# ----------------------------------------------------------------------------- packaging


def test_package_holds_handler_runtime_model_and_config(demo_model_file, tmp_path) -> None:
    config = ServingConfig(batch_size=6, max_batch_delay_ms=15, workers=2, sub_batch=48)
    mar = package_model(demo_model_file, tmp_path, config=config)
    assert mar.name == "demo-landcover.mar"
    with zipfile.ZipFile(mar) as z:
        names = set(z.namelist())
        assert {"chipscale_handler.py", "chipscale_runtime.py", "demo-landcover.pt"} <= names
        manifest = json.loads(z.read("MAR-INF/MANIFEST.json"))
        model_config = yaml.safe_load(z.read("model-config.yaml"))
    assert manifest["model"]["modelName"] == "demo-landcover"
    assert manifest["model"]["modelVersion"] == "1"  # from the file's metadata
    assert model_config == {
        "minWorkers": 2,
        "maxWorkers": 2,
        "batchSize": 6,
        "maxBatchDelay": 15,
        "responseTimeout": 120,
        "handler": {"sub_batch": 48, "threads": 1},
    }
    with pytest.raises(ServingError, match="exists"):
        package_model(demo_model_file, tmp_path)


def test_package_flags_only_fill_gaps(demo_model_file, tmp_path) -> None:
    with pytest.raises(ModelFormatError, match="source of truth"):
        package_model(demo_model_file, tmp_path, name="renamed")
    with pytest.raises(ModelFormatError, match="source of truth"):
        package_model(demo_model_file, tmp_path, version="7")
    assert package_model(demo_model_file, tmp_path, name="demo-landcover").is_file()


def test_package_refuses_a_checkpoint(tmp_path) -> None:
    state = tmp_path / "weights.pt"
    torch.save(torch.nn.Linear(2, 2).state_dict(), state)
    with pytest.raises(ModelFormatError, match="export"):
        package_model(state, tmp_path)


def test_cli_model_package(demo_model_file, tmp_path) -> None:
    result = CliRunner().invoke(
        cli,
        ["model", "package", str(demo_model_file), "-o", str(tmp_path), "--batch-size", "16"],
    )
    assert result.exit_code == 0, result.output
    assert (tmp_path / "demo-landcover.mar").is_file()
    assert "batchSize: 16" in result.output
    again = CliRunner().invoke(cli, ["model", "package", str(demo_model_file), "--name", "x"])
    assert again.exit_code == 1
    assert "flags only fill gaps" in again.output


# ----------------------------------------------------------------------------- config


def test_torchserve_runs_with_the_gpu_hosts_config_file(torchserve) -> None:
    """The file the fixture starts TorchServe with is model_server/config.properties, and its
    settings are in force: no token, Prometheus metrics, requests above TorchServe's 6.5 MB
    default accepted."""
    assert torchserve.config_file == CONFIG_PROPERTIES
    group = [p for p in psutil.process_iter(["cmdline"]) if p.info["cmdline"]]
    launcher = psutil.Process(torchserve.process.pid)
    assert str(CONFIG_PROPERTIES) in launcher.cmdline()
    assert any(str(CONFIG_PROPERTIES) in " ".join(p.info["cmdline"]) for p in group)
    http = urllib3.PoolManager()
    big = np.random.default_rng(0).integers(0, 255, (40, 3, 256, 256), dtype=np.uint8)
    assert len(npy(big)) > 6_553_500
    status, answer = post(http, torchserve.predictions_url, npy(big))  # no Authorization
    assert status == 200, answer
    assert len(answer["scores"]) == 40
    metrics = http.request("GET", f"{torchserve.metrics_url}/metrics")
    assert metrics.status == 200
    assert b"# TYPE" in metrics.data  # prometheus mode; "log" mode answers an empty body


def test_config_properties_documents_why_auth_is_off() -> None:
    text = CONFIG_PROPERTIES.read_text()
    assert "disable_token_authorization=true" in text
    auth_comment = text.split("disable_token_authorization")[0].rsplit("\n\n", 1)[-1]
    assert "private" in auth_comment and "VPC" in auth_comment
    assert (
        max_request_size() > 100 * 4 * 256 * 256 * 4
    )  # the biggest pack: 100 tiles x 4 bands float32


def test_metadata_request(torchserve) -> None:
    status, answer = post(urllib3.PoolManager(), torchserve.predictions_url, b"")
    assert status == 200
    assert answer["metadata"]["classes"] == ["snow", "forest", "bare_ground", "road"]
    assert answer["metadata"]["tile_size"] == 256


# ----------------------------------------------------------------------------- one batch


def test_bad_requests_are_answered_alone_inside_a_shared_batch(slow_batcher) -> None:
    """Good, malformed, misfit and poison requests sent together land in one TorchServe batch
    (the handler reports it); each bad one gets its own clear 4xx/5xx, the good ones their
    scores; an oversize request is refused by TorchServe without touching the others."""
    rng = np.random.default_rng(1)
    good = [rng.integers(0, 255, (n, 3, 256, 256)).astype(np.float32) for n in (1, 2, 3)]
    poison = good[1].copy()
    poison[0, 0, 0, 0] = POISON
    oversize = b"\x93NUMPY" + b"\0" * (max_request_size() + 1024)
    bodies = {
        "good0": npy(good[0]),
        "good1": npy(good[1]),
        "good2": npy(good[2]),
        "malformed": b"this is not a npy file",
        "pickled": pickled_npy(),
        "five_bands": npy(np.zeros((2, 5, 256, 256), np.float32)),
        "poison": npy(poison),
        "oversize": oversize,
    }
    http = urllib3.PoolManager(maxsize=len(bodies))
    answers: dict[str, tuple[int, dict | None]] = {}

    def send(key: str) -> None:
        answers[key] = post(http, slow_batcher.predictions_url, bodies[key])

    threads = [threading.Thread(target=send, args=(k,)) for k in bodies]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)

    for i, key in enumerate(("good0", "good1", "good2")):
        status, answer = answers[key]
        assert status == 200, answer
        assert len(answer["scores"]) == len(good[i])
        expected = good[i].mean(axis=(1, 2, 3)) / 255.0
        np.testing.assert_allclose([row[0] for row in answer["scores"]], expected, rtol=1e-5)
        # Seven requests reached the handler together (the oversize one never did).
        assert answer["batch"]["requests"] == 7, answer["batch"]
    assert answers["malformed"][0] == 400
    assert "not a .npy file" in answers["malformed"][1]["error"]
    assert answers["pickled"][0] == 400
    assert answers["five_bands"][0] == 422
    assert "takes 3 bands, got 5" in answers["five_bands"][1]["error"]
    assert answers["poison"][0] == 500
    assert "poison pixel" in answers["poison"][1]["error"]
    assert answers["oversize"][0] == 413


def test_zstd_and_truncated_bodies_are_answered_alone_inside_a_shared_batch(
    slow_batcher,
) -> None:
    """A zstd body (``Content-Encoding: zstd``) scores as its plain ``.npy`` does, in the same
    handler call; a truncated ``.npy``, a corrupt zstd stream and an encoding the host does not
    decode are each refused alone, with the same error as before zero-copy decoding."""
    from chipscale.models.request_body import zstd

    rng = np.random.default_rng(2)
    good = rng.integers(0, 255, (3, 3, 256, 256)).astype(np.float32)
    plain = npy(good)
    octet = {"Content-Type": "application/octet-stream"}
    requests = {
        "plain": (plain, octet),
        "zstd": (zstd.compress(plain, level=1), {**octet, "Content-Encoding": "zstd"}),
        "truncated": (plain[:-100], octet),
        "corrupt_zstd": (zstd.compress(plain)[:-50], {**octet, "Content-Encoding": "zstd"}),
        "gzip": (plain, {**octet, "Content-Encoding": "gzip"}),
    }
    http = urllib3.PoolManager(maxsize=len(requests))
    answers: dict[str, tuple[int, dict]] = {}

    def send(key: str) -> None:
        body, headers = requests[key]
        answer = http.request("POST", slow_batcher.predictions_url, body=body, headers=headers)
        answers[key] = (answer.status, json.loads(answer.data))

    threads = [threading.Thread(target=send, args=(k,)) for k in requests]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)

    assert answers["plain"][0] == 200, answers["plain"]
    assert answers["zstd"][0] == 200, answers["zstd"]
    assert answers["zstd"][1]["scores"] == answers["plain"][1]["scores"]
    expected = good.mean(axis=(1, 2, 3)) / 255.0
    np.testing.assert_allclose([r[0] for r in answers["zstd"][1]["scores"]], expected, rtol=1e-5)
    assert answers["zstd"][1]["batch"]["requests"] == len(requests), answers["zstd"][1]["batch"]
    assert answers["truncated"][0] == 400
    assert "EOF: reading array data" in answers["truncated"][1]["error"]
    assert answers["corrupt_zstd"][0] == 400
    assert "not a readable zstd stream" in answers["corrupt_zstd"][1]["error"]
    assert answers["gzip"][0] == 415
    assert "accepted: identity, zstd" in answers["gzip"][1]["error"]


def test_a_batch_where_every_request_is_bad_still_answers_each(slow_batcher) -> None:
    http = urllib3.PoolManager()
    status, answer = post(http, slow_batcher.predictions_url, npy(np.zeros((3, 3, 8, 8))))
    assert status == 422
    assert "256x256" in answer["error"]


# ----------------------------------------------------------------------------- outages


def test_torchserve_restarted_in_mid_run_loses_and_duplicates_nothing(
    aerial, demo_mar, tmp_path
) -> None:
    """Stop TorchServe while a run is under way, start it again on the same ports: requests
    meet the outage and are retried, and the run finishes with every tile ok, each stored
    once."""
    server = start_torchserve(demo_mar, tmp_path / "ts")
    tiles = list(cover(20, source=str(aerial)))
    restarted = threading.Event()
    progress = {"done": 0}
    outage: dict[str, float] = {}
    retried: list[float] = []  # when the client waited to retry a failed request
    bouncer: list[threading.Thread] = []

    def bounce(n: int) -> None:
        progress["done"] += n
        if progress["done"] >= 50 and not restarted.is_set():
            restarted.set()

            def stop_then_start() -> None:
                outage["start"] = time.monotonic()
                server.stop()
                server.start()
                outage["end"] = time.monotonic()

            bouncer.append(threading.Thread(target=stop_then_start))
            bouncer[0].start()

    def sleep(seconds: float) -> None:
        retried.append(time.monotonic())
        time.sleep(seconds)

    predictor = open_predictor(server.predictions_url, sleep=sleep)
    try:
        with open_store(f"sqlite:///{tmp_path}/r.db") as store:
            summary = run_local(
                job="bounce",
                source=str(aerial),
                tiles=tiles,
                predictor=predictor,
                store=store,
                zoom=20,
                max_tiles=16,
                on_progress=bounce,
            )
            rows = list(store.iter_results("bounce"))
    finally:
        predictor.close()
        for thread in bouncer:
            thread.join(timeout=120)
        server.stop()
    assert restarted.is_set()
    # Requests met the outage: every retry came after it began, and some during it.
    assert retried, "no request met the outage"
    assert min(retried) >= outage["start"]
    assert any(t <= outage["end"] for t in retried), (outage, retried)
    assert summary.error == 0
    assert len(rows) == len(tiles) == len({(r.x, r.y) for r in rows})
    assert {r.status for r in rows} <= {"ok", "empty"}
    assert sum(r.status == "ok" for r in rows) > 0.8 * len(tiles)


def test_tiles_that_always_break_the_model_become_errors_not_endless_retries(
    slow_batcher,
) -> None:
    """Through the client: the request holding a poison tile is retried, then only its tiles
    are refused with the model's message; the other requests of the pack are scored."""
    from chipscale.errors import PartialPrediction
    from chipscale.models.torchserve_client import TorchServePredictor

    batch = np.full((4, 3, 256, 256), 128.0, np.float32)
    batch[2, 0, 0, 0] = POISON
    with (
        TorchServePredictor(
            slow_batcher.predictions_url, tiles_per_request=1, retries=1, backoff=0.01
        ) as predictor,
        pytest.raises(PartialPrediction) as caught,
    ):
        predictor.predict(batch)
    assert set(caught.value.failed) == {2}
    assert "poison pixel" in caught.value.failed[2]
    scores = caught.value.scores
    np.testing.assert_allclose(scores[[0, 1, 3], 0], 128.0 / 255.0, rtol=1e-5)
    assert np.isnan(scores[2]).all()


def test_chipscale_serve_is_ready_when_it_says_so_and_stops_cleanly(
    demo_model_file, tmp_path
) -> None:
    """`chipscale serve MODEL.pt`: packages on the fly, prints Ready only once the model
    answers, keeps logs and pid files in the run directory, and Ctrl-C takes TorchServe and
    its workers down."""
    port = free_port()
    while any(_in_use(p) for p in (port + 1, port + 2)):
        port = free_port()
    run_dir = tmp_path / "run"
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    proc = subprocess.Popen(
        [sys.executable, "-m", "chipscale.cli", "serve", str(demo_model_file),
         "--port", str(port), "--run-dir", str(run_dir)],
        cwd=cwd, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 180
        lines = []
        while time.monotonic() < deadline:
            line = proc.stderr.readline()
            lines.append(line)
            if line.startswith("Ready:") or not line:
                break
        assert lines[-1].startswith("Ready:"), "".join(lines)
        url = lines[-1].split()[1]
        status, answer = post(urllib3.PoolManager(), url, b"")  # no wait: ready means ready
        assert status == 200 and answer["model"] == "demo-landcover"
        group = psutil.Process(proc.pid).children(recursive=True)
        assert group, "TorchServe runs as a child of chipscale serve"
    finally:
        proc.send_signal(signal.SIGINT)
        code = proc.wait(60)
    assert code == 130
    time.sleep(1)
    assert not [p for p in group if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert (run_dir / "logs" / "model_log.log").is_file()
    assert os.listdir(cwd) == []  # nothing in the cwd: no logs/, no key_file.json


def _in_use(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0
