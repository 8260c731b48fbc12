"""Packaging models for TorchServe and running TorchServe locally.

:func:`package_model` turns a chipscale model file into a ``.mar`` holding the handler, the
runtime, the model (its metadata inside) and a model-config chosen for a GPU host.
:class:`TorchServe` starts TorchServe from this venv with ``model_server/config.properties``
(the file the GPU hosts use), waits until every worker is READY (``/ping`` says healthy long
before that), and stops it: ``chipscale serve``, the tests and the benchmarks all use it, so
logs, pid file and worker sockets go to a run directory, never the cwd.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from chipscale.errors import ChipscaleError, ModelFormatError
from chipscale.extras import missing_message
from chipscale.names import INFERENCE_PORT, MANAGEMENT_PORT, METRICS_PORT

MODEL_SERVER_DIR = Path(__file__).resolve().parents[2] / "model_server"
CONFIG_PROPERTIES = MODEL_SERVER_DIR / "config.properties"
LOG_CONFIG = MODEL_SERVER_DIR / "log4j2.xml"
HANDLER_FILE = MODEL_SERVER_DIR / "chipscale_handler.py"
#: The modules the handler imports, packed beside it (flat: the .mar directory is on sys.path).
RUNTIME_FILES = tuple(
    MODEL_SERVER_DIR / name for name in ("chipscale_runtime.py", "chipscale_metadata.py")
)

#: The drift check's defaults (chipscale.models.drift), here so the CLI reads them without
#: numpy: the largest score change accepted (scores are 0..1) and the sample tiles.
DEFAULT_TOLERANCE = 0.01
DEFAULT_SAMPLES = 64
#: TorchServe model names: what its management API accepts.
_MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class ServingError(ChipscaleError):
    """TorchServe could not be packaged for, started or stopped."""


@dataclass(frozen=True, slots=True)
class ServingConfig:
    """The model-config a ``.mar`` carries, tuned for one GPU host by default.

    ``batch_size`` counts *requests* TorchServe groups into one handler call (each request
    carries up to a pack's tiles), ``max_batch_delay_ms`` is how long it waits to fill one,
    ``sub_batch`` how many tiles the handler runs through the model at once (bound by GPU
    memory: 64 tiles of 3x256x256 float32 are 50 MB of input), ``workers`` the starting
    worker count (the boot script scales to workers-per-GPU x GPUs), ``threads`` torch's CPU
    threads per worker when there is no GPU.
    """

    batch_size: int = 8
    max_batch_delay_ms: int = 10
    workers: int = 1
    response_timeout_s: int = 120
    sub_batch: int = 64
    threads: int = 1

    def __post_init__(self) -> None:
        for name in ("batch_size", "workers", "response_timeout_s", "sub_batch", "threads"):
            if getattr(self, name) < 1:
                raise ServingError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_batch_delay_ms < 0:
            raise ServingError(f"max_batch_delay_ms must be >= 0, got {self.max_batch_delay_ms}")

    def settings(self) -> dict[str, int]:
        """The knobs under TorchServe's names (what benchmarks report beside their figures)."""
        return {
            "workers": self.workers,
            "batchSize": self.batch_size,
            "maxBatchDelay_ms": self.max_batch_delay_ms,
            "responseTimeout_s": self.response_timeout_s,
            "handler_sub_batch": self.sub_batch,
            "handler_threads": self.threads,
        }

    def to_yaml(self) -> str:
        """TorchServe's model-config YAML (plain keys; written by hand to need no yaml lib)."""
        return "\n".join(
            [
                f"minWorkers: {self.workers}",
                f"maxWorkers: {self.workers}",
                f"batchSize: {self.batch_size}",
                f"maxBatchDelay: {self.max_batch_delay_ms}",
                f"responseTimeout: {self.response_timeout_s}",
                "handler:",
                f"  sub_batch: {self.sub_batch}",
                f"  threads: {self.threads}",
                "",
            ]
        )


def package_model(
    model: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    name: str | None = None,
    version: str | None = None,
    config: ServingConfig | None = None,
    force: bool = False,
    inference: Any = None,
) -> Path:
    """Build ``<out_dir>/<name>.mar`` from a chipscale model file and return its path.

    The model's own metadata is the source of truth: ``name`` and ``version`` only fill gaps,
    so a flag that contradicts the file is refused rather than silently serving a model under
    another identity than the one its results will carry. ``inference`` (an
    ``InferenceSettings``, checked first with :mod:`chipscale.models.drift`) is written into
    the packaged copy's metadata; the file itself is not changed.
    """
    from chipscale.models.predictors import read_model_metadata

    archiver = _venv_tool("torch-model-archiver", ("model_archiver", "torch"), "packaging a model")
    model = Path(model)
    meta = read_model_metadata(model)
    name = _agree("name", meta.get("name"), name)
    version = _agree("version", meta.get("version"), version)
    if not _MODEL_NAME.match(name):
        raise ModelFormatError(
            f"model name {name!r} cannot be a TorchServe model name "
            "(letters, digits, '_', '-', '.'; re-export the model with another name)"
        )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    target = out / f"{name}.mar"
    if target.exists() and not force:
        raise ServingError(f"{target} exists (use --force to replace it)")
    config = config or ServingConfig()
    with tempfile.TemporaryDirectory(prefix="chipscale-mar-") as tmp:
        config_file = Path(tmp) / "model-config.yaml"
        config_file.write_text(config.to_yaml())
        # The handler loads the file by its manifest name: keep the suffix (.pt or .pt2).
        serialized = Path(tmp) / f"{name}{model.suffix or '.pt'}"
        if inference is None:
            shutil.copyfile(model, serialized)
        else:
            _with_settings(model, serialized, inference)
        cmd = [
            archiver,
            "--model-name", name,
            "--version", version,
            "--serialized-file", str(serialized),
            "--handler", str(HANDLER_FILE),
            "--extra-files", ",".join(str(f) for f in RUNTIME_FILES),
            "--config-file", str(config_file),
            "--export-path", str(out),
            "--force",
        ]  # fmt: skip
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise ServingError(f"torch-model-archiver failed: {(done.stderr or done.stdout).strip()}")
    return target


def _with_settings(model: Path, out: Path, inference: Any) -> None:
    """Copy ``model`` to ``out`` with ``inference`` settings in its metadata."""
    import dataclasses

    from model_server import chipscale_runtime as rt

    try:
        meta = dataclasses.replace(rt.read_metadata(model), inference=inference)
        rt.rewrite_metadata(model, out, meta)
    except rt.ModelRuntimeError as exc:
        raise ModelFormatError(str(exc)) from exc


def _agree(field_name: str, from_file: Any, from_flag: str | None) -> str:
    if from_file and from_flag and str(from_file) != from_flag:
        raise ModelFormatError(
            f"the model file says {field_name} {from_file!r} but --{field_name} says "
            f"{from_flag!r}: the file's metadata is the source of truth, flags only fill gaps"
        )
    value = from_file or from_flag
    if not value:
        raise ModelFormatError(f"the model file has no {field_name}: pass --{field_name}")
    return str(value)


def _venv_tool(name: str, modules: tuple[str, ...], needed_for: str) -> str:
    """A console script of this interpreter's environment (TorchServe runs from the venv),
    or the one-line error naming the ``model`` extra when it or a module it needs is not
    installed (the script fails later, and less clearly, without its modules)."""
    for module in modules:
        try:
            installed = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):
            installed = False
        if not installed:
            raise ServingError(missing_message(module, needed_for, "model"))
    candidate = Path(sys.executable).parent / name
    found = str(candidate) if candidate.is_file() else shutil.which(name)
    if not found:
        raise ServingError(missing_message(name, needed_for, "model"))
    return found


@dataclass
class TorchServe:
    """A local TorchServe serving one ``.mar``, started and stopped by this process.

    Ports default to TorchServe's (8080/8081/8082) on loopback; ``host`` opens inference and
    metrics to others, never the management API. The run directory holds logs, metrics, the
    pid file and worker sockets (``TEMP``), so two servers can run side by side and nothing
    lands in the cwd.
    """

    mar: Path
    run_dir: Path
    host: str = "127.0.0.1"
    inference_port: int = INFERENCE_PORT
    management_port: int = MANAGEMENT_PORT
    metrics_port: int = METRICS_PORT
    config_file: Path = CONFIG_PROPERTIES
    extra_env: dict[str, str] = field(default_factory=dict)
    process: subprocess.Popen[bytes] | None = field(default=None, init=False, repr=False)
    launcher: str = field(default="", init=False, repr=False)

    def __post_init__(self) -> None:
        self.launcher = _venv_tool("torchserve", ("ts", "yaml", "torch"), "serving a model")
        # TorchServe runs with the run directory as its cwd: a relative path would not name
        # the same place there (its TEMP, LOG_LOCATION and model store).
        self.mar = Path(self.mar).absolute()
        self.run_dir = Path(self.run_dir).absolute()
        self.config_file = Path(self.config_file).absolute()

    @classmethod
    def on_free_ports(cls, mar: Path, run_dir: Path, **kwargs: Any) -> TorchServe:
        """A server on ports the OS has free now (tests and benchmarks run side by side)."""
        return cls(
            mar,
            run_dir,
            inference_port=free_port(),
            management_port=free_port(),
            metrics_port=free_port(),
            **kwargs,
        )

    @property
    def model_name(self) -> str:
        return self.mar.stem

    @property
    def inference_url(self) -> str:
        return f"http://{self.host}:{self.inference_port}"

    @property
    def management_url(self) -> str:
        # Loopback whatever ``host`` is: token authorization is off (config.properties), so
        # the management API must never listen where others can unregister or rescale models.
        return f"http://127.0.0.1:{self.management_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.host}:{self.metrics_port}"

    @property
    def predictions_url(self) -> str:
        return f"{self.inference_url}/predictions/{self.model_name}"

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        temp = self.run_dir / "tmp"
        env.update(
            {
                "TEMP": str(temp),
                "TMPDIR": str(temp),
                "LOG_LOCATION": str(self.run_dir / "logs"),
                "METRICS_LOCATION": str(self.run_dir / "logs"),
                "TS_INFERENCE_ADDRESS": self.inference_url,
                "TS_MANAGEMENT_ADDRESS": self.management_url,
                "TS_METRICS_ADDRESS": self.metrics_url,
                # gRPC cannot be turned off in TorchServe 0.12 and chipscale does not use it:
                # loopback, on ports the OS picks, so several servers can run side by side.
                "TS_GRPC_INFERENCE_ADDRESS": "127.0.0.1",
                "TS_GRPC_MANAGEMENT_ADDRESS": "127.0.0.1",
                "TS_GRPC_INFERENCE_PORT": "0",
                "TS_GRPC_MANAGEMENT_PORT": "0",
                # The workers run this interpreter, so they see this venv's torch.
                "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
            }
        )
        env.update(self.extra_env)
        return env

    def start(self, timeout: float = 180.0) -> TorchServe:
        """Start TorchServe and return once every worker of the model is READY."""
        if self.process is not None and self.process.poll() is None:
            raise ServingError("this TorchServe is already running")
        self.check_ports_free()
        for sub in ("tmp", "logs", "store"):
            (self.run_dir / sub).mkdir(parents=True, exist_ok=True)
        store = self.run_dir / "store"
        target = store / self.mar.name
        if not target.exists() or target.stat().st_mtime < self.mar.stat().st_mtime:
            shutil.copyfile(self.mar, target)
        cmd = [
            self.launcher,
            "--start",
            "--foreground",
            "--ncs",  # no config snapshots: every start reads config.properties
            "--model-store", str(store),
            "--models", f"{self.model_name}={self.mar.name}",
            "--ts-config", str(self.config_file),
            "--log-config", str(LOG_CONFIG),
        ]  # fmt: skip
        log_file = (self.run_dir / "logs" / "torchserve.out").open("ab")
        self.process = subprocess.Popen(
            cmd,
            cwd=self.run_dir,
            env=self._env(),
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # the JVM and its Python workers form one group to stop
        )
        log_file.close()
        try:
            self.wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def check_ports_free(self) -> None:
        """Refuse ports something already listens on: an earlier TorchServe left running
        would answer the readiness checks, and the new one would fail behind it."""
        for host, port in (
            (self.host, self.inference_port),
            ("127.0.0.1", self.management_port),
            (self.host, self.metrics_port),
        ):
            if not port_is_free(host, port):
                raise ServingError(
                    f"port {port} on {host} is already in use (another TorchServe still "
                    "running?): stop what listens there or choose another port"
                )

    def workers(self) -> list[dict[str, Any]]:
        """The model's workers as the management API describes them (empty if unreachable)."""
        url = f"{self.management_url}/models/{self.model_name}"
        try:
            with urllib.request.urlopen(url, timeout=5) as answer:
                described = json.loads(answer.read())
        except (OSError, ValueError):
            return []
        return [w for model in described for w in model.get("workers", [])]

    def wait_ready(self, timeout: float = 180.0) -> None:
        """Poll the management API until every worker is READY (``/ping`` is not enough)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise ServingError(
                    f"TorchServe exited with {self.process.returncode} while starting; "
                    f"see {self.run_dir / 'logs'}"
                )
            workers = self.workers()
            if workers and all(w.get("status") == "READY" for w in workers):
                return
            time.sleep(0.25)
        raise ServingError(
            f"TorchServe's workers were not READY after {timeout:.0f} s; "
            f"see {self.run_dir / 'logs'}"
        )

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the JVM and its workers; a server that does not stop in time is killed."""
        process, self.process = self.process, None
        if process is None:
            return
        if process.poll() is None:
            for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 10.0)):
                try:
                    os.killpg(process.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    process.wait(wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
        # Even when the launcher is gone (it exits 0 whatever the JVM did), the JVM or its
        # Python workers may not be: they hold the ports and the model's memory.
        _reap_group(process.pid)
        # A kill is not instant: return once the ports are released, so a start on the same
        # ports right after (a restart) finds them free.
        deadline = time.monotonic() + 10.0
        while time.monotonic() < deadline and not all(
            port_is_free("127.0.0.1", port)
            for port in (self.inference_port, self.management_port, self.metrics_port)
        ):
            time.sleep(0.05)

    def __enter__(self) -> TorchServe:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def free_port() -> int:
    """A TCP port free on loopback right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def port_is_free(host: str, port: int) -> bool:
    """Whether nothing answers on ``port`` and this process could listen on it at ``host``."""
    with socket.socket() as probe:
        probe.settimeout(1.0)
        if probe.connect_ex(("127.0.0.1" if host in ("0.0.0.0", "") else host, port)) == 0:
            return False
    with socket.socket() as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT is free
        try:
            listener.bind((host, port))
        except OSError:
            return False
    return True


@contextlib.contextmanager
def exit_on_termination() -> Iterator[None]:
    """Inside, SIGTERM and SIGHUP raise ``SystemExit(128 + signal)``, so ``finally`` blocks
    (stopping TorchServe's process group, which lives in a session of its own) run as they
    do for Ctrl-C: systemd and container runtimes stop with SIGTERM, a closed terminal
    sends SIGHUP. A second signal during the cleanup is ignored, not a half-done stop."""
    caught = (signal.SIGTERM, signal.SIGHUP)

    def leave(signum: int, _frame: object) -> None:
        for sig in caught:
            signal.signal(sig, signal.SIG_IGN)
        raise SystemExit(128 + signum)

    previous = {sig: signal.signal(sig, leave) for sig in caught}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _reap_group(pgid: int) -> None:
    """Kill what is left of a process group (a Python worker the JVM did not take down)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def default_run_dir() -> Path:
    """Where ``chipscale serve`` keeps logs and sockets: ``./.chipscale/serve/<time>``."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path.cwd() / ".chipscale" / "serve" / stamp
