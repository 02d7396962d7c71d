"""Where onnxq writes: every destination is checked before any work, and every file is written the same safe way.

A run that calibrates for ten minutes and only then finds that it cannot write its output wastes the
work; one that writes over a FIFO, a device node or a file it reads damages data. So the library entry
points (``quantize_file``, ``calibrate_file``) call :func:`check_destinations` before loading weights
or calibrating. It refuses, with one line naming the path and the fix:

- an empty path, or one spelled as a folder (ending in ``/``, ``.`` or ``..``);
- an existing destination that is a directory or not a regular file (FIFO, socket, device node, or a
  symbolic link to one); a link to a regular file is replaced as a link, its target is untouched;
- a destination whose folder cannot be created (a parent is a file) or is not writable;
- a destination that is a file the run reads (same path, symbolic link or hard link), or an existing
  file inside a folder the run reads (a calibration folder);
- two destinations that collide (``-o`` equal to the report folder or to one of its files).

Writers create a temporary file ``.NAME.onnxqPID-HOST.XXXXXXXX.tmp`` beside the destination (mode
``0666 & ~umask``, or the replaced file's mode), then rename it over the destination. A temporary file
of this naming left by a process that was killed (SIGKILL, power loss) is removed by the next write to
that destination: only when its PID is dead on this host and it has not changed for a minute, so a
concurrent writer's file is never touched.
"""

from __future__ import annotations

import json
import os
import socket
import stat
import tempfile
import time
import zlib
from pathlib import Path
from typing import IO, Any, Iterable, NamedTuple

from onnxq.errors import DestinationError, ModelSaveError

__all__ = ["Dest", "Read", "check_destinations", "temp_beside", "write_text_atomic", "write_json_atomic",
           "remove_stale_temps", "new_file_mode"]

STALE_AFTER_S = 60.0  # a dead writer's temp file is removed once it has not changed for this long
_FOREIGN_STALE_AFTER_S = 24 * 3600.0  # another host's temp file (a shared folder): PIDs mean nothing here


class Dest(NamedTuple):
    """A file (or, with ``folder``, a folder) a run will write; ``role`` names it in messages."""

    path: str | os.PathLike[str]
    role: str
    example: str = "model.onnx"  # a file name to suggest when the path is a folder (for a folder: what it holds)
    folder: bool = False


class Read(NamedTuple):
    """A file or folder a run reads (and so must never write over); ``role`` names it in messages.

    For a folder, ``suffixes`` are the file types read from it (a calibration folder: images, arrays):
    a destination of such a type inside it is refused, existing or not (it would change the data), while
    other files there (an earlier output beside a model's test_data_set) may be replaced. None: every
    existing file inside it is refused.
    """

    path: str | os.PathLike[str] | None
    role: str
    suffixes: frozenset[str] | None = None


def _kind(mode: int) -> str:
    """What a non-regular file is, in words."""
    kinds = ((stat.S_ISDIR, "directory"), (stat.S_ISFIFO, "named pipe (FIFO)"), (stat.S_ISCHR, "character device"),
             (stat.S_ISBLK, "block device"), (stat.S_ISSOCK, "socket"))  # fmt: skip
    return next((name for test, name in kinds if test(mode)), "special file")


def _stat(p: Path) -> os.stat_result | None:
    """``os.stat`` following links; None when nothing is there (or a parent is not a folder)."""
    try:
        return os.stat(p)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as exc:
        raise DestinationError(f"cannot check {p}: {exc.strerror or exc}; choose another path") from None


def _check_folder(anc: Path, p: Path, role: str) -> None:
    """The folder ``anc`` that will hold ``p``, or its nearest existing ancestor, must be a writable folder
    (the missing ones are created)."""
    while _stat(anc) is None and anc != anc.parent:
        anc = anc.parent
    if not anc.is_dir():
        raise DestinationError(f"cannot write the {role} {p}: {anc} is a file, not a folder; choose another path")
    if not os.access(anc, os.W_OK | os.X_OK):
        raise DestinationError(f"cannot write the {role} {p}: the folder {anc} is not writable (permissions or a "
                               "read-only file system); choose a writable folder")  # fmt: skip


def _check_one(d: Dest) -> Path:
    """One destination on its own; returns its absolute path."""
    raw = os.fspath(d.path)
    if not raw.strip():
        raise DestinationError(f"the {d.role} path is empty; give a file name such as {d.example}")
    p = Path(os.path.abspath(raw))
    if not d.folder and os.path.basename(raw) in ("", ".", ".."):  # "out/", "out/.": a folder by its spelling
        raise DestinationError(f"the {d.role} {raw} names a folder, not a file; give a file name such as {p / d.example}")
    st = _stat(p)
    if st is not None and d.folder and not stat.S_ISDIR(st.st_mode):
        raise DestinationError(f"the {d.role} {p} exists and is not a folder; give a new or existing folder "
                               f"for {d.example}")  # fmt: skip
    if st is not None and not d.folder and stat.S_ISDIR(st.st_mode):
        raise DestinationError(f"the {d.role} {p} is a directory; give a file name such as {p / d.example}")
    if st is not None and not d.folder and not stat.S_ISREG(st.st_mode):
        link = f" (a symbolic link to {os.path.realpath(p)})" if p.is_symlink() else ""
        raise DestinationError(f"the {d.role} {p}{link} is a {_kind(st.st_mode)}, not a regular file; onnxq only "
                               "replaces regular files: choose another path")  # fmt: skip
    _check_folder(p if st is not None and d.folder else p.parent, p, d.role)
    return p


def _same_file(a: Path, b: Path) -> bool:
    """Same path after resolving links, or the same inode (a hard link)."""
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _inside_folder(p: Path, r: Read, folder: Path) -> bool:
    """``p`` is a file of the kind read from ``folder`` inside it, or (by inode) a hard link of one there."""
    st = _stat(p)
    if Path(os.path.realpath(p)).is_relative_to(os.path.realpath(folder)):
        if r.suffixes is not None and p.suffix.lower() in r.suffixes:
            return True
        if st is not None and r.suffixes is None:
            return True
    if st is None or st.st_nlink < 2:
        return False
    for root, _dirs, names in os.walk(folder):
        for name in names:
            with_stat = _stat(Path(root) / name)
            if with_stat is not None and os.path.samestat(st, with_stat):
                return True
    return False


def _check_reads(p: Path, d: Dest, reads: Iterable[Read]) -> None:
    """``p`` (destination ``d``) must be none of the files read, nor a file inside a folder read."""
    for r in reads:
        if r.path is None or not os.fspath(r.path):
            continue
        q = Path(os.path.abspath(os.path.expanduser(os.fspath(r.path))))
        st = _stat(q)
        if st is None:
            continue
        if stat.S_ISDIR(st.st_mode):
            if not d.folder and _inside_folder(p, r, q):
                raise DestinationError(f"refusing to write {p}: it is (or would be) one of the files read from the "
                                       f"{r.role} folder {q}; write the {d.role} elsewhere")  # fmt: skip
        elif _same_file(p, q):
            raise DestinationError(f"refusing to overwrite the {r.role} {q}: the {d.role} {p} is the same file; "
                                   "choose a different path")  # fmt: skip


def _check_collisions(checked: list[tuple[Dest, Path]]) -> None:
    """No two destinations the same path; no destination inside a destination that is a file."""
    for i, (a, pa) in enumerate(checked):
        for b, pb in checked[i + 1:]:
            ra, rb = Path(os.path.realpath(pa)), Path(os.path.realpath(pb))
            if ra == rb:
                raise DestinationError(f"the {a.role} and the {b.role} are the same path {pa}; give them different paths")
            for (x, rx), (y, ry) in (((a, ra), (b, rb)), ((b, rb), (a, ra))):
                if not x.folder and ry.is_relative_to(rx):
                    raise DestinationError(f"the {y.role} {ry} would be inside the {x.role} {rx}, which is a file; "
                                           "give them different paths")  # fmt: skip


def check_destinations(dests: Iterable[Dest], reads: Iterable[Read] = ()) -> list[Path]:
    """Refuse, before any work, every destination that cannot be written safely (see the module docstring).

    Returns the absolute paths, in order. Raises DestinationError: one line naming the path and the fix.
    """
    reads = list(reads)
    checked = [(d, _check_one(d)) for d in dests]
    for d, p in checked:
        _check_reads(p, d, reads)
    _check_collisions(checked)
    return [p for _, p in checked]


def new_file_mode() -> int:
    """The mode a plain ``open(path, "w")`` would give: 0666 less the process umask (0644 under umask 022)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def _host_tag() -> str:
    """Eight hex digits naming this host, so a temp file from another host (a shared folder) is told apart."""
    return f"{zlib.crc32(socket.gethostname().encode()):08x}"


def _temp_owner(name: str, dest: Path) -> tuple[int, str] | None:
    """(pid, host tag) of a temporary file ``name`` of our naming for ``dest``; None for any other file."""
    prefix = f".{dest.name}.onnxq"
    if not (name.startswith(prefix) and name.endswith(".tmp")):
        return None
    parts = name[len(prefix):-len(".tmp")].split(".")
    pid, _, host = parts[0].partition("-")
    if len(parts) != 2 or not pid.isdigit() or len(host) != 8:
        return None
    return int(pid), host


def _alive(pid: int) -> bool:
    """Whether a process ``pid`` exists on this host (another user's counts)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # EPERM: it exists, owned by someone else
    return True


def remove_stale_temps(dest: Path) -> list[Path]:
    """Remove temporary files of our naming for ``dest`` left by dead writers; return those removed.

    A file is stale when its writer's PID no longer exists on this host and it has not changed for
    :data:`STALE_AFTER_S` seconds (from another host: a day), so a live concurrent writer's file stays.
    """
    removed, now, here = [], time.time(), _host_tag()
    try:
        entries = list(os.scandir(dest.parent))
    except OSError:
        return []
    for entry in entries:
        owner = _temp_owner(entry.name, dest)
        if owner is None or not entry.is_file(follow_symlinks=False):
            continue
        pid, host = owner
        age = now - entry.stat(follow_symlinks=False).st_mtime
        stale = age > STALE_AFTER_S and not _alive(pid) if host == here else age > _FOREIGN_STALE_AFTER_S
        if stale:
            try:
                os.unlink(entry.path)
                removed.append(Path(entry.path))
            except OSError:
                pass  # another run removed it first, or the folder is not ours to clean
    return removed


def temp_beside(dest: Path, temps: list[Path], mode: str = "wb") -> IO[Any]:
    """A new temporary file beside ``dest`` (recorded in ``temps``), with dest's mode or :func:`new_file_mode`.

    Stale temporary files of earlier, killed runs for the same destination are removed first.
    """
    remove_stale_temps(dest)
    fd, name = tempfile.mkstemp(prefix=f".{dest.name}.onnxq{os.getpid()}-{_host_tag()}.", suffix=".tmp", dir=dest.parent)
    temps.append(Path(name))
    st = _stat(dest)
    os.chmod(name, (st.st_mode & 0o777) if st is not None and stat.S_ISREG(st.st_mode) else new_file_mode())
    return os.fdopen(fd, mode) if "b" in mode else os.fdopen(fd, mode, encoding="utf-8")


def write_text_atomic(path: str | os.PathLike[str], text: str, *, role: str = "output file") -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically: checked destination, temp file, fsync, rename.

    The parent folder is created. Raises DestinationError for a destination :func:`check_destinations`
    refuses, ModelSaveError when the write fails (disk full...); a failed write leaves any previous file
    intact and no temporary file.
    """
    (dest,) = check_destinations([Dest(path, role, example=Path(path).name or "out.json")])
    dest.parent.mkdir(parents=True, exist_ok=True)
    temps: list[Path] = []
    try:
        with temp_beside(dest, temps, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temps[0], dest)
    except BaseException as exc:
        for tmp in temps:
            tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise ModelSaveError(f"cannot write the {role} {dest}: {exc.strerror or exc}") from None
        raise
    return dest


def write_json_atomic(path: str | os.PathLike[str], doc: Any, *, role: str = "output file", indent: int = 2) -> Path:
    """:func:`write_text_atomic` of ``doc`` as JSON (non-JSON values as ``str``), ending in a newline."""
    return write_text_atomic(path, json.dumps(doc, indent=indent, default=str) + "\n", role=role)
