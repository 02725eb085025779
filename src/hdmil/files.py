"""Files that appear complete or not at all, and the one JSON encoding of the project.

Every writer of results, features, checkpoints, slides, logs and splits goes through
``atomic_path`` (for libraries that write to a path: h5py, safetensors, tifffile, numpy) or
``atomic_write`` (a file object). Both write a temporary file in the target's own folder
(``.<name>.<pid>.<random>.tmp``, so a rename never crosses file systems), fsync it, give it the
permissions a plain ``open()`` would (not mkstemp's 0600), rename it over the target and fsync the
folder. On any error the temporary file is removed and the target is untouched; an ``OSError``
(folder full, read-only, missing permission) becomes a ``WriteError`` that names the file.

>>> with atomic_path("features/slide.h5") as tmp:
...     with h5py.File(tmp, "w") as f: ...
>>> write_json_atomic("report.json", {"prediction": "tumor", "probabilities": np.array([0.1, 0.9])})
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import secrets
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import IO, Any

import numpy as np

from hdmil.errors import HDMILError

__all__ = [
    "TEMP_SUFFIX",
    "WriteError",
    "atomic_path",
    "atomic_write",
    "dumps",
    "to_jsonable",
    "write_json_atomic",
]

TEMP_SUFFIX = ".tmp"


class WriteError(HDMILError):
    """A result could not be written (folder full, read-only, no permission)."""


def temp_name(path: Path) -> Path:
    """The temporary name ``path`` is written under: hidden, in the same folder, unique."""
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}{TEMP_SUFFIX}")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on a clean exit it replaces ``path`` durably.

    The caller writes the whole file to the yielded path (and closes it) inside the block.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise WriteError(f"{path}: cannot create its folder ({exc.strerror or exc})") from exc
    tmp = temp_name(path)
    try:
        yield tmp
        _fsync_file(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(exc, OSError) and not isinstance(exc, HDMILError):
            raise WriteError(f"{path}: cannot write ({exc.strerror or exc})") from exc
        if type(exc).__name__ == "SafetensorError" and "I/O error: " in str(exc):  # not an OSError
            why = str(exc).split("I/O error: ", 1)[1].split(" (os error")[0]
            raise WriteError(f"{path}: cannot write ({why})") from exc
        raise
    _fsync_dir(path.parent)


@contextlib.contextmanager
def atomic_write(
    path: str | os.PathLike, mode: str = "w", encoding: str | None = "utf-8", newline: str | None = None
) -> Iterator[IO[Any]]:
    """Open ``path`` for writing through ``atomic_path``; ``mode`` is "w" (text) or "wb"."""
    if mode not in ("w", "wt", "wb"):
        raise ValueError(f"atomic_write mode must be 'w', 'wt' or 'wb', not {mode!r}")
    binary = "b" in mode
    with atomic_path(path) as tmp:
        with open(tmp, "wb" if binary else "w", encoding=None if binary else encoding,
                  newline=newline) as fh:
            yield fh


def write_json_atomic(path: str | os.PathLike, obj: Any, indent: int | None = 2) -> Path:
    """``obj`` as JSON (``dumps``), written atomically, with a final newline."""
    path = Path(path)
    text = dumps(obj, indent=indent)
    with atomic_write(path, "w") as fh:
        fh.write(text)
        fh.write("\n")
    return path


def dumps(obj: Any, indent: int | None = None, sort_keys: bool = False) -> str:
    """The project's JSON: numpy values, tensors and paths as plain types, NaN and inf as null."""
    return json.dumps(to_jsonable(obj), indent=indent, allow_nan=False, sort_keys=sort_keys)


def to_jsonable(obj: Any) -> Any:
    """Plain JSON types from numpy scalars / arrays, paths, tuples and sets; NaN and inf -> None."""
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        v = float(obj)
        return v if math.isfinite(v) else None
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if obj is None or isinstance(obj, str):
        return obj
    if hasattr(obj, "item") and callable(obj.item):  # 0-d tensors and the like
        return to_jsonable(obj.item())
    raise TypeError(f"cannot write a {type(obj).__name__} to JSON")


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _umask() -> int:
    try:  # Linux: read it without changing it (os.umask would race with other threads)
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return 0o022


def _fsync_dir(directory: Path) -> None:
    """Make the rename itself durable (POSIX); a no-op where directories cannot be opened."""
    with contextlib.suppress(OSError, AttributeError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
