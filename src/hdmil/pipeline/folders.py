"""Where a slide's results go, and whether they are already there.

* ``safe_name``: a slide's stem made safe for any file system (no ``.``/``..``, no separators or
  reserved characters, undecodable bytes replaced); ``plan_slides`` gives each slide of one call a
  unique folder name (the stem, plus a short hash of the resolved path when two slides would share
  it, or when the folder holds another slide's results) and runs a slide named twice once.
* ``run_key``: what produced a result (model hash, LIPN on/off and thresholds, encoder, mpp, ROI);
  ``report.json`` records it, and a result is reused only when it matches (``result_state``).
* ``slide_lock``: a per-slide lock file (pid and host, created with O_EXCL) so that two runs into
  one output folder never do the same slide; a lock left by a dead process on this host is taken
  over. ``remove_dead_temps`` removes only the temp files (``.<name>.<pid>.<hex>.tmp``) of dead
  processes.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import secrets
import socket
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hdmil.errors import HDMILError
from hdmil.files import WriteError, to_jsonable

__all__ = [
    "DISK_ERRNOS", "SlideBusyError", "SlideEntry", "disk_error", "pid_alive", "plan_slides",
    "printable", "remove_dead_temps", "result_state", "run_key", "safe_name", "slide_lock",
]

# Characters no file system takes in a name (Windows' set, controls, both separators).
_BAD_CHARS = re.compile(r'[\x00-\x1f\x7f/\\:*?"<>|\ufffd]')
_RESERVED = {"con", "prn", "aux", "nul", *(f"com{i}" for i in range(10)), *(f"lpt{i}" for i in range(10))}
MAX_NAME_BYTES = 120  # leaves room for "-<hash>" and the temp names under NAME_MAX (255)
_TEMP = re.compile(r"^\..+\.(\d+)\.[0-9a-f]+\.tmp$")
# Errors of the disk results go to: retrying does not help; that slide fails, the next one runs.
DISK_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG})
# A lock file that is still empty this long after it was created is a crash's leftover.
_EMPTY_LOCK_SECONDS = 60.0


class SlideBusyError(HDMILError):
    """Another live process holds the slide's lock: it is working on that slide now."""


def printable(text: Any) -> str:
    """``text`` as valid UTF-8 for printing and for files: bytes a file name held that are not
    UTF-8 (``os.fsdecode``'s surrogates) become ``\\xNN``."""
    text = os.fsdecode(text) if isinstance(text, (bytes, os.PathLike)) else str(text)
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


def disk_error(shown: str, exc: OSError) -> str:
    """One line for an OSError of the disk while running ``shown``: what, and on which file."""
    where = f" ({printable(exc.filename)})" if exc.filename else ""
    return f"{shown}: {exc.strerror or ' '.join(str(exc).split())}{where}"


def safe_name(path: str | os.PathLike | bytes) -> str:
    """The slide's stem as a folder name any file system takes: never empty, ``.`` or ``..``."""
    raw = os.path.basename(os.fsencode(path))
    stem = Path(raw.decode("utf-8", "replace")).stem
    name = _BAD_CHARS.sub("_", stem).strip(" .")
    if not name:
        name = "slide"
    if name.split(".")[0].casefold() in _RESERVED:
        name = f"_{name}"
    encoded = name.encode("utf-8")
    if len(encoded) > MAX_NAME_BYTES:
        name = encoded[:MAX_NAME_BYTES].decode("utf-8", "ignore").rstrip(" .")
    return name


def _resolved(path: Path) -> str:
    return os.path.realpath(os.fspath(path))


def _short_hash(resolved: str) -> str:
    return hashlib.sha256(os.fsencode(resolved)).hexdigest()[:8]


@dataclass(frozen=True)
class SlideEntry:
    """One slide of a run: its path as given, its resolved path, its results folder's name."""

    path: Path
    resolved: str
    name: str

    @property
    def shown(self) -> str:
        """The path as given, printable."""
        return printable(self.path)

    def folder(self, out: str | os.PathLike) -> Path:
        """``out/<name>``; HDMILError if that resolves outside ``out`` (a link pointing away)."""
        folder = Path(out) / self.name
        if os.path.dirname(os.path.realpath(folder)) != os.path.realpath(out):
            raise HDMILError(f"{printable(folder)}: the results folder of {self.shown} resolves "
                             f"outside {printable(out)}; remove it or choose another --out")
        return folder


def _results_owner(folder: Path) -> str | None:
    """The resolved slide path whose results ``folder`` holds (None: none, or cannot tell)."""
    for name in ("report.json", "prescreen.json"):
        try:
            report = json.loads((folder / name).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        key = report.get("run_key") if isinstance(report, dict) else None
        if isinstance(key, dict) and key.get("slide"):
            return str(key["slide"])
        path = report.get("path") or report.get("slide_path") if isinstance(report, dict) else None
        if path:
            return printable(os.path.realpath(str(path)))
    return None


def plan_slides(paths: Iterable[str | os.PathLike], out: str | os.PathLike | None = None
                ) -> tuple[list[SlideEntry], dict[str, int]]:
    """Each distinct slide (by resolved path) once, with a unique folder name; and the slides
    named more than once (printable path first given -> times named). With ``out``, a folder
    that holds another slide's results is not reused: that slide gets the hashed name."""
    entries: list[SlideEntry] = []
    seen: dict[str, int] = {}
    used: set[str] = set()
    repeats: dict[str, int] = {}
    for p in (Path(os.fsdecode(p)) for p in paths):
        resolved = _resolved(p)
        if resolved in seen:  # counted under the path it was first named by
            first = entries[seen[resolved]].shown
            repeats[first] = repeats.get(first, 1) + 1
            continue
        seen[resolved] = len(entries)
        name = safe_name(p)
        owner = _results_owner(Path(out) / name) if out is not None else None
        if name.casefold() in used or owner not in (None, printable(resolved)):
            name = f"{name}-{_short_hash(resolved)}"
        used.add(name.casefold())
        entries.append(SlideEntry(p, resolved, name))
    return entries, repeats


# --------------------------------------------------------------------------- what produced a result


def run_key(model: Any, use_lipn: bool, mpp: float | None, encoder: str | None,
            slide: str | os.PathLike | None) -> dict[str, Any]:
    """What a result depends on: the slide (resolved path), the model's hash, LIPN on/off and its
    thresholds, the encoder, the mpp asked for (None: the file's) and the ROI (none yet)."""
    lipn = None
    if use_lipn and model.lipn is not None:
        cfg = model.lipn.cfg
        lipn = {"threshold": cfg.threshold, "class_thresholds": cfg.class_thresholds,
                "dilation": cfg.dilation, "views": cfg.views}
    return to_jsonable({
        "slide": printable(_resolved(Path(os.fsdecode(slide)))) if slide is not None else None,
        "model_sha256": str(model.sha256 or ""),
        "use_lipn": bool(use_lipn),
        "lipn": lipn,
        "encoder": str(encoder or ""),
        "mpp": float(mpp) if mpp is not None else None,
        "roi": None,
    })


def result_state(folder: Path, key: dict[str, Any]) -> tuple[str, str]:
    """("done" | "absent" | "stale", why): whether ``folder`` holds complete results made with
    ``key``; for "stale", the settings that differ."""
    report_path = folder / "report.json"
    if not (report_path.is_file() and (folder / "patches.h5").is_file()):
        return "absent", "no complete results"
    try:
        report = json.loads(report_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return "stale", "its report.json cannot be read"
    found = report.get("run_key") if isinstance(report, dict) else None
    if not isinstance(found, dict):
        return "stale", "its report.json does not record the settings that made it"
    differ = [k for k in key if found.get(k) != key[k]]
    if differ:
        return "stale", "made with another " + ", ".join(differ)
    return "done", ""


# --------------------------------------------------------------------------- locks and temp files


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid runs on this host."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    except OSError:
        return False
    return True


def _read_lock(lock: Path) -> dict[str, Any] | None:
    """The lock's holder; None when it is empty or unreadable (being written, or a crash's)."""
    try:
        holder = json.loads(lock.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return holder if isinstance(holder, dict) else None


def _is_stale(lock: Path, holder: dict[str, Any] | None) -> bool:
    if holder is None:
        try:
            return time.time() - lock.stat().st_mtime > _EMPTY_LOCK_SECONDS
        except FileNotFoundError:
            return True
    return holder.get("host") == socket.gethostname() and not pid_alive(int(holder.get("pid", 0)))


def _create_lock(lock: Path, me: dict[str, Any]) -> bool:
    """Create ``lock`` holding ``me``, atomically; False if it exists."""
    try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    except OSError as exc:
        raise WriteError(f"{printable(lock)}: cannot create the slide's lock ({exc.strerror or exc})") from exc
    try:
        os.write(fd, json.dumps(me).encode())
    except OSError as exc:
        os.close(fd)
        lock.unlink(missing_ok=True)
        raise WriteError(f"{printable(lock)}: cannot write the slide's lock ({exc.strerror or exc})") from exc
    os.close(fd)
    return True


def _take_over(lock: Path, stale: dict[str, Any] | None, me: dict[str, Any]) -> bool:
    """Replace a stale lock by ours. A guard file (O_EXCL) makes one process do it; the lock is
    removed only while it still holds what was judged stale."""
    guard = lock.with_name(lock.name + ".takeover")
    if not _create_lock(guard, me):
        if _is_stale(guard, _read_lock(guard)):
            guard.unlink(missing_ok=True)
        return False
    try:
        if _read_lock(lock) == stale:
            lock.unlink(missing_ok=True)
        return _create_lock(lock, me)
    finally:
        guard.unlink(missing_ok=True)


def _acquire(lock: Path, me: dict[str, Any], shown: str) -> None:
    for _ in range(3):
        if _create_lock(lock, me):
            return
        holder = _read_lock(lock)
        if not _is_stale(lock, holder):
            holder = holder or {}
            raise SlideBusyError(
                f"{shown}: another run (pid {holder.get('pid', '?')} on {holder.get('host', '?')}) "
                f"is working on it; skipped (lock {printable(lock)})")
        if _take_over(lock, holder, me):
            return
        time.sleep(0.05)  # another process is taking the stale lock over: look again
    raise SlideBusyError(f"{shown}: could not take its lock {printable(lock)}; skipped")


@contextlib.contextmanager
def slide_lock(out: str | os.PathLike, name: str, shown: str = "") -> Iterator[Path]:
    """Hold ``out/.<name>.lock`` while the block runs; SlideBusyError if a live process holds it."""
    lock = Path(out) / f".{name}.lock"
    me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(),
          "token": secrets.token_hex(8)}
    _acquire(lock, me, shown or name)
    try:
        yield lock
    finally:
        if _read_lock(lock) == me:
            lock.unlink(missing_ok=True)


def remove_dead_temps(folder: Path) -> list[Path]:
    """Remove the temp files (``.<name>.<pid>.<hex>.tmp``) whose writer is not a live process
    here; a temp name without a pid (an older writer's) counts as dead. Call it while holding
    the slide's lock, so that no other run writes there. Returns what was removed."""
    removed = []
    if not folder.is_dir():
        return removed
    for tmp in folder.glob(".*.tmp"):
        m = _TEMP.match(tmp.name)
        if m and pid_alive(int(m.group(1))):
            continue
        tmp.unlink(missing_ok=True)
        removed.append(tmp)
    return removed
