"""Optional dependencies: which extra of pyproject.toml installs which module, and the one-line
error (with the exact pip command) when a command needs one that is not installed.

The core install reads tiles and drives runs; the rest comes in extras (``worker``,
``local``, ``model``, ``parquet``) so the worker Lambda's bundle stays small. Code that needs
an optional module calls :func:`require` (or just imports it: the CLI turns a
``ModuleNotFoundError`` of a module listed here into :class:`MissingExtraError`).
"""

from __future__ import annotations

import importlib
import shlex
import sys
from pathlib import Path
from types import ModuleType

from chipscale.errors import MissingExtraError

#: Top-level module -> the extra that installs it. torch is in ``local`` and ``model`` both;
#: ``local`` (the in-process model) is the smaller one that brings it.
EXTRA_OF_MODULE: dict[str, str] = {
    "boto3": "worker",
    "botocore": "worker",
    "psycopg": "worker",
    "psycopg_binary": "worker",
    "aws_lambda_powertools": "worker",
    "torch": "local",
    "matplotlib": "local",
    "ts": "model",  # torchserve
    "model_archiver": "model",  # torch-model-archiver
    "yaml": "model",  # pyyaml, TorchServe's undeclared need
    "pyarrow": "parquet",
    "pyogrio": "parquet",
    "pystac_client": "stac",
    "pystac": "stac",
}

_ROOT = Path(__file__).resolve().parents[1]


def install_command(extra: str) -> str:
    """The exact command that installs ``extra`` into this interpreter's environment.

    In a source checkout: ``pip install -e`` of the checkout (``.`` when run from its root);
    otherwise the published distribution.
    """
    pip = Path(sys.executable).parent / "pip"
    pip_cmd = _shown(pip) if pip.is_file() else f"{_shown(Path(sys.executable))} -m pip"
    if (_ROOT / "pyproject.toml").is_file():
        return f"{pip_cmd} install -e {shlex.quote(f'{_shown(_ROOT)}[{extra}]')}"
    return f"{pip_cmd} install {shlex.quote(f'chipscale[{extra}]')}"


def _shown(path: Path) -> str:
    """``path`` relative to the cwd when it lies under it (``.venv/bin/pip``, ``.``)."""
    try:
        relative = path.relative_to(Path.cwd())
    except ValueError:
        return str(path)
    return str(relative) if str(relative) != "." else "."


def missing_message(module: str, needed_for: str, extra: str | None = None) -> str:
    """One line: what needs ``module``, the extra that installs it, and the pip command."""
    extra = extra or EXTRA_OF_MODULE.get(module.split(".")[0], "dev")
    return f"{needed_for} needs {module}, from the '{extra}' extra: {install_command(extra)}"


def missing(module: str, needed_for: str, extra: str | None = None) -> MissingExtraError:
    """The error for ``module`` not being installed (:func:`missing_message`)."""
    return MissingExtraError(missing_message(module, needed_for, extra))


def require(module: str, needed_for: str, extra: str | None = None) -> ModuleType:
    """``import module``, or :class:`MissingExtraError` naming the extra that installs it."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if not _is_optional(exc.name or module):
            raise
        raise missing(exc.name or module, needed_for, extra) from None


def from_import_error(exc: ModuleNotFoundError, needed_for: str) -> MissingExtraError | None:
    """:class:`MissingExtraError` for an optional module's ``ModuleNotFoundError``, else None
    (a missing core module is a broken install, not a missing extra)."""
    if exc.name is None or not _is_optional(exc.name):
        return None
    return missing(exc.name.split(".")[0], needed_for)


def _is_optional(name: str) -> bool:
    return name.split(".")[0] in EXTRA_OF_MODULE
