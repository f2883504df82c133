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
