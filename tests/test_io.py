"""Tests of pkd.io: atomic writes leave the old file or the new one, never part of one."""

import os
import subprocess
import sys

import pytest

import pkd.io
from pkd.io import atomic_link, atomic_path, atomic_write_text, remove_stale_temps


def dead_pid():
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_atomic_write_replaces_the_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "sub" / "metrics.jsonl"
    atomic_write_text(path, "one\n")
    atomic_write_text(path, "two\n")
    assert path.read_text() == "two\n"
    assert [entry.name for entry in path.parent.iterdir()] == ["metrics.jsonl"]
    assert oct(path.stat().st_mode & 0o777) == oct(0o666 & ~_umask())  # what a plain open() would give


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_a_crash_while_writing_keeps_the_old_file(tmp_path):
    path = tmp_path / "last.pt"
    path.write_bytes(b"complete")
    with pytest.raises(OSError, match="disk full"), atomic_path(path) as temp:
        temp.write_bytes(b"PK\x03\x04 half a zip archive")
        raise OSError("disk full")
    assert path.read_bytes() == b"complete"
    assert [entry.name for entry in tmp_path.iterdir()] == ["last.pt"]


def test_a_crash_before_the_rename_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    path.write_bytes(b"complete")

    def interrupted(source, target):
        raise KeyboardInterrupt

    monkeypatch.setattr(pkd.io.os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt), atomic_path(path) as temp:
        temp.write_bytes(b"new")
    monkeypatch.undo()
    assert path.read_bytes() == b"complete"
    assert [entry.name for entry in tmp_path.iterdir()] == ["last.pt"]


def test_stale_temporaries_of_dead_writers_are_removed(tmp_path):
    path = tmp_path / "last.pt"
    stale = tmp_path / f".last.pt.{dead_pid()}.0badc0de.tmp"
    stale.write_bytes(b"truncated by a kill -9")
    stale_folder = tmp_path / f".last.pt.{dead_pid()}.0badc0df.tmp"  # e.g. a dataset folder being generated
    (stale_folder / "images").mkdir(parents=True)
    live = tmp_path / f".last.pt.{os.getppid()}.12345678.tmp"  # a live writer's file
    live.write_bytes(b"being written")
    other = tmp_path / f".best.pt.{dead_pid()}.0badc0de.tmp"
    other.write_bytes(b"")
    remove_stale_temps(path)
    assert not stale.exists() and not stale_folder.exists()
    assert live.exists() and other.exists()


def test_atomic_link_and_its_fallback(tmp_path, monkeypatch):
    source, target = tmp_path / "last.pt", tmp_path / "best.pt"
    source.write_bytes(b"weights")
    target.write_bytes(b"older")
    assert atomic_link(source, target)
    assert target.read_bytes() == b"weights" and os.path.samefile(source, target)

    def no_links(source, target):
        raise OSError("hard links not supported")

    monkeypatch.setattr(pkd.io.os, "link", no_links)
    source.unlink()
    source.write_bytes(b"newer")
    assert not atomic_link(source, target)
    assert target.read_bytes() == b"weights"
    assert sorted(entry.name for entry in tmp_path.iterdir()) == ["best.pt", "last.pt"]
