"""`chipscale download` streams: the peak RSS of a real download of a 200,000-row job, run as
its own process, stays near that of a 10-row job, in each format (CSV, GeoJSON, GeoParquet).
Holding the rows at once would add about 170 MB (measured 2026-12, 2-core VM)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import unavailable

from chipscale.results import open_store
from chipscale.values import JobInfo, Tile, TileResult

CHIPSCALE = str(Path(sys.executable).parent / "chipscale")
BIG, SMALL = 200_000, 10
#: Growth allowed over the small job's peak, MB. GeoParquet builds 10,000-row record batches
#: (and pyarrow's pool keeps some): about 32 MB measured; CSV and GeoJSON none measurable.
HEADROOM_MB = {"csv": 20, "geojson": 20, "parquet": 64}


@pytest.fixture(scope="module")
def jobs_db(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A SQLite store holding a 200,000-row job `big` and a 10-row job `small`, written
    straight into the store (no model, no pipeline)."""
    url = f"sqlite:///{tmp_path_factory.mktemp('download') / 'results.db'}"
    with open_store(url) as store:
        for job, n in (("big", BIG), ("small", SMALL)):
            store.start_job(
                JobInfo(
                    job, "src.tif", zoom=18, model_name="m", model_version="1", classes=("a", "b")
                )
            )
            for start in range(0, n, 20_000):
                store.write(
                    [
                        TileResult(
                            job,
                            Tile(i % 1000, i // 1000, 18),
                            "ok",
                            {"scores": {"a": 0.25, "b": 0.75}},
                            None,
                            "m",
                            "1",
                        )
                        for i in range(start, min(n, start + 20_000))
                    ]
                )
    return url


def download_peak_mb(db: str, job: str, out: Path) -> tuple[float, str]:
    """``chipscale download`` as its own process: peak RSS (MB, the kernel's accounting of
    that one child via wait4) and stderr; fails on a non-zero exit."""
    proc = subprocess.Popen(
        [CHIPSCALE, "download", "--db", db, "--job", job, "-o", str(out)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        cwd=out.parent,
    )
    assert proc.stderr is not None
    stderr = proc.stderr.read().decode("utf-8", "replace")
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    assert proc.returncode == 0, stderr
    return usage.ru_maxrss / 1024, stderr


@pytest.mark.slow
@pytest.mark.parametrize("fmt", sorted(HEADROOM_MB))
def test_download_of_a_large_job_runs_in_bounded_memory(
    jobs_db: str, fmt: str, tmp_path: Path
) -> None:
    if fmt == "parquet":
        try:
            import pyarrow  # noqa: F401
        except ImportError:
            unavailable("pyarrow is not installed (the parquet extra)")
    small_mb, small_err = download_peak_mb(jobs_db, "small", tmp_path / f"small.{fmt}")
    big_mb, big_err = download_peak_mb(jobs_db, "big", tmp_path / f"big.{fmt}")
    assert small_err.startswith(f"{SMALL} rows -> "), small_err
    assert big_err.startswith(f"{BIG:,} rows -> "), big_err
    assert (tmp_path / f"big.{fmt}").stat().st_size > (tmp_path / f"small.{fmt}").stat().st_size
    assert big_mb < small_mb + HEADROOM_MB[fmt], (fmt, small_mb, big_mb)
