"""hdmil.files: the one atomic writer and JSON encoding; hdmil.errors.check_cancelled."""

from __future__ import annotations

import errno
import json
import os
import stat
import threading

import numpy as np
import pytest

from hdmil import files
from hdmil.errors import Cancelled, check_cancelled
from hdmil.files import WriteError, atomic_path, atomic_write, dumps, write_json_atomic


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def _umask() -> int:
    old = os.umask(0)
    os.umask(old)
    return old


def test_written_file_has_plain_open_permissions(tmp_path):
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    target = tmp_path / "atomic.txt"
    with atomic_write(target) as fh:
        fh.write("hello")
    assert target.read_text() == "hello"
    assert _mode(target) == _mode(plain) == 0o666 & ~_umask()


def test_atomic_path_replaces_and_leaves_no_temp(tmp_path):
    target = tmp_path / "sub" / "data.bin"
    with atomic_path(target) as tmp:
        assert tmp.parent == target.parent and tmp.name.startswith(".data.bin.")
        tmp.write_bytes(b"first")
    with atomic_path(target) as tmp:
        tmp.write_bytes(b"second")
    assert target.read_bytes() == b"second"
    assert sorted(p.name for p in target.parent.iterdir()) == ["data.bin"]


def test_error_inside_block_keeps_old_file(tmp_path):
    target = tmp_path / "report.json"
    write_json_atomic(target, {"v": 1})
    with pytest.raises(RuntimeError):
        with atomic_write(target) as fh:
            fh.write('{"v": 2')
            raise RuntimeError("boom")
    assert json.loads(target.read_text()) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]


def test_full_folder_is_one_clear_error_and_old_file_survives(tmp_path, monkeypatch):
    target = tmp_path / "features.h5"
    target.write_bytes(b"old")

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(files.os, "fsync", full)
    with pytest.raises(WriteError) as info:
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"new")
    assert str(target) in str(info.value) and "No space left" in str(info.value)
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["features.h5"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_folder_is_one_clear_error(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        with pytest.raises(WriteError, match="ro/out.json: cannot write"):
            write_json_atomic(ro / "out.json", {"a": 1})
        assert list(ro.iterdir()) == []
    finally:
        ro.chmod(0o755)


def test_read_only_target_folder_simulated(tmp_path, monkeypatch):
    """Root ignores folder permissions: simulate the EROFS a read-only mount gives."""
    target = tmp_path / "out.csv"

    def read_only(src, dst):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(files.os, "replace", read_only)
    with pytest.raises(WriteError, match="out.csv: cannot write .*Read-only"):
        with atomic_write(target) as fh:
            fh.write("a,b\n")
    assert list(tmp_path.iterdir()) == []


def test_dumps_converts_numpy_paths_and_non_finite(tmp_path):
    text = dumps({"p": np.array([0.25, np.nan]), "n": np.int64(3), "ok": np.bool_(True),
                  "path": tmp_path, "t": (1, 2), "inf": float("inf")}, sort_keys=True)
    assert json.loads(text) == {"inf": None, "n": 3, "ok": True, "p": [0.25, None],
                                "path": str(tmp_path), "t": [1, 2]}
    with pytest.raises(TypeError, match="object"):
        dumps({"x": object()})


def test_check_cancelled():
    event = threading.Event()
    check_cancelled(None, "nothing")
    check_cancelled(event, "training")
    event.set()
    with pytest.raises(Cancelled, match="^training cancelled$"):
        check_cancelled(event, "training")
