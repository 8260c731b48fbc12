"""`chipscale serve` as the README shows it: its exact commands (package the demo model, serve
the archive, run through it), with relative paths from a fresh directory, then SIGTERM (what
systemd and containers send) taking TorchServe's whole process tree down, and a port already
in use refused. TorchServe starts once for the module (the JVM is slow to start)."""

from __future__ import annotations

import contextlib
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from conftest import ROOT, free_port, unavailable

CHIPSCALE = str(Path(sys.executable).parent / "chipscale")
README_PORT = "8080"


def readme_serving_commands() -> list[str]:
    """The `chipscale` lines of the README's TorchServe example, continuation lines joined and
    optional `[...]` parts dropped."""
    text = (ROOT / "README.md").read_text()
    section = text.split("### Serving the model with TorchServe", 1)[1]
    block = section.split("```bash", 1)[1].split("```", 1)[0]
    joined = re.sub(r"\\\n\s*", " ", block)
    lines = [re.sub(r"\s*\[[^\]]*\]", "", line).strip() for line in joined.splitlines()]
    return [line for line in lines if line.startswith("chipscale ")]


def as_run(command: str, port: int) -> list[str]:
    """A README line as argv: this venv's chipscale, the README's port replaced by ``port``."""
    argv = shlex.split(command.replace(README_PORT, str(port)))
    return [CHIPSCALE, *argv[1:]]


def free_port_triple() -> int:
    """An inference port whose next two (management, metrics) are free as well."""
    while True:
        port = free_port()
        if port < 65000 and all(_free(p) for p in (port + 1, port + 2)):
            return port


def _free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _answers(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture(scope="module")
def served(demo_model_file: Path, aerial: Path, tmp_path_factory: pytest.TempPathFactory):
    """The README's package and serve commands run from a fresh directory holding
    ``examples/`` (relative paths, default run directory), up to `Ready`."""
    if shutil.which("java") is None:
        unavailable("java (TorchServe's frontend) is not installed")
    commands = readme_serving_commands()
    assert [c.split()[1] for c in commands] == ["model", "serve", "run"], commands
    cwd = tmp_path_factory.mktemp("readme")
    (cwd / "examples").mkdir()
    shutil.copyfile(demo_model_file, cwd / "examples" / "demo-model.pt")
    (cwd / "examples" / "rasterio_cogeo.tif").symlink_to(aerial)
    port = free_port_triple()
    package = subprocess.run(
        as_run(commands[0], port), cwd=cwd, capture_output=True, text=True, timeout=300
    )
    assert package.returncode == 0, package.stderr
    proc = subprocess.Popen(as_run(commands[1], port), cwd=cwd, stderr=subprocess.PIPE, text=True)
    tree: list[psutil.Process] = []
    try:
        lines = _read_until_ready(proc)
        tree = psutil.Process(proc.pid).children(recursive=True)
        yield {"proc": proc, "port": port, "cwd": cwd, "lines": lines, "tree": tree,
               "commands": commands}  # fmt: skip
    finally:
        _kill_all(proc, tree)


def _read_until_ready(proc: subprocess.Popen[str], timeout: float = 300) -> list[str]:
    assert proc.stderr is not None
    deadline = time.monotonic() + timeout
    lines: list[str] = []
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        lines.append(line)
        if line.startswith("Ready:") or not line:
            break
    return lines


def _kill_all(proc: subprocess.Popen[str], tree: list[psutil.Process]) -> None:
    """Whatever the test left (orphans included, before the fix): killed."""
    for p in [*tree, psutil.Process(proc.pid) if proc.poll() is None else None]:
        if p is not None:
            with contextlib.suppress(psutil.Error):
                p.kill()
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(10)


def test_the_readme_serve_example_runs_as_written(served: dict[str, Any]) -> None:
    """Relative MODEL and default (relative) run directory: Ready, and the README's `run`
    through it scores every tile."""
    assert served["lines"][-1].startswith("Ready:"), "".join(served["lines"])
    url = served["lines"][-1].split()[1]
    assert url.endswith("/predictions/demo-landcover")
    assert (served["cwd"] / "model-store" / "demo-landcover.mar").is_file()
    logs = list((served["cwd"] / ".chipscale" / "serve").glob("*/logs/model_log.log"))
    assert logs, "logs in ./.chipscale/serve/TIME/logs, as the README says"
    run = subprocess.run(
        as_run(served["commands"][2], served["port"]),
        cwd=served["cwd"], capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert "ok" in run.stdout  # the summary table
    assert "demo-landcover" in (served["cwd"] / "chipscale-out" / "results.csv").read_text()


def test_sigterm_stops_torchserve_and_every_worker(served: dict[str, Any]) -> None:
    proc, tree, port = served["proc"], served["tree"], served["port"]
    assert served["lines"][-1].startswith("Ready:"), "".join(served["lines"])
    assert tree, "TorchServe runs under chipscale serve"
    proc.send_signal(signal.SIGTERM)
    code = proc.wait(60)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        alive = [p for p in tree if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        if not alive:
            break
        time.sleep(0.2)
    assert not alive, [p.cmdline()[:2] for p in alive]
    assert not any(_answers(p) for p in (port, port + 1, port + 2))
    assert code == 128 + signal.SIGTERM  # as a shell reports a command ended by SIGTERM


@pytest.fixture
def held_port() -> Iterator[int]:
    """A port another program listens on."""
    port = free_port_triple()
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", port))
        listener.listen()
        yield port


def test_serve_refuses_a_port_already_answering(
    demo_mar: Path, held_port: int, tmp_path: Path
) -> None:
    result = subprocess.run(
        [CHIPSCALE, "serve", str(demo_mar), "--port", str(held_port)],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 1, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and f"port {held_port}" in errors[0] and "in use" in errors[0]
    assert "Traceback" not in result.stderr and "Ready" not in result.stderr
