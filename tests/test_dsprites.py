"""The procedural dSprites generator: factor grid, order, geometry, determinism."""

import math

import numpy as np
import pytest

from vaekit.data import dsprites as d
from vaekit.errors import InputError


def _index(*classes):
    return int(np.ravel_multi_index(classes, d.FACTOR_SIZES))


def test_factor_grid_matches_the_published_description():
    assert d.FACTOR_NAMES == ("color", "shape", "scale", "orientation", "posX", "posY")
    assert d.FACTOR_SIZES == (1, 3, 6, 40, 32, 32) and d.NUM_IMAGES == 737_280
    v = d.factor_values()
    assert np.allclose(v["scale"], [0.5, 0.6, 0.7, 0.8, 0.9, 1.0])
    assert len(v["orientation"]) == 40 and v["orientation"][0] == 0 and math.isclose(v["orientation"][-1], 2 * np.pi)
    assert np.allclose(v["posX"], np.linspace(0, 1, 32)) and np.allclose(v["posY"], np.linspace(0, 1, 32))
    assert v["shape"].tolist() == [1, 2, 3] and v["color"].tolist() == [1]


def test_order_is_factor_order_with_y_fastest():
    c = d.factor_classes([0, 1, 32, 1024, 40 * 1024, 6 * 40 * 1024, d.NUM_IMAGES - 1])
    assert c[1].tolist() == [0, 0, 0, 0, 0, 1]  # y moves first
    assert c[2].tolist() == [0, 0, 0, 0, 1, 0]
    assert c[3].tolist() == [0, 0, 0, 1, 0, 0]
    assert c[4].tolist() == [0, 0, 1, 0, 0, 0]
    assert c[5].tolist() == [0, 1, 0, 0, 0, 0]
    assert c[6].tolist() == [0, 2, 5, 39, 31, 31]
    vals = d.latents_values([_index(0, 2, 5, 39, 31, 0)])[0]
    assert vals.tolist() == pytest.approx([1, 3, 1.0, 2 * np.pi, 1.0, 0.0])
    with pytest.raises(InputError, match="737280"):
        d.factor_classes([d.NUM_IMAGES])


def test_images_are_binary_and_stay_inside_the_frame():
    rng = np.random.default_rng(0)
    corners = [_index(0, s, 5, o, x, y) for s in range(3) for o in (0, 5, 13) for x in (0, 31) for y in (0, 31)]
    idx = np.concatenate([rng.integers(0, d.NUM_IMAGES, 300), corners])
    imgs = d.render(idx)
    assert imgs.shape == (len(idx), 64, 64) and imgs.dtype == np.uint8 and set(np.unique(imgs)) <= {0, 1}
    assert imgs.reshape(len(idx), -1).sum(1).min() > 0  # every image shows a sprite
    assert imgs[:, [0, -1], :].max() == 0 and imgs[:, :, [0, -1]].max() == 0  # never touching the border


def test_geometry_steps_and_sizes():
    # one position step moves the sprite by exactly one pixel
    a, b = d.render([_index(0, 2, 3, 7, 10, 4), _index(0, 2, 3, 7, 11, 4)])
    assert np.array_equal(np.roll(a, 1, axis=1), b)
    a, b = d.render([_index(0, 0, 3, 7, 10, 4), _index(0, 0, 3, 7, 10, 5)])
    assert np.array_equal(np.roll(a, 1, axis=0), b)  # y moves down the image
    # axis-aligned bounding boxes at orientation 0: square 20x20 and ellipse 20 wide x 10 high at scale 1
    sq, el, heart = d.render([_index(0, s, 5, 0, 16, 16) for s in range(3)])
    box = lambda im: (np.any(im, 0).sum(), np.any(im, 1).sum())  # noqa: E731
    assert box(sq) == (20, 20) and box(el) == (20, 10) and box(heart)[0] == 20
    # scale grows the area, the first and last orientations coincide (as in the original file)
    areas = [d.render([_index(0, 1, s, 0, 16, 16)])[0].sum() for s in range(6)]
    assert areas == sorted(areas) and areas[0] < areas[-1]
    first, last = d.render([_index(0, 2, 4, 0, 9, 9), _index(0, 2, 4, 39, 9, 9)])
    assert np.array_equal(first, last)
    # orientation turns the sprite: a heart at 90 degrees is a different picture
    quarter = d.render([_index(0, 2, 4, 10, 9, 9)])[0]
    assert not np.array_equal(first, quarter)


def test_rendering_is_deterministic():
    idx = np.arange(0, d.NUM_IMAGES, 997)
    assert d.images_md5(d.render(idx)) == d.images_md5(d.render(idx))


@pytest.mark.slow
def test_full_generation_matches_the_recorded_checksum_and_loader(tmp_path):
    imgs = d.generate_all()
    assert imgs.shape == (737_280, 64, 64) and d.images_md5(imgs) == d.IMAGES_MD5
    ds = d.load_dsprites(cache_dir=tmp_path)
    assert len(ds.train) == 727_280 and len(ds.test) == 10_000
    idx = ds.info["test_index"][:50]
    assert np.array_equal(ds.test.images[:50, 0].numpy(), imgs[idx] * 255)
    assert ds.test.labels[:50].tolist() == d.factor_classes(idx)[:, 1].tolist()
