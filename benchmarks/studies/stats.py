# Copyright 2026 The hf_sam contributors.
#
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#
#     http://www.apache.org/licenses/LICENSE-2.0
#
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.
"""The statistics of the report: mean ± sample std over seeds, paired differences with Student-t intervals, what a null
result rules out (equivalence within a margin) and the seeds a paired t-test needs for a given power."""

import math
import statistics
import warnings

from scipy import stats


def mean_std(values: list[float]) -> str:
    """ "0.730 ± 0.010 (n=3)": the mean and the sample standard deviation, or the one value, or "–"."""
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.3f} (n=1)"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f} (n={len(values)})"


def paired_difference(pairs: list[tuple[float, float]], form: str = "{:+.3f}") -> str:
    """The mean of `b - a` over the pairs (seeds) with its two-sided 95% Student-t interval (n - 1 degrees of
    freedom, `scipy.stats.ttest_1samp`): "+0.017 [-0.046, +0.079] (n=3)"."""
    if not pairs:
        return "–"
    differences = [b - a for a, b in pairs]
    mean = statistics.mean(differences)
    if len(differences) < 2:
        return f"{form.format(mean)} (n=1)"
    with warnings.catch_warnings():  # equal differences: scipy warns of its precision, the interval is [mean, mean]
        warnings.simplefilter("ignore", RuntimeWarning)
        low, high = stats.ttest_1samp(differences, 0.0).confidence_interval(0.95)
    return f"{form.format(mean)} [{form.format(low)}, {form.format(high)}] (n={len(differences)})"


def mean_ratios(ratios: list[tuple[float, float]]) -> str:
    """ "2.01x / 2.00x": the mean of each of the two ratios (wall time, CPU time) of a list of pairs."""
    return f"{statistics.mean(w for w, _ in ratios):.2f}x / {statistics.mean(c for _, c in ratios):.2f}x"


def t_interval(differences: list[float]) -> tuple[float, float]:
    """The two-sided 95% Student-t interval of the mean of `differences` (n - 1 degrees of freedom, n >= 2)."""
    with warnings.catch_warnings():  # equal differences: the interval is [mean, mean]
        warnings.simplefilter("ignore", RuntimeWarning)
        low, high = stats.ttest_1samp(differences, 0.0).confidence_interval(0.95)
    return float(low), float(high)


def equivalence(differences: list[float], margin: float = 0.01) -> str:
    """
    What a null result rules out: where the 95% t-interval of the mean difference lies inside +-`margin` (metric
    units; 0.01 is 1 point of a score in [0, 1]), "95% CI excludes differences beyond ±X points", X = the interval's larger
    absolute end in points (x 100), rounded up to 0.01 point; otherwise "–" (the interval reaches past the margin).
    """
    if len(differences) < 2:
        return "–"
    low, high = t_interval(differences)
    if not -margin < low <= high < margin:
        return "–"
    return f"95% CI excludes differences beyond ±{math.ceil(round(max(abs(low), abs(high)) * 100, 9) * 100) / 100:.2f} points"


def power_paired_t(n: int, difference: float, sd: float, alpha: float = 0.05) -> float:
    """
    The power of a two-sided paired t-test at level `alpha` on `n` pairs when the true mean difference is
    `difference` and the differences' standard deviation `sd`: P(|T| > t_{1 - alpha/2, n-1}) with T noncentral t
    (`scipy.stats.nct`, n - 1 degrees of freedom, noncentrality difference * sqrt(n) / sd).
    """
    critical = stats.t.ppf(1 - alpha / 2, n - 1)
    noncentrality = difference * math.sqrt(n) / sd
    return float(stats.nct.sf(critical, n - 1, noncentrality) + stats.nct.cdf(-critical, n - 1, noncentrality))


def seeds_for_power(
    sd: float, difference: float = 0.01, power: float = 0.8, alpha: float = 0.05, most: int = 100_000
) -> int | None:
    """The fewest pairs (seeds, n >= 2) at which `power_paired_t` reaches `power`; `None` for sd 0 or past `most`."""
    if not sd > 0:
        return None
    for n in range(2, most + 1):
        if power_paired_t(n, difference, sd, alpha) >= power:
            return n
    return None


def gain_kept(over_baseline: list[float], over_reference: list[float], margin: float) -> str:
    """
    Whether a cheaper method keeps a reference method's gain over a baseline, from paired per-seed differences
    (method - baseline, method - reference) and their 95% t-intervals (`t_interval`), with a margin fixed in advance:
    "keeps" if the interval over the baseline lies above 0 and the one over the reference has its lower end above
    -`margin` (no worse than the reference by more than the margin); "loses" if the interval over the reference lies
    below -`margin` or the one over the baseline at or below 0; otherwise "undecided". "–" with fewer than 2 pairs of
    either (no interval).
    """
    if len(over_baseline) < 2 or len(over_reference) < 2:
        return "–"
    baseline_low, baseline_high = t_interval(over_baseline)
    reference_low, reference_high = t_interval(over_reference)
    if baseline_low > 0 and reference_low > -margin:
        return "keeps"
    if reference_high < -margin or baseline_high <= 0:
        return "loses"
    return "undecided"
