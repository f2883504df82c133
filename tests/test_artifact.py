"""The one artifact format: manifest, verification on every read, atomic writes, legacy folders,
and strict model loading on top of it. Every fault is made for real on the files."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from vaekit.artifact import (
    Artifact,
    read_artifact,
    rewrite_artifact,
    update_metrics,
    verify_artifact,
    write_artifact,
)
from vaekit.errors import (
    ArtifactError,
    ArtifactIntegrityError,
    InputError,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _flip(path: Path, where: float = 0.5) -> None:
    data = bytearray(path.read_bytes())
    data[int(len(data) * where)] ^= 0x01
    path.write_bytes(bytes(data))


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"w": torch.randn(3, 4, generator=g), "b": torch.arange(5, dtype=torch.int64)}


@pytest.fixture
def art_dir(tmp_path) -> Path:
    return write_artifact(tmp_path / "a", "model", {"x": 1, "nested": {"y": [1, 2]}}, _tensors(),
                          {"note": "hi"}, {"acc": 0.5}, files={"extra/notes.json": b'{"k": 1}\n'})


# -- the format ------------------------------------------------------------------------------------
def test_round_trip_and_the_manifest_matches_an_independent_hash(art_dir):
    art = read_artifact(art_dir)
    assert isinstance(art, Artifact) and art.kind == "model" and art.path == art_dir and not art.legacy
    assert art.config == {"x": 1, "nested": {"y": [1, 2]}} and art.metadata == {"note": "hi"}
    assert art.metrics == {"acc": 0.5}
    got = art.tensors()
    assert set(got) == {"w", "b"} and all(torch.equal(got[k], v) for k, v in _tensors().items())
    assert art.read_json("extra/notes.json") == {"k": 1}
    manifest = json.loads((art_dir / "manifest.json").read_text())
    on_disk = sorted(p.relative_to(art_dir).as_posix() for p in art_dir.rglob("*") if p.is_file())
    assert sorted(manifest["files"]) == [n for n in on_disk if n != "manifest.json"] == art.files
    for name, entry in manifest["files"].items():
        assert entry == {"sha256": _sha(art_dir / name), "size": (art_dir / name).stat().st_size}
    assert art.digest == _sha(art_dir / "manifest.json") == verify_artifact(art_dir).digest
    # the tensors file is plain safetensors: any reader gets the same tensors (no pickle anywhere)
    from safetensors.numpy import load_file

    assert (load_file(str(art_dir / "model.safetensors"))["w"] == _tensors()["w"].numpy()).all()


@pytest.mark.parametrize("name", ["config.json", "model.safetensors", "metrics.json", "extra/notes.json",
                                  "manifest.json"])
@pytest.mark.parametrize("where", [0.0, 0.5, 0.999])
def test_a_flipped_byte_in_any_file_is_refused_naming_the_file_and_both_hashes(art_dir, name, where):
    expected = json.loads((art_dir / "manifest.json").read_text())["files"].get(name, {}).get("sha256")
    _flip(art_dir / name, where)
    for call in (read_artifact, verify_artifact):
        with pytest.raises(ArtifactIntegrityError) as info:
            call(art_dir)
        err = info.value
        assert err.file == name and name in str(err)
        if name != "manifest.json":
            assert (err.expected, err.actual) == (expected, _sha(art_dir / name))
            assert expected in str(err) and err.actual in str(err)


def test_missing_extra_and_linked_files_are_errors_and_verify_lists_every_problem(art_dir, tmp_path):
    (art_dir / "metrics.json").unlink()
    (art_dir / "stray.txt").write_text("x")
    os.symlink(tmp_path, art_dir / "link")
    _flip(art_dir / "model.safetensors")
    with pytest.raises(ArtifactIntegrityError) as info:
        verify_artifact(art_dir)
    problems = {p[0]: p[1] for p in info.value.problems}
    assert set(problems) == {"metrics.json", "stray.txt", "link", "model.safetensors"}
    assert "missing" in problems["metrics.json"] and "not listed" in problems["stray.txt"]
    assert "symbolic link" in problems["link"] and "sha256 expected" in problems["model.safetensors"]


def test_a_file_changed_after_reading_is_caught_when_it_is_read(art_dir):
    art = read_artifact(art_dir)
    _flip(art_dir / "model.safetensors")  # the bytes parsed are the bytes hashed: no window between the two
    with pytest.raises(ArtifactIntegrityError, match="model.safetensors"):
        art.tensors()


def test_truncated_file_reports_the_sizes(art_dir):
    path = art_dir / "model.safetensors"
    size = path.stat().st_size
    path.write_bytes(path.read_bytes()[: size // 2])
    with pytest.raises(ArtifactIntegrityError, match=rf"size {size // 2} bytes, expected {size}"):
        read_artifact(art_dir)


def test_kind_version_and_shape_errors(art_dir, tmp_path):
    with pytest.raises(ArtifactError, match="holds a 'model' artifact, expected 'fid-extractor'"):
        read_artifact(art_dir, "fid-extractor")
    with pytest.raises(ArtifactError, match="no manifest.json"):
        read_artifact(tmp_path)
    with pytest.raises(ArtifactError, match="no such folder"):
        read_artifact(tmp_path / "nowhere")
    # a newer writer's format version is refused, not guessed at
    doc = json.loads((art_dir / "config.json").read_text())
    doc["format_version"] = 3
    _replace_keeping_manifest(art_dir, "config.json", json.dumps(doc).encode())
    with pytest.raises(ArtifactError, match="format 'vaekit-artifact' v3, expected 'vaekit-artifact' v2"):
        read_artifact(art_dir)


def test_bad_arguments_raise_input_errors(tmp_path):
    t = _tensors()
    with pytest.raises(InputError, match="kind"):
        write_artifact(tmp_path / "a", "Model!", {}, t)
    with pytest.raises(InputError, match="config must be a dict"):
        write_artifact(tmp_path / "a", "model", [1], t)
    with pytest.raises(InputError, match="plain JSON"):
        write_artifact(tmp_path / "a", "model", {"x": object()}, t)
    with pytest.raises(InputError, match="tensors must be"):
        write_artifact(tmp_path / "a", "model", {}, {"w": [1.0]})
    with pytest.raises(InputError, match="reserved"):
        write_artifact(tmp_path / "a", "model", {}, t, files={"config.json": b"{}"})
    for bad in ("../x", "/abs", ".hidden", "a//b", ""):
        with pytest.raises(InputError, match="file name"):
            write_artifact(tmp_path / "a", "model", {}, t, files={bad: b""})
    with pytest.raises(InputError, match="must be bytes"):
        write_artifact(tmp_path / "a", "model", {}, t, files={"x.txt": "text"})
    assert not (tmp_path / "a").exists()


def test_writes_replace_an_artifact_atomically_and_never_a_foreign_folder(art_dir, tmp_path):
    before = read_artifact(art_dir).digest
    with pytest.raises(InputError):  # fails before anything is written: the old artifact is untouched
        write_artifact(art_dir, "model", {}, _tensors(), files={"x": 3})
    assert read_artifact(art_dir).digest == before
    write_artifact(art_dir, "model", {"x": 2}, _tensors())
    assert read_artifact(art_dir).config == {"x": 2}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]  # no temporary or .old folder left
    home = tmp_path / "home"
    home.mkdir()
    (home / "thesis.tex").write_text("years of work")
    with pytest.raises(InputError, match="refusing to replace"):
        write_artifact(home, "model", {}, _tensors())
    assert (home / "thesis.tex").read_text() == "years of work"


def test_rewrite_and_update_metrics_carry_everything_else_over(art_dir, tmp_path):
    update_metrics(art_dir, {"acc": 0.9})
    art = read_artifact(art_dir)
    assert art.metrics == {"acc": 0.9} and art.config["x"] == 1 and art.read_json("extra/notes.json") == {"k": 1}
    out = rewrite_artifact(art_dir, tmp_path / "copy", files={"extra/notes.json": None, "p/q.bin": b"\x00\x01"})
    copy = read_artifact(out)
    assert copy.files == ["config.json", "metrics.json", "model.safetensors", "p/q.bin"]
    assert copy.read_bytes("p/q.bin") == b"\x00\x01"
    _flip(art_dir / "config.json")
    with pytest.raises(ArtifactIntegrityError):  # a damaged source is never re-blessed with a fresh manifest
        update_metrics(art_dir, {"acc": 1.0})


_KILL_WRITER = textwrap.dedent("""
    import sys, torch
    from vaekit.artifact import write_artifact
    big = {f"t{i}": torch.full((256, 1024), float(i)) for i in range(8)}  # 8 MiB a write
    i = 0
    while True:
        write_artifact(sys.argv[1], "model", {"i": i}, big, {"i": i})
        print(i, flush=True)
        i += 1
""")


def test_sigkill_during_writes_leaves_a_complete_artifact(tmp_path):
    """A writer killed at random moments (a write takes ~20 ms, so most kills land inside one): the
    folder is always absent or a complete, verifying artifact."""
    import random

    script = tmp_path / "writer.py"
    script.write_text(_KILL_WRITER)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    work = tmp_path / "w"
    work.mkdir()
    target, rng, interrupted = work / "art", random.Random(0), 0
    for _ in range(4):
        proc = subprocess.Popen([sys.executable, str(script), str(target)], env=env, stdout=subprocess.PIPE)
        assert proc.stdout is not None
        proc.stdout.readline()  # one write finished: the next ones are under way
        time.sleep(rng.uniform(0, 0.05))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        interrupted += any(p.name.startswith(".art.") for p in work.iterdir())  # a write was cut short
        for p in work.iterdir():
            if p.name.startswith(".art."):
                shutil.rmtree(p)
        if target.exists():
            art = read_artifact(target)
            assert art.metadata["i"] == art.config["i"] and len(art.tensors()) == 8
    assert interrupted >= 1  # the test did kill writers mid-write


def _replace_keeping_manifest(folder: Path, name: str, data: bytes) -> None:
    """Write ``data`` to ``name`` and re-hash the manifest (a well-formed artifact with bad content)."""
    from vaekit.artifact import _canonical_sha256

    (folder / name).write_bytes(data)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["files"][name] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    manifest.pop("self_sha256")
    manifest["self_sha256"] = _canonical_sha256(manifest)
    (folder / "manifest.json").write_text(json.dumps(manifest))
