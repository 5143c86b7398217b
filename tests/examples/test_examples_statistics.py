"""examples.statistics against values computed by hand from their closed forms."""
import numpy as np
import pytest

from examples import statistics


def correct(k, n):
    return np.arange(n) < k


def test_wilson_interval_matches_its_closed_form():
    k, n, z = 81, 263, 1.959963984540054
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    result = statistics.accuracy_interval(correct(k, n))
    assert result["n"] == n and result["correct"] == k and result["accuracy"] == p
    assert result["low"] == pytest.approx(centre - half, abs=1e-9)
    assert result["high"] == pytest.approx(centre + half, abs=1e-9)
    # The example: 449 digits at 97.6% give about +-1.4 points.
    digits = statistics.accuracy_interval(correct(438, 449))
    assert 0.010 < (digits["high"] - digits["low"]) / 2 < 0.016


def test_clopper_pearson_at_the_edges():
    none = statistics.accuracy_interval(correct(0, 10), method="clopper-pearson")
    assert none["low"] == 0.0 and none["high"] == pytest.approx(1 - 0.025 ** 0.1, rel=1e-9)
    every = statistics.accuracy_interval(correct(10, 10), method="clopper-pearson")
    assert every["high"] == 1.0 and every["low"] == pytest.approx(0.025 ** 0.1, rel=1e-9)


def test_mcnemar_exact_p_value_and_counts():
    # A right on 3 images where B is wrong, B right on 10 where A is wrong, 87 alike.
    a = np.r_[np.ones(3), np.zeros(10), np.ones(50), np.zeros(37)].astype(bool)
    b = np.r_[np.zeros(3), np.ones(10), np.ones(50), np.zeros(37)].astype(bool)
    result = statistics.paired_comparison(a, b)
    assert (result["n"], result["a_only"], result["b_only"]) == (100, 3, 10)
    # Two-sided exact: 2 * P(X <= 3), X ~ Binomial(13, 1/2) = 2 * (1 + 13 + 78 + 286) / 2**13.
    assert result["p_value"] == pytest.approx(2 * 378 / 2 ** 13, rel=1e-12)
    assert result["difference"] == pytest.approx(0.07)
    half = 1.959963984540054 * np.sqrt((13 / 100 - 0.07 ** 2) / 100)
    assert result["low"] == pytest.approx(0.07 - half) and result["high"] == pytest.approx(
        0.07 + half)
    # Symmetric, and identical models are not different.
    assert statistics.paired_comparison(b, a)["p_value"] == pytest.approx(result["p_value"])
    same = statistics.paired_comparison(a, a)
    assert same["p_value"] == 1.0 and same["difference"] == 0.0
    assert statistics.format_comparison(result).startswith("+7.00 pt")


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="same test images"):
        statistics.paired_comparison(correct(1, 3), correct(1, 4))
    with pytest.raises(ValueError, match="booleans"):
        statistics.accuracy_interval(np.array([0.5, 1.0]))
    with pytest.raises(ValueError, match="method"):
        statistics.accuracy_interval(correct(1, 2), method="wald")
    assert statistics.format_accuracy(statistics.accuracy_interval(correct(1, 2))).startswith(
        "50.00% [")


def test_across_seeds_is_students_t_over_the_seeds():
    rng = np.random.default_rng(0)
    a = rng.random(1000) < 0.8
    comparisons = []
    for flip in (30, 50, 4):
        b = a.copy()
        b[np.flatnonzero(~a)[:flip]] = True  # B right on `flip` more images
        comparisons.append(statistics.paired_comparison(a, b))
    summary = statistics.across_seeds(comparisons)
    differences = np.array([0.03, 0.05, 0.004])
    np.testing.assert_allclose(summary["differences"], differences)
    mean, error = differences.mean(), differences.std(ddof=1) / np.sqrt(3)
    half = 4.302652729911275 * error  # t(0.975, 2 degrees of freedom)
    np.testing.assert_allclose([summary["mean"], summary["low"], summary["high"]],
                               [mean, mean - half, mean + half])
    t = mean / error  # two degrees of freedom: P(T > t) = (1 - t / sqrt(t^2 + 2)) / 2
    np.testing.assert_allclose(summary["p_value"], 1 - t / np.sqrt(t ** 2 + 2))
    assert (summary["b_better"], summary["a_better"]) == (2, 0)  # 4 flips: McNemar p = 0.125
    assert "over 3 seeds" in statistics.format_across_seeds(summary)
    one = statistics.across_seeds(comparisons[:1])
    assert one["low"] is None and "seeds" not in statistics.format_across_seeds(one)
    with pytest.raises(ValueError, match="at least one seed"):
        statistics.across_seeds([])
