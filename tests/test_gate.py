"""The data-quality gate on real MNIST / Fashion-MNIST and on real faults (NaN, range, shape)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vaekit.errors import InputError, NotFittedError
from vaekit.monitoring.gate import (
    QualityGate,
    calibrate_hist_threshold,
    check_batch,
    hist_distance,
    intensity_histogram,
    reference_histogram,
)


def unit(images: torch.Tensor) -> torch.Tensor:
    return images.float() / 255.0


@pytest.fixture(scope="module")
def mnist_gate(mnist):
    """Reference histogram from 20,000 training images, threshold from 10,000 others (held out from the reference)."""
    train = unit(mnist.train.images)
    return QualityGate((1, 28, 28)).fit(train[:20000], train[20000:30000])


def test_histogram_matches_numpy():
    x = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    x[0, 0, 0, 0] = 1.0  # 1.0 belongs to the last bin, as in numpy.histogram
    x[1, 0, 0, :] = 0.0
    h = intensity_histogram(x, 32)
    for i in range(3):
        counts, _ = np.histogram(x[i].numpy().ravel(), bins=32, range=(0.0, 1.0))
        np.testing.assert_allclose(h[i].numpy(), counts / 64.0)
    np.testing.assert_allclose(reference_histogram(x, 32).numpy(), h.mean(0).numpy())


def test_tv_distance_by_hand():
    ref = torch.tensor([0.5, 0.5, 0.0, 0.0], dtype=torch.float64)
    hists = torch.tensor([[0.5, 0.5, 0.0, 0.0], [0.0, 0.0, 0.5, 0.5], [1.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    np.testing.assert_allclose(hist_distance(hists, ref).numpy(), [0.0, 1.0, 0.5])


def test_accepts_every_mnist_test_image_and_rejects_black_and_constant(mnist, mnist_gate):
    result = mnist_gate.check(unit(mnist.test.images))
    assert result.accepted.all(), result.counts()  # none of the 10,000 MNIST test images
    levels = torch.linspace(0, 1, 11)
    constant = levels.view(-1, 1, 1, 1).expand(-1, 1, 28, 28).contiguous()  # all-black (0) ... all-white (1)
    black = torch.zeros(5, 1, 28, 28)
    bad = mnist_gate.check(torch.cat([black, constant]))
    assert not bad.accepted.any()
    assert set(bad.reasons) == {"low_variance"}
    assert np.allclose(bad.pixel_var, 0.0)


def test_faults_get_their_reason(mnist, mnist_gate):
    x = unit(mnist.test.images[:6]).clone()
    x[1, 0, 3, 3] = float("nan")
    x[2, 0, 5, 5] = float("inf")
    x[3, 0, 0, 0] = 1.5
    x[4, 0, 0, 0] = -0.1
    x[5] = torch.rand(1, 28, 28, generator=torch.Generator().manual_seed(0))  # uniform noise: a real variance
    r = mnist_gate.check(x)
    assert r.reasons == [None, "non_finite", "non_finite", "range", "range", "histogram"]
    assert np.isnan(r.pixel_var[1]) and r.pixel_var[5] > 0.01  # the noise passes the variance rule
    wrong = mnist_gate.check(torch.zeros(2, 1, 32, 32) + 0.5)
    assert wrong.reasons == ["shape", "shape"]


def test_fashion_figure(mnist_gate):
    """Fashion-MNIST test images: few fail the variance rule on a Fashion-fitted gate (blank-ish items)."""
    from vaekit import load_dataset

    fashion = load_dataset("fashion-mnist")
    train = unit(fashion.train.images)
    gate = QualityGate((1, 28, 28)).fit(train[:20000], train[20000:30000])
    own = gate.check(unit(fashion.test.images))
    assert own.accepted.mean() > 0.995, own.counts()
    cross = mnist_gate.check(unit(fashion.test.images))  # a garment is not a digit: many rejected
    assert cross.accepted.mean() < 0.9, cross.counts()


def test_calibration_is_a_quantile_times_margin():
    d = np.linspace(0, 1, 1001)
    assert calibrate_hist_threshold(d, 0.999, 1.5) == pytest.approx(np.quantile(d, 0.999) * 1.5)
    with pytest.raises(InputError, match="distances"):
        calibrate_hist_threshold(d[:10])
    with pytest.raises(InputError, match="margin"):
        calibrate_hist_threshold(d, margin=0.5)


def test_argument_errors():
    x = torch.rand(2, 1, 4, 4)
    with pytest.raises(InputError, match="float tensor"):
        check_batch(np.zeros((2, 1, 4, 4)))
    with pytest.raises(InputError, match="float tensor"):
        check_batch(torch.zeros(2, 4, 4))
    with pytest.raises(InputError, match="min_variance"):
        check_batch(x, min_variance=-1)
    with pytest.raises(InputError, match="both or neither"):
        check_batch(x, hist_threshold=0.2)
    with pytest.raises(InputError, match="reference_hist"):
        check_batch(x, reference_hist=[0.5, 0.6], hist_threshold=0.2)
    with pytest.raises(NotFittedError, match="fit"):
        QualityGate((1, 4, 4)).check(x)
    # the variance rule alone needs no fitting; the threshold is configurable
    assert QualityGate((1, 4, 4), histogram=False, min_variance=0.5).check(x).reasons == ["low_variance"] * 2


def test_the_gate_statistics_match_torch_computations_image_by_image():
    # the gate computes in numpy; an independent torch computation per image gives the same figures
    g = torch.Generator().manual_seed(7)
    x = torch.rand(6, 1, 28, 28, generator=g, dtype=torch.float32) ** 3
    x[2] = 1.0  # every pixel in the last bin
    ref = reference_histogram(torch.rand(50, 1, 28, 28, generator=g))
    out = check_batch(x, reference_hist=ref, hist_threshold=1.0, min_variance=0.0)
    for i in range(6):
        xi = x[i].double().flatten()
        assert out.pixel_mean[i] == pytest.approx(float(xi.mean()), rel=1e-12)
        assert out.pixel_var[i] == pytest.approx(float(xi.var(unbiased=False)), rel=1e-9, abs=1e-15)
        h = torch.histc(xi, bins=32, min=0.0, max=1.0) / xi.numel()  # numpy's edge rule: 1.0 in the last bin
        assert out.hist_distance[i] == pytest.approx(float(0.5 * (h - ref).abs().sum()), abs=1e-12)
    np.testing.assert_allclose(intensity_histogram(x).numpy().sum(1), 1.0)
