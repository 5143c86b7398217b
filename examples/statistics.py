"""Uncertainty of test accuracies: a confidence interval for one accuracy, and a paired test of two
models on the same test images.

An accuracy on n test images is a binomial proportion: `accuracy_interval` gives its Wilson score
interval (or the Clopper-Pearson exact one) through `scipy.stats.binomtest`. Two models scored on
the same images differ only where one is right and the other wrong (the discordant pairs);
`paired_comparison` tests whether those split evenly with McNemar's exact test (a two-sided
binomial test of the discordant counts at 1/2) and gives the difference's interval. Those speak
of one trained network each; `across_seeds` speaks of the method: the same difference measured
after training with several seeds, with Student's t interval over the seeds.

References:
    Wilson, "Probable inference, the law of succession, and statistical inference", JASA 1927.
    McNemar, "Note on the sampling error of the difference between correlated proportions or
    percentages", Psychometrika 1947. Agresti, "Categorical Data Analysis" (2013), Sec. 11.1.
"""
import numpy as np
from scipy import stats

CONFIDENCE = 0.95
METHODS = {"wilson": "wilson", "clopper-pearson": "exact"}


def _correct(values, name):
    values = np.asarray(values)
    if values.ndim != 1 or values.size == 0 or not np.isin(values, (0, 1)).all():
        raise ValueError(f"`{name}` must be a non-empty 1-d array of booleans (one per test "
                         f"image). Received: shape {values.shape}, dtype {values.dtype}")
    return values.astype(bool)


def accuracy_interval(correct, confidence=CONFIDENCE, method="wilson"):
    """The accuracy of a model on n test images and its confidence interval.

    Args:
        correct: booleans, one per test image: whether the model's top-1 class was right.
        confidence: the interval's coverage (0.95: a 95% interval).
        method: "wilson" (score interval, close to nominal coverage even near 100%) or
            "clopper-pearson" (exact, conservative).

    Returns:
        {"accuracy", "low", "high", "n", "correct", "confidence", "method"}.
    """
    if method not in METHODS:
        raise ValueError(f"`method` must be one of {sorted(METHODS)}. Received: method={method!r}")
    correct = _correct(correct, "correct")
    k, n = int(correct.sum()), int(correct.size)
    interval = stats.binomtest(k, n).proportion_ci(confidence_level=confidence,
                                                   method=METHODS[method])
    return {"accuracy": k / n, "low": float(interval.low), "high": float(interval.high), "n": n,
            "correct": k, "confidence": confidence, "method": method}


def paired_comparison(correct_a, correct_b, confidence=CONFIDENCE):
    """Model B against model A on the same test images: McNemar's exact test.

    Only the discordant images carry information: `a_only` (A right, B wrong) and `b_only` (B
    right, A wrong). Under "equally accurate", b_only ~ Binomial(a_only + b_only, 1/2); the
    p-value is that two-sided binomial test (exact, for any count). The difference B - A =
    (b_only - a_only) / n comes with its Wald interval for paired proportions (Agresti, Sec. 11.1).

    Returns:
        {"n", "a_only", "b_only", "difference", "low", "high", "p_value", "confidence"}:
        difference and its interval as fractions (B - A), p_value two-sided.
    """
    a, b = _correct(correct_a, "correct_a"), _correct(correct_b, "correct_b")
    if a.shape != b.shape:
        raise ValueError(f"Both models must be scored on the same test images. Received: "
                         f"{a.size} and {b.size} results")
    n = int(a.size)
    a_only, b_only = int(np.sum(a & ~b)), int(np.sum(b & ~a))
    discordant = a_only + b_only
    p_value = stats.binomtest(b_only, discordant, 0.5).pvalue if discordant else 1.0
    difference = (b_only - a_only) / n
    z = stats.norm.ppf(0.5 + confidence / 2)
    half = z * np.sqrt(max(discordant / n - difference ** 2, 0.0) / n)
    return {"n": n, "a_only": a_only, "b_only": b_only, "difference": difference,
            "low": float(difference - half), "high": float(difference + half),
            "p_value": float(p_value), "confidence": confidence}


def across_seeds(comparisons, confidence=CONFIDENCE, alpha=0.05):
    """One comparison (B vs A, `paired_comparison`'s result) repeated over training seeds: what
    varies is the training, not only the test images.

    Returns:
        {"seeds", "differences", "mean", "low", "high", "p_value", "b_better", "a_better"}:
        the per-seed differences (B - A, fractions), their mean with Student's t interval and
        one-sample t-test p-value over the seeds (None for one seed; with no spread the interval is
        the mean itself and p is 0 or 1), and how many seeds'
        McNemar p is below `alpha` in each direction.
    """
    if not comparisons:
        raise ValueError("`comparisons` must hold at least one seed's comparison. Received: []")
    differences = np.array([c["difference"] for c in comparisons], dtype=float)
    seeds, mean = len(differences), float(differences.mean())
    low = high = p_value = None
    if seeds > 1:
        spread = float(differences.std(ddof=1))
        if spread == 0:
            low = high = mean
            p_value = 1.0 if mean == 0 else 0.0
        else:
            half = stats.t.ppf(0.5 + confidence / 2, seeds - 1) * spread / np.sqrt(seeds)
            low, high = mean - half, mean + half
            p_value = float(stats.ttest_1samp(differences, 0.0).pvalue)
    significant = [c for c in comparisons if c["p_value"] < alpha]
    return {"seeds": seeds, "differences": differences.tolist(), "mean": mean, "low": low,
            "high": high, "p_value": p_value, "confidence": confidence,
            "b_better": sum(c["difference"] > 0 for c in significant),
            "a_better": sum(c["difference"] < 0 for c in significant)}


def format_across_seeds(summary):
    """'+0.42 pt [-0.10, +0.94] over 3 seeds, t-test p=0.08; McNemar p<0.05: 2 better, 0 worse'."""
    s = summary
    text = f"{100 * s['mean']:+.2f} pt"
    if s["low"] is not None:
        text += (f" [{100 * s['low']:+.2f}, {100 * s['high']:+.2f}] over {s['seeds']} seeds, "
                 f"t-test p={s['p_value']:.2g}")
    return text + f"; McNemar p<0.05: {s['b_better']} better, {s['a_better']} worse"


def format_accuracy(interval):
    """'91.23% [90.65, 91.77]': an accuracy and its interval, in percent."""
    return (f"{100 * interval['accuracy']:.2f}% [{100 * interval['low']:.2f}, "
            f"{100 * interval['high']:.2f}]")


def format_comparison(comparison):
    """'-0.31 pt [-0.52, -0.10], p=0.004 (41/72)': B - A in points, its interval, McNemar's p and
    the discordant counts (A only / B only)."""
    c = comparison
    return (f"{100 * c['difference']:+.2f} pt [{100 * c['low']:+.2f}, {100 * c['high']:+.2f}], "
            f"p={c['p_value']:.2g} ({c['a_only']}/{c['b_only']})")
