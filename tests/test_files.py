"""`sam_repro.files`: the one atomic writer (temporary file beside the target, fsync, rename)."""

from __future__ import annotations

import json
import os
import stat

import pytest

from sam_repro.files import atomic_write_bytes, atomic_write_json, atomic_write_text, remove_stale_temporaries


def test_writes_whole_files_with_the_mode_open_would_give(tmp_path):
    path = atomic_write_text(tmp_path / "deep" / "a.txt", "one\ntwo\n")
    assert path.read_bytes() == b"one\ntwo\n"
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    assert stat.S_IMODE(path.stat().st_mode) == stat.S_IMODE(plain.stat().st_mode)
    assert sorted(os.listdir(path.parent)) == ["a.txt"]  # no temporary file left


def test_json_is_indented_sorted_unless_told_and_ends_in_a_newline(tmp_path):
    atomic_write_json(tmp_path / "s.json", {"b": 1, "a": 2})
    assert (tmp_path / "s.json").read_text() == '{\n  "a": 2,\n  "b": 1\n}\n'
    atomic_write_json(tmp_path / "u.json", {"b": 1, "a": 2}, sort_keys=False)
    assert list(json.loads((tmp_path / "u.json").read_text())) == ["b", "a"]


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "keep.bin"
    path.write_bytes(b"old")

    def fail(f):
        f.write(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write_bytes(path, fail)
    assert path.read_bytes() == b"old" and os.listdir(tmp_path) == ["keep.bin"]


def test_stale_temporaries_of_a_killed_writer_are_removed(tmp_path):
    (tmp_path / ".last.pt.abc123.tmp").write_bytes(b"half")
    (tmp_path / "last.pt").write_bytes(b"whole")
    assert remove_stale_temporaries(tmp_path / "last.pt") == 1
    assert os.listdir(tmp_path) == ["last.pt"]
