"""tulu3.fileio: the one atomic write (temp beside the target, fsync, os.replace, fsync dir)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tulu3 import fileio
from tulu3.fileio import atomic_open, atomic_path


class Boom(Exception):
    pass


def test_new_file_is_written_and_nothing_else_is_left(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "out.txt"  # the parent is created
    with atomic_open(target) as f:
        f.write("héllo\n")
    assert target.read_text(encoding="utf-8") == "héllo\n"
    assert os.listdir(target.parent) == ["out.txt"]


def test_failure_mid_write_keeps_the_old_file_and_leaves_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "out.txt"
    target.write_text("old\n")
    with pytest.raises(Boom), atomic_open(target) as f:
        f.write("half of the new")
        f.flush()  # the bytes are on disk in the temporary: only the rename would publish them
        assert target.read_text() == "old\n"
        raise Boom
    assert target.read_text() == "old\n"
    assert os.listdir(tmp_path) == ["out.txt"]


def test_ctrl_c_mid_write_keeps_the_old_file(tmp_path: Path) -> None:
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    with pytest.raises(KeyboardInterrupt), atomic_open(target, "wb") as f:
        f.write(b"new")
        raise KeyboardInterrupt
    assert target.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["out.bin"]


def test_failed_rename_keeps_the_old_file_and_leaves_no_temp(tmp_path: Path,
                                                             monkeypatch) -> None:
    target = tmp_path / "out.txt"
    target.write_text("old\n")

    def refuse(src, dst):
        raise OSError("no space left on device")

    monkeypatch.setattr(fileio.os, "replace", refuse)
    with pytest.raises(OSError, match="no space"), atomic_open(target) as f:
        f.write("new\n")
    assert target.read_text() == "old\n"
    assert os.listdir(tmp_path) == ["out.txt"]


def test_rewriting_a_file_from_itself_reads_the_old_contents(tmp_path: Path) -> None:
    target = tmp_path / "rows.txt"
    target.write_text("a\nb\n")
    with open(target) as src, atomic_open(target) as dst:
        dst.writelines(line.upper() for line in src)
    assert target.read_text() == "A\nB\n"


def test_every_file_and_the_directory_are_fsynced_before_the_rename(tmp_path: Path,
                                                                    monkeypatch) -> None:
    """The order that makes the write durable: contents fsynced, then renamed, then the parent
    directory fsynced (the rename itself)."""
    events: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(fileio.os, "fsync",
                        lambda fd: (events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))),
                                    real_fsync(fd))[1])
    monkeypatch.setattr(fileio.os, "replace",
                        lambda a, b: (events.append(("replace", str(b))), real_replace(a, b))[1])
    target = tmp_path / "entry"
    with atomic_path(target, directory=True) as tmp:
        (tmp / "x.npy").write_bytes(b"1")
        (tmp / "meta.json").write_text("{}")
    assert sorted(p.name for p in target.iterdir()) == ["meta.json", "x.npy"]
    rename = events.index(("replace", str(target)))
    synced_before = {Path(p).name for kind, p in events[:rename] if kind == "fsync"}
    assert {"x.npy", "meta.json"} <= synced_before  # the temp dir's files, by their old names
    assert any(Path(p).name.startswith(".entry.") for kind, p in events[:rename])  # the dir
    assert events[rename + 1:] == [("fsync", os.path.realpath(tmp_path))]


def test_directory_failure_removes_the_temporary(tmp_path: Path) -> None:
    target = tmp_path / "entry"
    with pytest.raises(Boom), atomic_path(target, directory=True) as tmp:
        (tmp / "a.npy").write_bytes(b"1")
        raise Boom
    assert os.listdir(tmp_path) == []


def test_directory_onto_a_finished_one_raises_and_keeps_it(tmp_path: Path) -> None:
    """Two builders of one cache entry: the second rename fails, the first entry stays whole."""
    target = tmp_path / "entry"
    target.mkdir()
    (target / "meta.json").write_text("first")
    with pytest.raises(OSError), atomic_path(target, directory=True) as tmp:
        (tmp / "meta.json").write_text("second")
    assert (target / "meta.json").read_text() == "first"
    assert os.listdir(tmp_path) == ["entry"]


def test_bad_mode_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="mode"), atomic_open(tmp_path / "x", "a"):
        pass
