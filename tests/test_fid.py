"""Fréchet distance against independent computations; the extractor artifact; reference statistics."""

import json

import numpy as np
import pytest
import torch
from scipy import linalg

from vaekit.data import ImageDataset
from vaekit.errors import InputError, ModelFormatError
from vaekit.evaluation.extractor import load_extractor, train_extractor
from vaekit.evaluation.fid import FeatureStats, feature_stats, fid, frechet_distance, reference_stats


def _random_gaussian(rng, d):
    a = rng.standard_normal((d, d))
    return rng.standard_normal(d), a @ a.T / d + 0.1 * np.eye(d)


def _reference_fd(mu1, s1, mu2, s2):
    """Independent route: Tr((S1 S2)^1/2) = sum of sqrt eigenvalues of S1^1/2 S2 S1^1/2 (symmetric PSD)."""
    r1 = linalg.sqrtm(s1).real
    ev = np.linalg.eigvalsh(r1 @ s2 @ r1)
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.sum(np.sqrt(np.clip(ev, 0, None))))


@pytest.mark.parametrize("d", [1, 5, 64])
def test_matches_direct_scipy_computation_on_random_gaussians(d):
    rng = np.random.default_rng(d)
    mu1, s1 = _random_gaussian(rng, d)
    mu2, s2 = _random_gaussian(rng, d)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(_reference_fd(mu1, s1, mu2, s2), rel=1e-6, abs=1e-8)


def test_closed_forms_for_commuting_covariances():
    # diagonal covariances: FD = |mu1 - mu2|^2 + sum (sqrt(a) - sqrt(b))^2
    a, b = np.array([1.0, 4.0, 0.25]), np.array([9.0, 1.0, 0.25])
    mu1, mu2 = np.zeros(3), np.array([1.0, 2.0, 0.0])
    expect = 5.0 + (1 - 3) ** 2 + (2 - 1) ** 2 + 0.0
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expect)


def test_identical_feature_sets_give_zero():
    f = torch.randn(5000, 32, generator=torch.Generator().manual_seed(0))
    mu, sigma = feature_stats(f)
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-6
    # two independent samples of one distribution: small, and it shrinks with N
    g = torch.Generator().manual_seed(1)
    small = frechet_distance(*feature_stats(torch.randn(500, 8, generator=g)),
                             *feature_stats(torch.randn(500, 8, generator=g)))
    big = frechet_distance(*feature_stats(torch.randn(20000, 8, generator=g)),
                           *feature_stats(torch.randn(20000, 8, generator=g)))
    assert big < small < 0.2


def test_feature_stats_in_batches_equal_numpy():
    f = torch.randn(1003, 7, generator=torch.Generator().manual_seed(2)) * 3 + 1
    acc = FeatureStats()
    for i in range(0, 1003, 100):
        acc.update(f[i : i + 100])
    mu, sigma = acc.compute()
    assert np.allclose(mu, f.double().mean(0).numpy())
    assert np.allclose(sigma, np.cov(f.double().numpy(), rowvar=False))
    with pytest.raises(InputError, match="columns"):
        acc.update(torch.zeros(2, 3))


def test_numerical_guards():
    # rank-deficient covariances: the product is singular; the result stays finite and correct
    e = np.zeros((3, 3))
    e[0, 0] = 1.0
    assert frechet_distance(np.zeros(3), e, np.zeros(3), e) == pytest.approx(0.0, abs=1e-5)
    # a covariance with a negative eigenvalue has no real square root: rejected
    with pytest.raises(InputError, match="imaginary"):
        frechet_distance(np.zeros(2), np.diag([1.0, -1.0]), np.zeros(2), np.eye(2))
    with pytest.raises(InputError, match="different dimensions"):
        frechet_distance(np.zeros(2), np.eye(2), np.zeros(3), np.eye(3))
    with pytest.raises(InputError, match="finite"):
        frechet_distance(np.array([np.nan]), np.eye(1), np.zeros(1), np.eye(1))


@pytest.fixture(scope="module")
def tiny_extractor(tmp_path_factory, mnist):
    """One epoch on 1,500 train images (seconds): enough for the artifact and cache mechanics."""
    small = ImageDataset("mnist", mnist.train.subset(1500), mnist.test.subset(1000), mnist.classes)
    out = tmp_path_factory.mktemp("ext") / "mnist"
    return train_extractor("mnist", out_dir=out, seed=0, epochs=1, data=small), small


def test_extractor_artifact_round_trip_and_reproducibility(tiny_extractor, tmp_path):
    folder, small = tiny_extractor
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "manifest.json", "metrics.json",
                                                        "model.safetensors"]
    ext = load_extractor("mnist", folder)
    metrics = json.loads((folder / "metrics.json").read_text())
    assert ext.test_accuracy == metrics["test_accuracy"] > 0.5  # far above chance (0.1) after one small epoch
    assert ext.artifact.kind == "fid-extractor" and ext.artifact.path == folder and ext.artifact.metrics == metrics
    x = small.test.images[:10].float() / 255
    assert ext.features(x).shape == (10, 128) and ext.predict(x).shape == (10,)
    again = load_extractor("mnist", train_extractor("mnist", out_dir=tmp_path / "again", seed=0, epochs=1, data=small))
    assert ext.weights_hash() == again.weights_hash()  # same seed, bit-identical weights


def test_missing_extractor_tells_the_user_what_to_run(tmp_path):
    with pytest.raises(ModelFormatError, match="vaekit fid-extractor train fashion-mnist"):
        load_extractor("fashion-mnist", tmp_path / "nothing")
    with pytest.raises(InputError, match="dataset must be one of"):
        load_extractor("cifar10")


def test_reference_stats_are_cached_and_fid_of_the_test_split_is_zero(tiny_extractor, tmp_path, monkeypatch):
    monkeypatch.setenv("VAEKIT_CACHE", str(tmp_path / "cache"))
    folder, small = tiny_extractor
    ext = load_extractor("mnist", folder)
    mu, sigma = reference_stats("mnist", "test", ext, data=small)
    cached = list((tmp_path / "cache" / "fid-stats" / "mnist").glob("stats-test-*.safetensors"))
    assert len(cached) == 1 and ext.weights_hash() in cached[0].name
    assert not list(folder.glob("stats-*"))  # never inside the artifact: its files are fixed by the manifest
    load_extractor("mnist", folder)  # still verifies
    mu2, _ = reference_stats("mnist", "test", ext, data=None)  # read from the cache: no data needed
    assert np.array_equal(mu, mu2)
    cached[0].write_bytes(cached[0].read_bytes()[:20])  # a damaged cache file is recomputed, not an error
    mu3, _ = reference_stats("mnist", "test", ext, data=small)
    assert np.array_equal(mu, mu3)
    test_images = small.test.images.float() / 255
    assert abs(fid(test_images, "mnist", ext)) < 1e-4
    noise = torch.rand(1000, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    assert fid(noise, "mnist", ext) > 10 * fid(small.train.images[:1000].float() / 255, "mnist", ext)
    with pytest.raises(InputError, match=r"\[0, 1\]"):
        fid(test_images * 2, "mnist", ext)
    with pytest.raises(InputError, match="1, 28, 28"):
        fid(torch.rand(4, 1, 32, 32), "mnist", ext)


@pytest.mark.slow
def test_default_extractor_reaches_99_percent_on_mnist(tmp_path, mnist):
    ext = load_extractor("mnist", train_extractor("mnist", out_dir=tmp_path / "mnist", data=mnist))
    assert ext.test_accuracy >= 0.99


def test_cli_info_prints_the_artifact(tiny_extractor, capsys):
    from vaekit.cli.main import main

    folder, _ = tiny_extractor
    assert main(["fid-extractor", "info", "mnist", "--path", str(folder)]) == 0
    out = capsys.readouterr().out
    assert "test_accuracy" in out and "weights hash" in out
    assert main(["fid-extractor", "info", "mnist", "--path", str(folder / "missing")]) == 2
    assert "vaekit fid-extractor train mnist" in capsys.readouterr().err


def test_extractor_loads_through_the_artifact_code_and_refuses_a_flipped_byte(tiny_extractor, tmp_path):
    import shutil

    from vaekit.errors import ArtifactIntegrityError

    folder, _ = tiny_extractor
    for name in ("config.json", "model.safetensors", "metrics.json", "manifest.json"):
        copy = tmp_path / name.replace(".", "_")
        shutil.copytree(folder, copy)
        data = bytearray((copy / name).read_bytes())
        data[len(data) // 2] ^= 0x01
        (copy / name).write_bytes(bytes(data))
        with pytest.raises(ArtifactIntegrityError) as info:
            load_extractor("mnist", copy)
        assert info.value.file == name and name in str(info.value)


def test_cli_train_stores_the_fid_floor_through_the_artifact(mnist, tmp_path, monkeypatch):
    """`fid-extractor train` adds the FID floor to metrics.json by rewriting the artifact (manifest included)."""
    from vaekit.artifact import read_artifact

    small = ImageDataset("mnist", mnist.train.subset(300), mnist.test.subset(200), mnist.classes)
    monkeypatch.setenv("VAEKIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr("vaekit.data.load_dataset", lambda name, **_: small)
    from vaekit.cli.main import main

    assert main(["fid-extractor", "train", "mnist", "--out", str(tmp_path / "ext"), "--epochs", "1"]) == 0
    art = read_artifact(tmp_path / "ext", "fid-extractor")
    assert art.metrics["fid_train10k_vs_test"] >= 0 and "test_accuracy" in art.metrics
