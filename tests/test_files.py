"""Atomic writes: a process killed while writing leaves no file that later loads."""

from __future__ import annotations

import subprocess
import sys

import pytest

from spade_lib.files import atomic_write


def test_atomic_write_writes_and_replaces(tmp_path) -> None:
    path = tmp_path / "sub" / "a.bin"
    assert atomic_write(path, lambda fh: fh.write(b"one")) == path
    atomic_write(path, lambda fh: fh.write(b"two"))
    assert path.read_bytes() == b"two"
    assert [p.name for p in path.parent.iterdir()] == ["a.bin"]


def test_a_failing_writer_leaves_the_old_file_and_no_temporary(tmp_path) -> None:
    path = tmp_path / "a.bin"
    path.write_bytes(b"old")

    def half(fh) -> None:
        fh.write(b"new but ")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, half)
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["a.bin"]


def test_a_killed_writer_leaves_no_file(tmp_path) -> None:
    path = tmp_path / "a.bin"
    code = ("import os, signal, sys\n"
            "from spade_lib.files import atomic_write\n"
            "def half(fh):\n"
            "    fh.write(b'x' * 100000); fh.flush()\n"
            "    os.kill(os.getpid(), signal.SIGKILL)\n"
            f"atomic_write({str(path)!r}, half)\n")
    proc = subprocess.run([sys.executable, "-c", code], check=False)
    assert proc.returncode == -9
    assert not path.exists()
    # Only the hidden temporary is left, and nothing reads hidden files.
    assert all(p.name.startswith(".a.bin.") for p in tmp_path.iterdir())
