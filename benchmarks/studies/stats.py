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
"""The statistics of the report: mean ± sample std over seeds, and paired differences with Student-t intervals."""

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
