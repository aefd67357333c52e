"""Rule of thumb for the noise magnification M."""

import math

import pytest

from n2ce_distill.magnification import suggest_M


def test_suggest_M_is_C_sqrt_n():
    assert suggest_M(100) == pytest.approx(30.0)
    assert suggest_M(256, C=2.0) == pytest.approx(32.0)
    assert suggest_M(1) == pytest.approx(3.0)
    assert isinstance(suggest_M(64), float)
    # sqrt scaling: 4x the batch doubles M
    for n in (16, 128, 1000):
        assert suggest_M(4 * n) == pytest.approx(2 * suggest_M(n))


def test_paper_picks_lie_in_the_recommended_band():
    # M = 100 at batch 128 (DxMI) and M = 50 at batch 256 (SiD) correspond to C within 1..10
    for M, n in ((100, 128), (50, 256)):
        assert suggest_M(n, C=1.0) <= M <= suggest_M(n, C=10.0)
    assert suggest_M(256) == pytest.approx(48.0)


@pytest.mark.parametrize("n", [0, 0.5, -4, math.nan, math.inf])
def test_invalid_n_raises(n):
    with pytest.raises(ValueError, match="n"):
        suggest_M(n)


@pytest.mark.parametrize("C", [0.0, -1.0, math.nan, math.inf])
def test_invalid_C_raises(C):
    with pytest.raises(ValueError, match="C"):
        suggest_M(64, C=C)
