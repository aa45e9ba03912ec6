"""Atomic writes: readable by whoever the umask allows (not 0600/0700), leftovers cleaned, renames recovered."""

from __future__ import annotations

import os
import stat

import pytest

from pocketlm.atomic import AtomicDir, atomic_write_text, clean_stale_temporaries, replace_dir


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.parametrize("umask,file_mode,dir_mode", [(0o022, 0o644, 0o755), (0o002, 0o664, 0o775),
                                                     (0o077, 0o600, 0o700)])
def test_atomic_writes_honour_the_umask(tmp_path, umask, file_mode, dir_mode):
    old = os.umask(umask)
    try:
        atomic_write_text(tmp_path / "a.json", "{}")
        with AtomicDir(tmp_path / "folder") as tmp:
            (tmp / "inner").mkdir()
            atomic_write_text(tmp / "inner" / "b.txt", "x")  # a tempfile-based writer inside
    finally:
        os.umask(old)
    assert _mode(tmp_path / "a.json") == file_mode
    assert _mode(tmp_path / "folder") == dir_mode and _mode(tmp_path / "folder" / "inner") == dir_mode
    assert _mode(tmp_path / "folder" / "inner" / "b.txt") == file_mode


def test_a_failed_atomic_dir_leaves_the_old_folder(tmp_path):
    final = tmp_path / "model"
    with AtomicDir(final) as tmp:
        (tmp / "w").write_text("old")
    with pytest.raises(RuntimeError), AtomicDir(final) as tmp:
        (tmp / "w").write_text("new")
        raise RuntimeError("crash while writing")
    assert (final / "w").read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["model"]


def test_stale_temporaries_are_removed_and_a_half_replaced_folder_is_put_back(tmp_path):
    (tmp_path / ".step-0000004.ab12.tmp").mkdir()
    (tmp_path / ".latest.x1.tmp").write_text("step-0000004")
    old = tmp_path / ".data.old"  # killed between replace_dir's two renames: data is missing
    old.mkdir()
    (old / "manifest.json").write_text("{}")
    (tmp_path / ".keep").write_text("not ours")
    removed = clean_stale_temporaries(tmp_path)
    assert sorted(p.name for p in removed) == [".latest.x1.tmp", ".step-0000004.ab12.tmp"]
    assert (tmp_path / "data" / "manifest.json").exists() and (tmp_path / ".keep").exists()


def test_replace_dir_swaps_in_the_new_folder(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "v").write_text("1")
    (tmp_path / "new").mkdir()
    (tmp_path / "new" / "v").write_text("2")
    replace_dir(tmp_path / "new", tmp_path / "out")
    assert (tmp_path / "out" / "v").read_text() == "2" and sorted(p.name for p in tmp_path.iterdir()) == ["out"]
