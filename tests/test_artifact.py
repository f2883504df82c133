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
import warnings
from pathlib import Path

import pytest
import torch

from vaekit.artifact import (
    Artifact,
    read_artifact,
    rewrite_artifact,
    update_metrics,
    upgrade_legacy,
    verify_artifact,
    write_artifact,
)
from vaekit.errors import (
    ArtifactError,
    ArtifactIntegrityError,
    InputError,
    LegacyArtifactWarning,
    ModelFormatError,
)
from vaekit.models import MODEL_REGISTRY, VAE, VAEConfig, build_model, load_model
from vaekit.models.base import read_model_doc

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


# -- legacy folders (format v1, no manifest) --------------------------------------------------------
def _legacy_model_folder(model, path: Path, drop: str | None = None) -> Path:
    """A folder exactly as vaekit wrote models before the manifest (format v1)."""
    from safetensors.torch import save_file

    from vaekit.config import to_dict

    path.mkdir(parents=True)
    config = to_dict(model.config)
    if drop:
        del config[drop]
    doc = {"format": "vaekit-model", "format_version": 1, "family": model.family, "config": config,
           "metadata": {"data": {"dataset": "mnist"}}}
    (path / "config.json").write_text(json.dumps(doc, indent=2))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path / "model.safetensors"))
    (path / "metrics.json").write_text('{"test": 1.0}')
    return path


def _small_vae() -> VAE:
    torch.manual_seed(0)
    return VAE(VAEConfig(latent_dim=3, hidden_sizes=(16,), activation="tanh")).eval()


def test_legacy_model_loads_with_a_warning_and_upgrades(tmp_path):
    model = _small_vae()
    folder = _legacy_model_folder(model, tmp_path / "old")
    with pytest.warns(LegacyArtifactWarning, match="not verified.*upgrade_legacy"):
        loaded = load_model(folder)
    x = torch.rand(2, 1, 28, 28)
    assert torch.equal(loaded.reconstruct(x), model.reconstruct(x))
    with pytest.raises(ArtifactError, match="before artifacts had a manifest.*upgrade_legacy"):
        verify_artifact(folder)  # what the registry calls: a legacy folder is never taken unverified
    (folder / "stats-test-0123.safetensors").write_bytes(b"cache")  # an old FID-style cache is not the model's
    with pytest.raises(ArtifactError, match="stats-test-0123"):
        upgrade_legacy(folder)
    (folder / "stats-test-0123.safetensors").unlink()
    upgrade_legacy(folder)
    verify_artifact(folder)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no legacy warning any more
        again = load_model(folder)
        assert read_model_doc(folder)["metadata"] == {"data": {"dataset": "mnist"}}
    assert torch.equal(again.reconstruct(x), model.reconstruct(x))
    assert read_artifact(folder).metrics == {"test": 1.0}


# -- strict model loading (issue 16 item 4) ---------------------------------------------------------
@pytest.fixture
def model_dir(tmp_path) -> Path:
    return _small_vae().save(tmp_path / "m", metadata={"note": "x"}, metrics={"loss": 1.0})


@pytest.mark.parametrize("name", ["config.json", "model.safetensors", "metrics.json", "manifest.json"])
def test_load_model_refuses_a_flipped_byte_in_each_file(model_dir, name):
    _flip(model_dir / name)
    with pytest.raises(ArtifactIntegrityError) as info:
        load_model(model_dir)
    assert info.value.file == name and isinstance(info.value, ModelFormatError)


def _rewritten(model_dir: Path, dst: Path, edit) -> Path:
    """A folder whose manifest is intact but whose config is edited: what a buggy or foreign writer makes."""
    art = read_artifact(model_dir)
    config = json.loads(json.dumps(art.config))
    edit(config)
    return write_artifact(dst, "model", config, art.tensors(), art.metadata)


@pytest.mark.parametrize("family", sorted(MODEL_REGISTRY))
def test_every_family_refuses_a_config_with_a_removed_field(family, tmp_path):
    cfg_cls = MODEL_REGISTRY[family].config_class
    saved = build_model(cfg_cls()).save(tmp_path / "m")
    field = "input_shape" if family != "vae" else "activation"
    bad = _rewritten(saved, tmp_path / "bad", lambda c: c.pop(field))
    with pytest.raises(ModelFormatError, match=rf"missing field\(s\) \['config.{field}'\]"):
        load_model(bad)


def test_the_activation_example_of_the_issue(model_dir, tmp_path):
    """A missing `activation` once loaded tanh weights as a ReLU model; now it names the field and file."""
    bad = _rewritten(model_dir, tmp_path / "bad", lambda c: c.pop("activation"))
    with pytest.raises(ModelFormatError) as info:
        load_model(bad)
    assert "config.activation" in str(info.value) and str(bad / "config.json") in str(info.value)
    legacy = _legacy_model_folder(_small_vae(), tmp_path / "legacy", drop="activation")
    with pytest.warns(LegacyArtifactWarning), pytest.raises(ModelFormatError, match="config.activation"):
        load_model(legacy)


def test_bad_config_documents_name_the_file_and_the_problem(model_dir, tmp_path):
    art = read_artifact(model_dir)
    cases = {
        "family": (lambda c: c.update(family="nope"), "family 'nope' is unknown"),
        "type": (lambda c: c.update(latent_dim="three"), "config.latent_dim must be an integer"),
        "unknown": (lambda c: c.update(colour="red"), "unknown config key"),
        "value": (lambda c: c.update(activation="sigmoidish"), "activation must be one of"),
    }
    for name, (edit, message) in cases.items():
        bad = _rewritten(model_dir, tmp_path / name, edit)
        with pytest.raises(ModelFormatError, match=message) as info:
            load_model(bad)
        assert "config.json" in str(info.value)
    # config.json holding a JSON list / lacking its `config` key (manifest rewritten to match)
    for name, body in (("jsonlist", b"[1, 2]\n"), ("nokey", json.dumps({"format": "vaekit-artifact",
                       "format_version": 2, "kind": "model", "metadata": {}}).encode())):
        folder = write_artifact(tmp_path / name, "model", art.config, art.tensors())
        _replace_keeping_manifest(folder, "config.json", body)
        want = "must hold a JSON object, got a JSON list" if name == "jsonlist" else "has no 'config' key"
        with pytest.raises(ModelFormatError, match=want) as info:
            load_model(folder)
        assert str(folder / "config.json") in str(info.value)


def _replace_keeping_manifest(folder: Path, name: str, data: bytes) -> None:
    """Write ``data`` to ``name`` and re-hash the manifest (a well-formed artifact with bad content)."""
    from vaekit.artifact import _canonical_sha256

    (folder / name).write_bytes(data)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["files"][name] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    manifest.pop("self_sha256")
    manifest["self_sha256"] = _canonical_sha256(manifest)
    (folder / "manifest.json").write_text(json.dumps(manifest))


def test_weights_that_do_not_fit_are_named(model_dir, tmp_path):
    art = read_artifact(model_dir)
    state = art.tensors()
    key = next(k for k, v in state.items() if v.ndim == 2)
    wrong = {**state, key: torch.zeros(state[key].shape[0] + 1, state[key].shape[1])}
    folder = write_artifact(tmp_path / "size", "model", art.config, wrong)
    with pytest.raises(ModelFormatError, match=rf"model.safetensors: the weights do not match.*{key}"):
        load_model(folder)
    dtype = {**state, key: state[key].double()}
    with pytest.raises(ModelFormatError, match="torch.float64"):
        load_model(write_artifact(tmp_path / "dtype", "model", art.config, dtype))
    fewer = {k: v for k, v in state.items() if k != key}
    with pytest.raises(ModelFormatError, match=rf"missing tensors \['{key}'\]"):
        load_model(write_artifact(tmp_path / "fewer", "model", art.config, fewer))
    more = {**state, "stowaway": torch.zeros(1)}
    with pytest.raises(ModelFormatError, match="unexpected tensors \\['stowaway'\\]"):
        load_model(write_artifact(tmp_path / "more", "model", art.config, more))


def test_truncated_weights_are_refused_with_and_without_a_manifest(model_dir, tmp_path):
    path = model_dir / "model.safetensors"
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(ArtifactIntegrityError, match="model.safetensors: size 1000 bytes"):
        load_model(model_dir)
    legacy = _legacy_model_folder(_small_vae(), tmp_path / "legacy")
    (legacy / "model.safetensors").write_bytes((legacy / "model.safetensors").read_bytes()[:1000])
    with pytest.warns(LegacyArtifactWarning), pytest.raises(ModelFormatError, match="not a readable safetensors"):
        load_model(legacy)


@pytest.mark.parametrize("device", ["cuda:7", "tpu", "nonsense", 3.5])
def test_map_location_that_does_not_exist(model_dir, device):
    if torch.cuda.device_count() > 7 and device == "cuda:7":
        pytest.skip("this machine has a cuda:7")
    with pytest.raises(ModelFormatError, match="map_location"):
        load_model(model_dir, map_location=device)


def test_cli_prints_one_line_not_a_traceback(model_dir, tmp_path):
    _flip(model_dir / "model.safetensors")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    res = subprocess.run([sys.executable, "-m", "vaekit.cli.main", "sample", str(model_dir), "-n", "2",
                          "-o", str(tmp_path / "s.png")], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in res.stderr
    assert lines[0].startswith("vaekit sample: error: artifact") and "model.safetensors" in lines[0]
    assert not (tmp_path / "s.png").exists()


def test_save_over_a_model_folder_and_copytree_round_trip(model_dir, tmp_path):
    shutil.copytree(model_dir, tmp_path / "copy")  # an artifact is relocatable: names are relative
    assert read_artifact(tmp_path / "copy").digest == read_artifact(model_dir).digest
    model = load_model(tmp_path / "copy")
    model.save(model_dir, metadata={"note": "y"})
    assert read_model_doc(model_dir)["metadata"] == {"note": "y"}
