"""The model registry, on SQLite and on the real PostgreSQL server (the ``db_uri`` fixture runs each test on both).

Concurrency and crash tests use real processes (fork: the children start in milliseconds because torch is already
imported) and real SIGKILLs.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import multiprocessing as mp
import os
import random
import signal
import time
from pathlib import Path

import pytest
import torch
import yaml
from helpers import rand_images

from vaekit import VAE, VAEConfig
from vaekit.artifact import verify_artifact
from vaekit.errors import ArtifactError, ArtifactIntegrityError, InputError, RegistryError, RegistryLookupError
from vaekit.registry import ModelRegistry, Ref, parse_ref
from vaekit.registry import schema as S
from vaekit.registry.profile import read_profile

pytestmark = pytest.mark.usefixtures("one_thread")

FORK = mp.get_context("fork")


def tiny_model(seed: int) -> VAE:
    torch.manual_seed(seed)
    return VAE(VAEConfig(hidden_sizes=(16,), latent_dim=2))


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> list[Path]:
    """25 tiny, distinct model folders."""
    root = tmp_path_factory.mktemp("models")
    return [tiny_model(i).save(root / f"m{i}") for i in range(25)]


@pytest.fixture
def art_root(tmp_path) -> Path:
    return tmp_path / "artifacts"


@pytest.fixture
def reg(db_uri, art_root):
    r = ModelRegistry(db_uri, artifact_root=art_root, actor="tester@ci")
    yield r
    r.close()


# ---- references -----------------------------------------------------------------------------------------------

def test_references_parse_into_name_version_or_alias():
    assert parse_ref("mnist-vae") == Ref("mnist-vae")
    assert parse_ref("mnist-vae/3") == Ref("mnist-vae", version=3)
    assert parse_ref("mnist_vae.v2@production") == Ref("mnist_vae.v2", alias="production")
    assert str(parse_ref("a/12")) == "a/12" and str(parse_ref("a@canary")) == "a@canary"


@pytest.mark.parametrize("bad, needle", [
    ("", "ref must be"), ("a/0", ">= 1"), ("a/x", "must be a number"), ("a/3@prod", "both a version and an alias"),
    ("a@", "alias"), ("a@12", "all digits"), ("a@latest", "reserved"), ("/3", "the name"), ("a b", "the name"),
    ("a@b@c", "alias"), (3, "ref must be"),
])
def test_bad_references_raise_one_clear_error(bad, needle):
    with pytest.raises(InputError, match=needle) as info:
        parse_ref(bad)
    if isinstance(bad, str) and bad:
        assert "NAME/VERSION" in str(info.value) and repr(bad) in str(info.value)


# ---- the SQL layer ---------------------------------------------------------------------------------------------

def test_sqlite_engines_use_wal_a_busy_timeout_and_immediate_transactions(tmp_path):
    from sqlalchemy import event, text

    from vaekit.db import make_engine, reader

    engine = make_engine(f"sqlite:///{tmp_path / 'sub' / 'x.db'}", busy_timeout_s=7)
    statements: list[str] = []
    event.listen(engine, "before_cursor_execute", lambda *a: statements.append(a[2]))
    with engine.begin() as conn:
        assert conn.execute(text("PRAGMA journal_mode")).scalar() == "wal"
        assert conn.execute(text("PRAGMA busy_timeout")).scalar() == 7000
        assert conn.execute(text("PRAGMA foreign_keys")).scalar() == 1
    with reader(engine).connect() as conn:
        conn.execute(text("select 1"))
    assert [q for q in statements if q.startswith("BEGIN")] == ["BEGIN IMMEDIATE", "BEGIN"]
    engine.dispose()


@pytest.mark.parametrize("uri, driver", [("postgresql://u@h/db", "postgresql+psycopg"),
                                         ("postgres://u@h/db", "postgresql+psycopg"),
                                         ("postgresql+psycopg://u@h/db", "postgresql+psycopg"),
                                         ("sqlite:///x.db", "sqlite+pysqlite")])
def test_uris_map_to_one_driver_per_backend(uri, driver):
    from vaekit.db import parse_uri

    assert parse_uri(uri).drivername == driver


@pytest.mark.parametrize("uri, needle", [("postgresql+asyncpg://u@h/db", "vaekit uses psycopg 3"),
                                         ("sqlite://", "needs a file"), ("mysql://u@h/db", "has the scheme"),
                                         ("not a uri", "is not a database URI"), ("", "uri must be")])
def test_bad_uris_say_what_is_allowed(uri, needle):
    from vaekit.db import parse_uri

    with pytest.raises(InputError, match=needle):
        parse_uri(uri)


# ---- registering, lineage, loading -----------------------------------------------------------------------------

TINY_RUN = ["name=tiny", "model.hidden_sizes=[16]", "model.latent_dim=2", "data.train_subset=1000",
            "data.validation=200", "train.epochs=1", "train.batch_size=100", "train.progress=false",
            "train.device=cpu", "monitor.enabled=false"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, mnist_small):
    """A real (short) training run with a validation hold-out."""
    from vaekit.training import load_run_config, train

    out = tmp_path_factory.mktemp("runs")
    torch.manual_seed(0)
    train(load_run_config(None, [f"out_dir={out}", *TINY_RUN]), dataset=mnist_small)
    return out / "tiny"


def test_a_run_whose_config_changed_mid_run_keeps_every_revision(reg, tiny_run, mnist_small, tmp_path):
    import shutil

    from vaekit.training import load_run_config, train

    shutil.copytree(tiny_run, tmp_path / "tiny")
    # resumed for a second epoch with a smaller batch: a second config revision
    train(load_run_config(None, [f"out_dir={tmp_path}", *TINY_RUN, "train.epochs=2", "train.batch_size=50"]),
          dataset=mnist_small)
    v = reg.register(tmp_path / "tiny", "resumed", profile=False)
    assert v.run_config["train"]["batch_size"] == 50
    assert [r["config"]["train"]["batch_size"] for r in v.run_config_revisions] == [100, 50]
    assert v.run_config_hash == hashlib.sha256(json.dumps(v.run_config, sort_keys=True,
                                                          separators=(",", ":")).encode()).hexdigest()
    assert reg.get("resumed").run_config_revisions[1]["from_step"] > 0


def test_register_a_run_keeps_its_lineage(reg, tiny_run, mnist):
    v = reg.register(tiny_run, "mnist-vae", description="first try")
    assert (v.name, v.version, v.ref, v.family) == ("mnist-vae", 1, "mnist-vae/1", "vae")
    run_config = yaml.safe_load((tiny_run / "config.yaml").read_text())
    assert v.run_config == run_config == json.loads((tiny_run / "config.json").read_text())
    assert v.run_dir == str(tiny_run.resolve()) and v.run_config_revisions is None  # one config all along
    # the hash of the resolved config, computed independently
    expect = hashlib.sha256(json.dumps(run_config, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    assert v.run_config_hash == expect
    # the fingerprint is of the examples trained on: the first 1000 of MNIST's train split less a seeded
    # 200-example hold-out
    held = torch.zeros(1000, dtype=torch.bool)
    held[torch.randperm(1000, generator=torch.Generator().manual_seed(0))[:200]] = True
    imgs, labels = mnist.train.images[:1000][~held], mnist.train.labels[:1000][~held]
    h = hashlib.sha256(json.dumps({"dataset": "mnist", "shape": list(imgs.shape), "binarize": "none",
                                   "binarize_seed": 0}, sort_keys=True).encode())
    h.update(imgs.numpy().tobytes())
    h.update(labels.numpy().tobytes())
    assert v.data_fingerprint == h.hexdigest()
    assert v.metrics == json.loads((tiny_run / "model" / "metrics.json").read_text())
    assert v.created_by == "tester@ci" and v.created_at.endswith("Z") and v.vaekit_version
    assert v.description == "first try" and v.parent is None
    # the stored copy is the run's model plus a reference profile on the run's 200 held-out images
    assert v.artifact_hash == verify_artifact(v.artifact_path).digest != verify_artifact(tiny_run / "model").digest
    assert v.profile_data == f"data.validation of {tiny_run} (200 images)"
    prof = read_profile(v.artifact_path)
    assert prof.info["source"] == v.profile_data and prof.arrays["ref_means"].shape == (200, 2)
    x = rand_images(4)
    from vaekit import load_model

    assert torch.equal(reg.load("mnist-vae").reconstruct(x), load_model(tiny_run / "model").reconstruct(x))


def test_the_profile_is_on_held_out_images_never_the_training_set(reg, models, tiny_run, mnist):
    plain = reg.register(models[0], "bare")  # no data settings, no images given: no profile
    assert plain.profile_data is None and plain.artifact_hash == verify_artifact(models[0]).digest
    v = reg.register(models[0], "bare", profile_data="mnist:test")
    prof = read_profile(v.artifact_path)
    assert v.profile_data == "mnist:test (10000 images)" and prof.info["n"] == 10000
    with pytest.raises(InputError, match="'mnist:train': the training split is what the model was fitted on"):
        reg.register(models[0], "bare", profile_data="mnist:train")
    with pytest.raises(InputError, match="needs a run trained with data.validation > 0"):
        reg.register(models[0], "bare", profile_data="validation")
    with pytest.raises(InputError, match="DATASET one of"):
        reg.register(models[0], "bare", profile_data="cifar:test")
    x = rand_images(8, seed=3)
    v = reg.register(models[0], "bare", profile_images=x, profile_data="8 synthetic images")
    assert read_profile(v.artifact_path).info["source"] == "8 synthetic images"
    assert reg.register(tiny_run, "run", profile=False).profile_data is None
    assert [e.version for e in reg.versions("bare")] == [3, 2, 1]  # the refused ones left nothing


def test_fine_tune_parent_tags_and_search(reg, models):
    reg.register(models[0], "base", tags={"team": "vision"})
    child = reg.register(models[1], "tuned", parent="base/1", tags={"team": "vision", "stage": "ft"})
    assert child.parent == "base/1" and child.tags == {"team": "vision", "stage": "ft"}
    with pytest.raises(RegistryLookupError, match="no version 7"):
        reg.register(models[2], "tuned", parent="base/7")
    assert [v.ref for v in reg.versions("tuned")] == ["tuned/1"]  # the refused registration left nothing
    reg.set_tag("tuned/1", "stage", "prod")
    reg.set_alias("tuned", "production", 1, "first")
    assert {v.ref for v in reg.search(tags={"team": "vision"})} == {"base/1", "tuned/1"}
    assert [v.ref for v in reg.search(tags={"stage": "prod"})] == ["tuned/1"]
    assert [v.ref for v in reg.search(name="tun")] == ["tuned/1"]
    assert [v.ref for v in reg.search(alias="production")] == ["tuned/1"]
    assert reg.search(family="vqvae") == []
    assert [(m.name, m.versions, m.latest, m.aliases) for m in reg.models()] == [
        ("base", 1, 1, {}), ("tuned", 1, 1, {"production": 1})]


def test_versions_number_per_name_and_same_content_is_stored_once(reg, models, art_root):
    a1, a2 = reg.register(models[0], "a"), reg.register(models[0], "a")
    b1 = reg.register(models[1], "b")
    assert (a1.version, a2.version, b1.version) == (1, 2, 1)
    assert a1.artifact_path == a2.artifact_path != b1.artifact_path
    assert len(list((art_root / "sha256").glob("*/*"))) == 2
    assert reg.get("a").version == 2 and reg.get("a/1").artifact_hash == a1.artifact_hash


@pytest.mark.filterwarnings("ignore:the VQ-VAE's code prior has not been trained")
def test_every_family_registers_and_loads_back_with_identical_outputs(reg, tmp_path):
    from test_models import ONE_PER_FAMILY, VARIANTS, _y

    from vaekit.models import MODEL_REGISTRY, build_model

    assert {VARIANTS[n].family for n in ONE_PER_FAMILY} == set(MODEL_REGISTRY)
    x = rand_images(3)
    for name in ONE_PER_FAMILY:
        torch.manual_seed(0)
        model = build_model(VARIANTS[name]).eval()
        model.save(tmp_path / name)
        v = reg.register(tmp_path / name, name)
        back = reg.load(f"{name}/{v.version}")
        assert type(back) is type(model) and v.family == model.family
        want, got = model.state_dict(), back.state_dict()
        assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want), name
        y = _y(model, len(x)) if model.conditional else None
        for fn in ("reconstruct", "sample"):
            torch.manual_seed(1)
            out_a = model.reconstruct(x, y) if fn == "reconstruct" else model.sample(len(x), y)
            torch.manual_seed(1)
            out_b = back.reconstruct(x, y) if fn == "reconstruct" else back.sample(len(x), y)
            assert torch.equal(out_a, out_b), (name, fn)


def test_bad_arguments_name_the_argument(reg, models, tmp_path):
    with pytest.raises(InputError, match="name must be"):
        reg.register(models[0], "bad name")
    with pytest.raises(InputError, match="source must be a run folder"):
        reg.register(tmp_path, "x")
    with pytest.raises(InputError, match="alias must not be all digits"):
        reg.register(models[0], "x", alias="3")
    reg.register(models[0], "x")
    with pytest.raises(InputError, match="reason must be a non-empty string"):
        reg.set_alias("x", "production", 1, " ")
    with pytest.raises(InputError, match="evidence must be JSON"):
        reg.set_alias("x", "production", 1, "why", evidence={"bad": object()})
    with pytest.raises(RegistryLookupError, match="no model named 'nope'"):
        reg.get("nope")
    with pytest.raises(RegistryLookupError, match="no model named 'nope'"):
        reg.versions("nope")
    with pytest.raises(RegistryLookupError, match="no alias 'canary'"):
        reg.get("x@canary")
    with pytest.raises(RegistryLookupError, match="no version 9"):
        reg.get("x/9")
    with pytest.raises(InputError, match="uri .* has the scheme 'mysql'"):
        ModelRegistry("mysql://u@h/db")


# ---- aliases, history, rollback, deletion -----------------------------------------------------------------------

def test_alias_history_is_append_only_and_rollback_restores_the_previous_holder(reg, models):
    for i in range(3):
        reg.register(models[i], "m")
    seen: list = []

    def check_appended(n_new: int):
        hist = reg.history("m", "production")
        assert hist[: len(seen)] == seen, "earlier entries changed"
        assert len(hist) == len(seen) + n_new
        seen[:] = hist

    reg.set_alias("m", "production", 1, "first model", evidence={"nll": 90.5})
    check_appended(1)
    assert reg.set_alias("m", "production", 1, "again") is None  # no move, nothing recorded
    check_appended(0)
    reg.set_alias("m", "production", 2, "better nll")
    reg.set_alias("m", "production", 3, "even better")
    check_appended(2)
    assert reg.get("m@production").version == 3

    back = reg.rollback("m", "production", "canary regressed", evidence={"window": [1, 2]})
    check_appended(1)
    assert (back.action, back.from_version, back.to_version) == ("rollback", 3, 2)
    assert reg.get("m@production").version == 2
    back = reg.rollback("m", "production", "still bad")  # walks further back, does not toggle to 3
    assert (back.from_version, back.to_version) == (2, 1) and reg.get("m@production").version == 1
    check_appended(1)
    with pytest.raises(RegistryError, match="no earlier holder"):
        reg.rollback("m", "production", "nothing left")
    check_appended(0)

    # every entry keeps from, to, actor, time, reason and evidence
    first = seen[0]
    assert (first.from_version, first.to_version, first.actor, first.reason, first.evidence) == (
        None, 1, "tester@ci", "first model", {"nll": 90.5})
    assert [e.at for e in seen] == sorted(e.at for e in seen)
    assert [(e.action, e.from_version, e.to_version) for e in seen] == [
        ("set", None, 1), ("set", 1, 2), ("set", 2, 3), ("rollback", 3, 2), ("rollback", 2, 1)]
    # a set after rollbacks: the next rollback returns to the holder before it
    reg.set_alias("m", "production", 3, "fixed")
    assert reg.rollback("m", "production", "no").to_version == 1
    # other aliases have their own history; history(name) holds them all in order
    reg.set_alias("m", "canary", 3, "try 3")
    assert [e.alias for e in reg.history("m")][-1] == "canary" and len(reg.history("m", "canary")) == 1


def test_alias_moves_are_transactional(reg, models):
    reg.register(models[0], "m")
    reg.set_alias("m", "production", 1, "first")
    with pytest.raises(RegistryLookupError, match="no version 5"):
        reg.set_alias("m", "production", 5, "typo")
    assert reg.aliases("m") == {"production": 1} and len(reg.history("m")) == 1
    # register with an alias: the version row and the move commit together
    v = reg.register(models[1], "m", alias="production", reason="auto-promote")
    assert v.aliases == ("production",)
    assert reg.history("m")[-1].reason == "auto-promote"


def test_a_version_an_alias_points_at_cannot_be_deleted(reg, models):
    for i in range(3):
        reg.register(models[i], "m")
    reg.set_alias("m", "production", 3, "p")
    reg.set_alias("m", "shadow", 3, "s")
    with pytest.raises(RegistryError, match=r"m/3 cannot be deleted: the alias\(es\) production, shadow"):
        reg.delete("m/3", "cleanup")
    assert reg.get("m/3").deleted_at is None
    with pytest.raises(InputError, match="must name a version"):
        reg.delete("m", "cleanup")
    reg.set_alias("m", "production", 2, "p")
    reg.remove_alias("m", "shadow", "done")
    gone = reg.delete("m/3", "cleanup")
    assert gone.deleted_at and gone.deleted_reason == "cleanup"
    assert [v.version for v in reg.versions("m")] == [2, 1] and reg.get("m").version == 2
    with pytest.raises(RegistryLookupError, match="m/3 was deleted"):
        reg.get("m/3")
    assert reg.register(models[3], "m").version == 4  # numbers are never reused
    # rollback onto a deleted holder is refused, not silently skipped
    reg.set_alias("m", "canary", 1, "c1")
    reg.set_alias("m", "canary", 4, "c4")
    reg.delete("m/1", "old")
    with pytest.raises(RegistryError, match="m/1 was deleted"):
        reg.rollback("m", "canary", "back")
    assert reg.aliases("m")["canary"] == 4


# ---- schema, settings, integrity ------------------------------------------------------------------------------

def test_a_newer_schema_is_refused(db_uri, art_root, models):
    from sqlalchemy import update

    with ModelRegistry(db_uri, artifact_root=art_root) as r:
        r.register(models[0], "m")
        with r.engine.begin() as conn:
            conn.execute(update(S.schema_table).values(version=S.SCHEMA_VERSION + 1))
    with pytest.raises(RegistryError, match=f"schema version {S.SCHEMA_VERSION + 1}, newer than this vaekit"):
        ModelRegistry(db_uri, artifact_root=art_root)


def test_artifact_root_is_a_setting(db_uri, tmp_path, models, monkeypatch):
    monkeypatch.delenv("VAEKIT_REGISTRY_ARTIFACTS", raising=False)
    if db_uri.startswith("sqlite"):
        with ModelRegistry(db_uri) as r:  # beside the database file
            assert r.store.root == Path(db_uri.removeprefix("sqlite:///")).parent / "artifacts"
        other = f"sqlite:///{tmp_path / 'other' / 'registry.db'}"
        with ModelRegistry(other, artifact_root=tmp_path / "elsewhere") as r:
            v = r.register(models[0], "m")
        with ModelRegistry(other) as r:  # a new process, the CLI: the root given at creation
            assert r.store.root == tmp_path / "elsewhere" and r.get("m/1").artifact_path == v.artifact_path
            assert r.load("m/1") is not None
        return
    with pytest.raises(RegistryError, match="has no artifact folder recorded: pass artifact_root="):
        ModelRegistry(db_uri)
    from sqlalchemy import inspect

    from vaekit.db import make_engine

    engine = make_engine(db_uri)
    with engine.connect() as conn:
        assert inspect(conn).get_table_names() == []  # refused before anything was created
    engine.dispose()
    with ModelRegistry(db_uri, artifact_root=tmp_path / "shared") as r:
        v = r.register(models[0], "m")
    with ModelRegistry(db_uri) as r:  # a second machine: the root recorded at creation
        assert r.get("m/1").artifact_path == v.artifact_path
    monkeypatch.setenv("VAEKIT_REGISTRY_ARTIFACTS", str(tmp_path / "mounted"))
    with ModelRegistry(db_uri) as r:  # mounted elsewhere on this machine
        assert r.store.root == tmp_path / "mounted"


def test_verify_rehashes_and_names_a_corrupt_artifact(reg, models):
    v = reg.register(models[0], "m")
    assert reg.verify("m/1") == v
    weights = v.artifact_path / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01
    weights.write_bytes(bytes(data))
    with pytest.raises(ArtifactIntegrityError, match="model.safetensors: sha256 expected") as info:
        reg.verify("m/1")
    assert info.value.file == "model.safetensors" and info.value.expected != info.value.actual
    with pytest.raises(ArtifactIntegrityError, match="model.safetensors"):
        reg.load("m/1")


def test_a_damaged_stored_copy_is_replaced_when_the_same_content_comes_again(reg, models, art_root):
    v = reg.register(models[0], "m")
    weights = v.artifact_path / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[100] ^= 0x80
    weights.write_bytes(bytes(data))
    again = reg.register(models[0], "m")
    assert again.artifact_path == v.artifact_path
    reg.verify("m/1")  # healed: both versions share the fresh copy
    reg.verify("m/2")
    assert len(list((art_root / ".quarantine").iterdir())) == 1  # the damaged one, kept aside


def test_a_source_that_fails_verification_is_refused(reg, models, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(models[0], bad)
    (bad / "config.json").write_text((bad / "config.json").read_text().replace('"latent_dim": 2', '"latent_dim": 3'))
    with pytest.raises(ArtifactIntegrityError, match="config.json"):
        reg.register(bad, "m")
    legacy = tmp_path / "legacy"
    shutil.copytree(models[0], legacy)
    (legacy / "manifest.json").unlink()
    with pytest.raises(ArtifactError, match="no manifest.json"):
        reg.register(legacy, "m")
    assert reg.models() == [] and not list((reg.store.root / "sha256").glob("*/*"))


def test_gc_removes_orphans_and_keeps_referenced_artifacts(reg, models, art_root):
    keep = reg.register(models[0], "m")
    orphan = reg.store.put(models[1])  # as if killed before the row committed
    (art_root / ".staging" / "put-leftover").mkdir(parents=True)
    assert reg.gc() == []  # younger than the grace period
    removed = reg.gc(min_age_s=0)
    assert set(removed) == {orphan.path, art_root / ".staging" / "put-leftover"}
    assert keep.artifact_path.is_dir() and reg.verify("m/1")
    # the same content registered again after gc is copied afresh
    assert reg.register(models[1], "m").artifact_path.is_dir()


# ---- concurrency and crashes (real processes) ------------------------------------------------------------------

def _register_all(uri: str, root: str, sources: list[str], start, results) -> None:
    try:
        r = ModelRegistry(uri, artifact_root=root)
        start.wait(30)
        results.put([(r.register(s, "race").version, s) for s in sources])
    except BaseException as exc:  # the parent reports it
        results.put(f"{type(exc).__name__}: {exc}")


def test_two_processes_registering_at_once_get_distinct_versions(db_uri, art_root, models):
    ModelRegistry(db_uri, artifact_root=art_root).close()  # create the tables before the race
    sources = [str(m) for m in models[:20]]
    start, results = FORK.Event(), FORK.Queue()
    # the second process registers the same models in reverse: the two also race on storing equal content
    procs = [FORK.Process(target=_register_all, args=(db_uri, str(art_root), s, start, results))
             for s in (sources, sources[::-1])]
    for p in procs:
        p.start()
    start.set()
    got = [results.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(30)
    errors = [g for g in got if isinstance(g, str)]
    assert not errors, errors
    pairs = got[0] + got[1]
    assert sorted(v for v, _ in pairs) == list(range(1, 41))
    with ModelRegistry(db_uri, artifact_root=art_root) as r:
        for number, src in pairs:
            v = r.verify(f"race/{number}")  # complete and matching its hash
            assert v.artifact_hash == verify_artifact(src).digest
        assert len(r.versions("race")) == 40


def _move_aliases(uri: str, root: str, seed: int, start, results) -> None:
    try:
        r = ModelRegistry(uri, artifact_root=root, actor=f"mover{seed}@test")
        rng = random.Random(seed)
        start.wait(30)
        for _ in range(15):
            if rng.random() < 0.3:
                with contextlib.suppress(RegistryError):  # nothing earlier to go back to at that moment
                    r.rollback("m", "production", "concurrent rollback")
            else:
                r.set_alias("m", "production", rng.randint(1, 4), "concurrent move")
        results.put("ok")
    except BaseException as exc:
        results.put(f"{type(exc).__name__}: {exc}")


def test_concurrent_alias_moves_keep_one_consistent_history(reg, db_uri, art_root, models):
    for i in range(4):
        reg.register(models[i], "m")
    reg.set_alias("m", "production", 1, "start")
    reg.close()
    start, results = FORK.Event(), FORK.Queue()
    procs = [FORK.Process(target=_move_aliases, args=(db_uri, str(art_root), seed, start, results))
             for seed in (1, 2)]
    for p in procs:
        p.start()
    start.set()
    assert [results.get(timeout=120) for _ in procs] == ["ok", "ok"]
    for p in procs:
        p.join(30)
    with ModelRegistry(db_uri, artifact_root=art_root) as r:
        hist = r.history("m", "production")
        # each move starts where the one before it ended: no move was lost or interleaved
        assert all(b.from_version == a.to_version for a, b in zip(hist, hist[1:], strict=False))
        assert r.aliases("m")["production"] == hist[-1].to_version
        assert {e.actor for e in hist[1:]} == {"mover1@test", "mover2@test"}


def _hold_write_lock(uri: str, root: str, locked, release) -> None:
    r = ModelRegistry(uri, artifact_root=root)
    with r.engine.begin() as conn:  # a writer in the middle of a transaction
        conn.execute(S.tags.insert().values(name="m", version=1, key="held", value="yes"))
        locked.set()
        release.wait(30)


def test_readers_do_not_wait_for_a_writer(reg, db_uri, art_root, models):
    reg.register(models[0], "m", alias="production")
    locked, release = FORK.Event(), FORK.Event()
    reg.close()  # no pooled connection crosses the fork
    p = FORK.Process(target=_hold_write_lock, args=(db_uri, str(art_root), locked, release))
    p.start()
    try:
        assert locked.wait(30)
        with ModelRegistry(db_uri, artifact_root=art_root) as r:
            t0 = time.perf_counter()
            v = r.get("m@production")
            assert r.history("m") and r.models()
            elapsed = time.perf_counter() - t0
        assert v.version == 1 and "held" not in v.tags  # the snapshot before the writer's commit
        assert elapsed < 2.0, f"reads waited {elapsed:.1f} s for the writer"
    finally:
        release.set()
        p.join(30)
    assert reg.get("m/1").tags == {"held": "yes"}


def _register_forever(uri: str, root: str, sources: list[str], ready) -> None:
    r = ModelRegistry(uri, artifact_root=root)
    ready.set()
    i = 0
    while True:
        r.register(sources[i % len(sources)], "crash", alias="production" if i % 2 else None, reason="auto")
        i += 1


def test_a_registration_killed_at_random_points_never_leaves_a_half_version(db_uri, art_root, models):
    rng = random.Random(20261201)
    with ModelRegistry(db_uri, artifact_root=art_root) as r:
        t0 = time.perf_counter()
        r.register(models[24], "crash")  # warm-up; also times one registration
        one = time.perf_counter() - t0
    sources = [str(m) for m in models[:24]]
    trials = 20
    for trial in range(trials):
        ready = FORK.Event()
        offset = sources[trial:] + sources[:trial]  # fresh content each time: the copy path runs too
        p = FORK.Process(target=_register_forever, args=(db_uri, str(art_root), offset, ready))
        p.start()
        assert ready.wait(30), "child did not start"
        time.sleep(rng.uniform(0, 3 * one))
        os.kill(p.pid, signal.SIGKILL)
        p.join(10)
        assert p.exitcode == -signal.SIGKILL
        with ModelRegistry(db_uri, artifact_root=art_root) as r:
            live = r.versions("crash")
            # numbers are contiguous (a killed transaction committed nothing) and each visible version is whole
            assert [v.version for v in live] == list(range(len(live), 0, -1))
            for v in live[:3]:
                r.verify(v.ref)
            held = r.aliases("crash").get("production")
            assert held is None or r.get("crash@production").version == held
            hist = r.history("crash", "production")
            assert all(e.to_version is not None and e.to_version <= len(live) for e in hist)
    with ModelRegistry(db_uri, artifact_root=art_root) as r:
        n = len(r.versions("crash"))
        assert n > 1, "no child ever registered: the kills came too early to test anything"
        for v in r.versions("crash"):
            r.verify(v.ref)
        after = r.register(models[0], "crash")  # later registrations work
        assert after.version == n + 1
        r.gc(min_age_s=0)  # orphans and staging leftovers go; every live version survives
        for v in r.versions("crash"):
            r.verify(v.ref)
        assert not any((art_root / ".staging").iterdir())
        x = rand_images(2)
        assert r.load(after.ref).reconstruct(x).shape == x.shape


# ---- CLI -----------------------------------------------------------------------------------------------------

def test_cli_register_alias_rollback_history_verify(db_uri, art_root, tiny_run, models, capsys):
    from vaekit.cli.main import main

    where = ["--registry", db_uri, "--artifacts", str(art_root)]

    def run(*argv: str) -> tuple[int, str, str]:
        code = main(["registry", *argv, *where])
        out, err = capsys.readouterr()
        return code, out, err

    code, out, _ = run("register", str(tiny_run), "--name", "mnist-vae", "--alias", "production",
                       "--reason", "first", "--tag", "team=vision")
    assert code == 0 and "registered mnist-vae/1 (@production)" in out and "team=vision" in out
    assert f"reference profile  data.validation of {tiny_run} (200 images)" in out
    code, out, _ = run("register", str(models[0]), "--name", "mnist-vae", "--json")
    v2 = json.loads(out)
    assert code == 0 and v2["ref"] == "mnist-vae/2" and v2["aliases"] == [] and v2["profile_data"] is None
    code, _, err = run("register", str(models[0]), "--name", "mnist-vae", "--profile-data", "mnist:train")
    assert code == 2 and "the training split is what the model was fitted on" in err
    code, out, _ = run("show", "mnist-vae/1", "--json")
    shown = json.loads(out)
    assert shown["run_dir"] == str(tiny_run.resolve()) and shown["run_config"]["data"]["validation"] == 200
    assert run("alias", "mnist-vae", "production", "2", "--reason", "better")[1].strip() == \
        "mnist-vae@production: 1 -> 2 (better)"
    assert "rolled back: 2 -> 1 (regressed)" in run("rollback", "mnist-vae", "production", "--reason", "regressed")[1]
    code, out, _ = run("history", "mnist-vae", "production", "--json")
    assert [(e["from_version"], e["to_version"], e["reason"]) for e in json.loads(out)] == [
        (None, 1, "first"), (1, 2, "better"), (2, 1, "regressed")]
    code, out, _ = run("history", "mnist-vae")
    assert out.splitlines()[0].split() == ["#", "at", "alias", "action", "from", "to", "actor", "reason"]
    code, out, _ = run("list")
    assert out.splitlines()[1].split() == ["mnist-vae", "2", "2", "production=1"]
    assert "mnist-vae/2" in run("list", "mnist-vae")[1]
    assert run("show", "mnist-vae@production")[1].splitlines()[0].split() == ["version", "mnist-vae/1"]
    code, out, _ = run("verify", "mnist-vae/2")
    assert code == 0 and out.startswith("mnist-vae/2: ok")
    # errors: one line on stderr, exit status 2
    code, out, err = run("delete", "mnist-vae/1", "--reason", "cleanup")
    assert code == 2 and err.count("\n") == 1 and "vaekit registry: error: mnist-vae/1 cannot be deleted" in err
    code, _, err = run("show", "mnist-vae/9")
    assert code == 2 and "has no version 9" in err
    code, _, err = run("verify", "mnist-vae")
    assert code == 2 and "verify needs NAME/VERSION" in err


def test_cli_reads_the_registry_from_the_environment(tmp_path, models, monkeypatch, capsys):
    from vaekit.cli.main import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("VAEKIT_REGISTRY_ARTIFACTS", raising=False)
    monkeypatch.delenv("VAEKIT_REGISTRY", raising=False)
    assert main(["registry", "register", str(models[0]), "--name", "m"]) == 0
    assert (tmp_path / "registry" / "registry.db").is_file()  # the documented default, under the cwd
    assert (tmp_path / "registry" / "artifacts" / "sha256").is_dir()
    monkeypatch.setenv("VAEKIT_REGISTRY", f"sqlite:///{tmp_path / 'other.db'}")
    capsys.readouterr()
    assert main(["registry", "list"]) == 0 and capsys.readouterr().out.strip() == "no models registered"
