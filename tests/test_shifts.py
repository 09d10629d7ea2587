"""experiments.data.shifts: rotation, noise and the spurious marker on tiny arrays."""

import numpy as np
import pytest

from experiments.data.shifts import (
    add_noise,
    border_pixels,
    rotate_images,
    stamp_spurious_feature,
)


def test_rotation_noise_and_border():
    x = np.zeros((2, 5, 5, 1), np.float32)
    x[:, 0, 2] = 1.0  # the top-centre pixel
    quarter = rotate_images(x, 90.0, fill=-1.0)
    # Counter-clockwise by 90 degrees: top-centre moves to left-centre; corners come from
    # outside the image only for non-multiples of 90 degrees.
    assert quarter[0, 2, 0, 0] == pytest.approx(1.0)
    assert quarter[0, 0, 2, 0] == pytest.approx(0.0)
    assert quarter.dtype == np.float32
    np.testing.assert_allclose(rotate_images(x, 360.0, fill=-1.0), x, atol=1e-6)
    assert rotate_images(x, 45.0, fill=-1.0)[0, 0, 0, 0] == pytest.approx(-1.0)

    noisy = add_noise(x, 0.5, rng=np.random.default_rng(0))
    assert noisy.dtype == np.float32
    assert np.std(noisy - x) == pytest.approx(0.5, rel=0.3)
    np.testing.assert_array_equal(add_noise(x, 0.0, rng=np.random.default_rng(0)), x)

    border = border_pixels(4, 3)
    assert len(border) == 2 * 4 + 2 * 3 - 4
    assert len({tuple(p) for p in border}) == len(border)
    assert all(r in (0, 3) or c in (0, 2) for r, c in border)


def test_spurious_marker_agrees_with_the_label_at_the_given_rate():
    n, classes = 4000, 10
    rng = np.random.default_rng(0)
    x = np.zeros((n, 8, 8, 1), np.float32)
    y = rng.integers(0, classes, n)
    border = border_pixels(8, 8)

    def marked_class(images):
        on = images[:, border[:, 0], border[:, 1], 0] == 5.0  # [n, P]
        assert (on.sum(1) == 2).all()  # exactly one class marker (2 pixels) per image
        return on.argmax(1) // 2

    for correlation in (1.0, 0.9, 0.0):
        out = stamp_spurious_feature(
            x, y, num_classes=classes, correlation=correlation, value=5.0, rng=rng
        )
        agree = np.mean(marked_class(out) == y)
        # Disagreeing draws still hit the label 1/classes of the time.
        expected = correlation + (1 - correlation) / classes
        assert agree == pytest.approx(expected, abs=0.03)
        assert not (x != 0).any()  # the input is not modified
    with pytest.raises(ValueError, match="correlation must lie in"):
        stamp_spurious_feature(x, y, num_classes=classes, correlation=1.5, value=1.0, rng=rng)
    with pytest.raises(ValueError, match="exceeds the 12 border pixels"):
        stamp_spurious_feature(
            x[:, :4, :4], y, num_classes=classes, correlation=1.0, value=1.0, rng=rng
        )
