"""Atomic writes: a file (or folder) appears complete at its path, or not at all.

What pkd writes that a crash must not leave half-written (checkpoints, exported students and
Ultralytics files, a run's ``config.yaml`` and ``results.json``, ``metrics.jsonl`` when it is
rewritten, generated datasets) is written to a temporary path next to its target, flushed to
disk, and renamed onto the target. The rename is
atomic on one filesystem, so at any moment -- a crash, a ``kill -9``, a full disk -- the target
holds the previous complete content or the new one::

    with atomic_path("run/last.pt") as temp:
        torch.save(checkpoint, temp)

Temporary names are ``.<target name>.<writer pid>.<random>.tmp``: hidden, in the target's folder
(the same filesystem), and owned by a process whose liveness can be checked, so the next write
of the same target deletes what a crashed writer left behind (:func:`remove_stale_temps`).
Only one process should write a given path: under DDP, write on the main process only.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["atomic_link", "atomic_path", "atomic_write_text", "fsync_directory", "remove_stale_temps", "temp_path"]

_TEMP_PATTERN = re.compile(r"^\.(?P<target>.+)\.(?P<pid>\d+)\.[0-9a-f]+\.tmp$")


def temp_path(path: str | os.PathLike) -> Path:
    """A fresh temporary name next to ``path``, owned by this process (nothing is created)."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


def fsync_directory(directory: str | os.PathLike) -> None:
    """Makes a rename in ``directory`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # Windows cannot open a directory; its renames are journaled by NTFS
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems (e.g. certain network mounts) refuse fsync on directories
        pass
    finally:
        os.close(fd)


def _writer_alive(pid: int) -> bool:
    """Whether the process that owns a temporary path may still be writing it."""
    if pid == os.getpid():
        return True  # another thread of this process may be writing the same target right now
    if os.name != "posix":
        # No cheap liveness probe: os.kill(pid, 0) sends CTRL_C_EVENT on Windows.
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        return True
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def remove_stale_temps(path: str | os.PathLike) -> None:
    """Deletes the temporary files or folders that crashed writers of ``path`` left behind.

    Temporaries of live processes (this one included) and of other targets are kept.
    """
    path = Path(path)
    try:
        entries = list(path.parent.iterdir())
    except FileNotFoundError:
        return
    for entry in entries:
        match = _TEMP_PATTERN.match(entry.name)
        if match and match["target"] == path.name and not _writer_alive(int(match["pid"])):
            _remove(entry)


def _fsync_file(path: Path) -> None:
    # O_RDWR, not O_RDONLY: Windows' fsync (_commit) needs a descriptor opened for writing.
    fd = os.open(path, os.O_RDWR | getattr(os, "O_BINARY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path to write ``path``'s new content to; renamed onto ``path`` on a clean exit.

    The temporary file exists (empty) when the block starts, created with the permissions a
    plain ``open(path, "w")`` would give (the umask applies, unlike ``tempfile``'s 0o600); the
    block may overwrite it by path (``torch.save``, ``onnx.save``). On exit its data is fsynced
    before the rename makes it visible, and the rename itself is fsynced. If the block raises
    (``KeyboardInterrupt`` included), the temporary file is removed and ``path`` is untouched.
    Stale temporaries of ``path`` left by crashed writers are removed first.

    Args:
        path: The target file; its folder is created if needed.

    Yields:
        The temporary path, in ``path``'s folder.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path)
    temp = temp_path(path)
    os.close(os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666))
    try:
        yield temp
        _fsync_file(temp)  # the data must be on disk before the rename makes it visible
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    fsync_directory(path.parent)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """``Path(path).write_text(text)``, atomically (see :func:`atomic_path`)."""
    path = Path(path)
    with atomic_path(path) as temp:
        temp.write_text(text)
    return path


def atomic_link(source: str | os.PathLike, path: str | os.PathLike) -> bool:
    """Makes ``path`` a hard link to ``source``, replacing ``path`` atomically.

    Returns:
        False, leaving ``path`` untouched, where the filesystem has no hard links (FAT, some
        network mounts): the caller then writes a copy.
    """
    path = Path(path)
    remove_stale_temps(path)
    temp = temp_path(path)
    try:
        os.link(source, temp)
    except OSError:
        return False
    try:
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    fsync_directory(path.parent)
    return True
