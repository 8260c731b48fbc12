"""Outputs appear whole or not at all, with the permissions a normal file would get."""

from __future__ import annotations

import os
import stat

import pytest

from chipscale.atomic import atomic_write


def test_written_whole_into_a_new_folder_with_umask_permissions(tmp_path) -> None:
    target = tmp_path / "new" / "out.csv"
    with atomic_write(target) as handle:
        handle.write("a,b\n")
    assert target.read_text() == "a,b\n"
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~umask
    assert os.listdir(target.parent) == ["out.csv"]


def test_failure_keeps_the_old_file_and_leaves_no_temporary(tmp_path) -> None:
    target = tmp_path / "out.csv"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_write(target) as handle:
        handle.write("half")
        raise RuntimeError("boom")
    assert target.read_text() == "old"
    assert os.listdir(tmp_path) == ["out.csv"]
