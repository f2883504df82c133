"""Atomic writes: a failure leaves the old file or folder exactly as it was."""

import pytest

from vaekit.atomic import atomic_folder, atomic_write_bytes


def test_atomic_write_bytes_replaces_and_leaves_no_temp(tmp_path):
    target = tmp_path / "sub" / "a.json"
    atomic_write_bytes(target, b"one")
    atomic_write_bytes(target, b"two")
    assert target.read_bytes() == b"two"
    assert sorted(p.name for p in target.parent.iterdir()) == ["a.json"]


def test_atomic_folder_swaps_in_the_new_folder(tmp_path):
    target = tmp_path / "model"
    with atomic_folder(target) as tmp:
        (tmp / "x.txt").write_text("old")
    with atomic_folder(target) as tmp:
        assert tmp != target and not (tmp / "x.txt").exists()
        (tmp / "x.txt").write_text("new")
    assert (target / "x.txt").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no temp or .old folder left


def test_atomic_folder_failure_keeps_the_old_folder(tmp_path):
    target = tmp_path / "model"
    with atomic_folder(target) as tmp:
        (tmp / "x.txt").write_text("old")
    with pytest.raises(RuntimeError, match="disk full"), atomic_folder(target) as tmp:
        (tmp / "x.txt").write_text("half")
        raise RuntimeError("disk full")
    assert (target / "x.txt").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_a_full_disk_is_a_storage_error_and_leaves_the_old_file(tmp_path):
    """A real 64 KiB tmpfs (root only): the old file stays whole, no temp file is left."""
    import errno
    import os
    import subprocess

    from vaekit.errors import StorageError

    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    fs = tmp_path / "fs"
    fs.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(fs)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        atomic_write_bytes(fs / "a.bin", b"old")
        with pytest.raises(StorageError) as exc:
            atomic_write_bytes(fs / "a.bin", b"x" * (1 << 20), what="write checkpoint")
        assert exc.value.errno == errno.ENOSPC and isinstance(exc.value, OSError)
        assert str(exc.value).startswith(f"no space left on device: cannot write checkpoint {fs / 'a.bin'}")
        assert (fs / "a.bin").read_bytes() == b"old"
        assert sorted(p.name for p in fs.iterdir()) == ["a.bin"]
        with pytest.raises(StorageError, match="^no space left on device"), atomic_folder(fs / "m") as tmp:
            (tmp / "w.bin").write_bytes(b"x" * (1 << 20))
        assert sorted(p.name for p in fs.iterdir()) == ["a.bin"]
    finally:
        subprocess.run(["umount", "-l", str(fs)], check=False)


def test_a_folder_swap_never_leaves_the_path_empty(tmp_path, monkeypatch):
    """The swap is one renameat2(RENAME_EXCHANGE) where Linux offers it; where it falls back to two renames,
    a crash between them leaves .<name>.old, which the next write of the path (or a run's start) puts back."""
    import vaekit.atomic as atomic
    from vaekit.atomic import atomic_folder, restore_interrupted

    target = tmp_path / "model"
    for version in ("1", "2"):
        with atomic_folder(target) as tmp:
            (tmp / "v").write_text(version)
        assert (target / "v").read_text() == version
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no .old, no temporary left
    assert atomic._exchange(tmp_path / "model", tmp_path / "model") in (True, False)
    # the fallback, interrupted between its renames: the path is gone, .model.old holds version 2
    (target).rename(tmp_path / ".model.old")
    assert restore_interrupted(target) and (target / "v").read_text() == "2"
    (target).rename(tmp_path / ".model.old")
    monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)
    with atomic_folder(target) as tmp:  # the next write first puts the old folder back, then replaces it
        (tmp / "v").write_text("3")
    assert (target / "v").read_text() == "3" and sorted(p.name for p in tmp_path.iterdir()) == ["model"]
