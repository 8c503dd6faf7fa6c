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
"""
Plot the loss, sharpness and label-noise memorisation logs of one or more runs from their `trainer_state.json`.

```bash
python -m hf_sam.plot runs/mrpc-sam runs/mrpc-fsam --out sharpness.png
```

One panel per quantity (`loss`, `eval_loss`, `sam/sharpness`, then every `sharpness/<name>` logged by
`SharpnessCallback`; for a run with `--label_noise`, `eval_accuracy` and `eval_clean_accuracy` (a held-out split's
accuracy against its noisy and its true labels) and every `memorisation/<name>` of `MemorisationCallback`; or the
`--keys` given), one line per run (labelled with the run's folder name) against the
optimizer step; a `<key>_stderr` logged next to a key is drawn as a +-1 stderr band. `--log_y KEY ...` draws those
panels on a logarithmic axis (symmetric-log, linear around 0, when a value or a band reaches 0 or below). Needs
matplotlib (`pip install matplotlib`); draws with the Agg backend (no display, and pyplot's global backend is left
alone).
"""

import argparse
import json
import math
import re
from collections.abc import Sequence
from pathlib import Path


TRAINER_STATE_NAME = "trainer_state.json"
DEFAULT_KEYS = ("loss", "eval_loss", "sam/sharpness")
LABEL_NOISE_KEYS = ("eval_accuracy", "eval_clean_accuracy")
STDERR_SUFFIX = "_stderr"

Series = dict[str, tuple[list[int], list[float], list[float] | None]]


def find_trainer_state(run: str | Path) -> Path:
    """`run/trainer_state.json` if it exists, else the one in the `checkpoint-<step>` subfolder with the largest step."""
    run = Path(run)
    if run.is_file():
        return run
    if (run / TRAINER_STATE_NAME).is_file():
        return run / TRAINER_STATE_NAME
    checkpoints = [
        (int(match.group(1)), path)
        for path in run.glob("checkpoint-*")
        if (match := re.fullmatch(r"checkpoint-(\d+)", path.name)) and (path / TRAINER_STATE_NAME).is_file()
    ]
    if not checkpoints:
        raise FileNotFoundError(f"No {TRAINER_STATE_NAME} in {run} or in any of its checkpoint-* folders.")
    return max(checkpoints)[1] / TRAINER_STATE_NAME


def logged_keys(run: str | Path) -> list[str]:
    """The keys with a numeric value somewhere in a run's `log_history` (but `step` and `epoch`), sorted."""
    with open(find_trainer_state(run)) as f:
        history = json.load(f).get("log_history", [])
    numeric = {
        key
        for entry in history
        for key, value in entry.items()
        if isinstance(value, int | float) and not isinstance(value, bool)
    }
    return sorted(numeric - {"step", "epoch"})


def load_series(run: str | Path, keys: Sequence[str] | None = None) -> Series:
    """
    `{key: (steps, values, stderrs or None)}` from a run's `log_history`, for `keys` (default: `DEFAULT_KEYS`, every
    `sharpness/*` key without the `*_stderr` ones, `LABEL_NOISE_KEYS` when `eval_clean_accuracy` is logged, and every
    `memorisation/*` key). Non-numeric and non-finite values are skipped.
    """
    with open(find_trainer_state(run)) as f:
        history = json.load(f).get("log_history", [])
    if keys is None:
        logged = {key for entry in history for key in entry}
        sharpness = sorted(k for k in logged if k.startswith("sharpness/") and not k.endswith(STDERR_SUFFIX))
        memorisation = sorted(k for k in logged if k.startswith("memorisation/"))
        noise = [k for k in LABEL_NOISE_KEYS if k in logged] if "eval_clean_accuracy" in logged else []
        keys = [k for k in DEFAULT_KEYS if k in logged] + sharpness + noise + memorisation
    series: Series = {}
    for key in keys:
        steps, values, stderrs = [], [], []
        for entry in history:
            value = entry.get(key)
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                continue
            steps.append(int(entry.get("step", len(steps))))
            values.append(float(value))
            stderr = entry.get(key + STDERR_SUFFIX)
            stderrs.append(float(stderr) if isinstance(stderr, int | float) else math.nan)
        if steps:
            has_stderr = any(math.isfinite(s) for s in stderrs)
            series[key] = (steps, values, stderrs if has_stderr else None)
    return series


def plot_runs(
    runs: Sequence[str | Path],
    out: str | Path,
    *,
    keys: Sequence[str] | None = None,
    labels: Sequence[str] | None = None,
    title: str | None = None,
    log_y: Sequence[str] = (),
) -> Path:
    """
    Draw one panel per quantity and one line per run, and write the figure to `out` (format from its suffix).

    The panels of the keys in `log_y` get a logarithmic y axis; where some value in the panel, or the lower end of
    its stderr band, is <= 0 (a trace estimate early in training can be), a symmetric-log axis, linear near 0.
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as error:
        raise ImportError("hf_sam.plot needs matplotlib: `pip install matplotlib`.") from error

    if labels is None:
        labels = _run_labels(runs)
    if len(labels) != len(runs):
        raise ValueError(f"Got {len(labels)} labels for {len(runs)} runs.")
    all_series = [load_series(run, keys) for run in runs]
    panel_keys = list(keys) if keys is not None else _union_in_order(all_series)
    panel_keys = [k for k in panel_keys if any(k in series for series in all_series)]
    if not panel_keys:
        raise ValueError(f"None of the runs logged any of {list(keys) if keys else 'the default keys'}.")
    unplotted = [k for k in log_y if k not in panel_keys]
    if unplotted:
        raise ValueError(f"log_y names {unplotted}, which no panel shows; the panels: {panel_keys}.")

    columns = min(3, len(panel_keys))
    rows = math.ceil(len(panel_keys) / columns)
    fig = Figure(figsize=(5.0 * columns, 3.6 * rows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, columns, squeeze=False)
    for ax, key in zip(axes.flat, panel_keys, strict=False):
        for index, (label, series) in enumerate(zip(labels, all_series, strict=True)):
            if key not in series:
                continue
            steps, values, stderrs = series[key]
            color = f"C{index % 10}"
            ax.plot(steps, values, color=color, label=label, marker="o" if len(steps) <= 30 else None, markersize=3)
            if stderrs is not None:
                low = [v - (s if math.isfinite(s) else 0.0) for v, s in zip(values, stderrs, strict=True)]
                high = [v + (s if math.isfinite(s) else 0.0) for v, s in zip(values, stderrs, strict=True)]
                ax.fill_between(steps, low, high, color=color, alpha=0.2, linewidth=0)
        if key in log_y:  # the values and the ends of their stderr bands
            _log_scale(ax, [v for series in all_series if key in series for v in _band_ends(*series[key][1:])])
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.set_ylabel(key.split("/")[-1])
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small")
    for ax in list(axes.flat)[len(panel_keys) :]:
        ax.set_visible(False)
    if title:
        fig.suptitle(title)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    return out


def _band_ends(values: list[float], stderrs: list[float] | None) -> list[float]:
    """The values and, where there is a stderr, `value - stderr` and `value + stderr`."""
    ends = list(values)
    for value, stderr in zip(values, stderrs, strict=True) if stderrs is not None else ():
        if math.isfinite(stderr):
            ends += [value - stderr, value + stderr]
    return ends


def _log_scale(ax, values: list[float]) -> None:
    """
    A log y axis, or, when a value is <= 0, symmetric-log: linear within the power of ten at or below the smallest
    non-zero |value| (so the ticks at +-that power and 0 sit a decade apart).
    """
    if all(v > 0 for v in values):
        ax.set_yscale("log")
        return
    nonzero = [abs(v) for v in values if v != 0]
    ax.set_yscale("symlog", linthresh=10.0 ** math.floor(math.log10(min(nonzero))) if nonzero else 1.0)


def _run_labels(runs: Sequence[str | Path]) -> list[str]:
    """Each run's folder name (the folder above `checkpoint-*` or `trainer_state.json`); the path if not unique."""
    names = []
    for run in runs:
        path = Path(run).resolve()
        if path.is_file():
            path = path.parent
        if re.fullmatch(r"checkpoint-\d+", path.name):
            path = path.parent
        names.append(path.name)
    if len(set(names)) < len(names):
        return [str(run) for run in runs]
    return names


def _union_in_order(all_series: list[Series]) -> list[str]:
    keys: list[str] = []
    for series in all_series:
        keys.extend(k for k in series if k not in keys)
    fixed = [k for k in DEFAULT_KEYS if k in keys]
    return fixed + sorted(k for k in keys if k not in fixed)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m hf_sam.plot",
        description="Plot loss, sam/sharpness and sharpness/* logs of Trainer runs (one line per run) into a PNG.",
    )
    parser.add_argument(
        "runs", nargs="+", help="output_dir of each run (or a checkpoint-* folder or trainer_state.json)"
    )
    parser.add_argument("--out", required=True, help="the image to write, e.g. sharpness.png")
    parser.add_argument("--keys", nargs="+", default=None, help="the log keys to plot (default: loss and sharpness)")
    parser.add_argument("--labels", nargs="+", default=None, help="one legend label per run (default: folder names)")
    parser.add_argument("--title", default=None, help="a title for the whole figure")
    parser.add_argument(
        "--log_y", nargs="+", default=[], metavar="KEY", help="keys whose panels get a log y axis (symlog if <= 0)"
    )
    args = parser.parse_args(argv)
    try:
        series = [load_series(run, args.keys) for run in args.runs]
    except (OSError, ValueError) as error:  # no trainer_state.json, or one that is not JSON
        parser.exit(2, f"{parser.prog}: error: {error}\n")
    # A run with none of the keys, or a key no run logged: say what the runs have, exit 2 (argparse's usage error).
    missing = [run for run, found in zip(args.runs, series, strict=True) if not found]
    absent = [key for key in args.keys or () if not any(key in found for found in series)]
    if missing or absent:
        wanted = " ".join(args.keys) if args.keys else f"{' '.join(DEFAULT_KEYS)} or sharpness/*"
        problem = f"{' '.join(absent)} not logged by any run" if absent else f"none of {wanted} in {' '.join(missing)}"
        lines = [f"{parser.prog}: error: {problem}. The keys each run logged:"]
        lines += [f"  {run}: {' '.join(logged_keys(run)) or '(none)'}" for run in args.runs]
        parser.exit(2, "\n".join(lines) + "\nPick from them with --keys.\n")
    plotted = args.keys or sorted({key for found in series for key in found})
    if unplotted := [key for key in args.log_y if key not in plotted]:
        parser.exit(
            2, f"{parser.prog}: error: --log_y {' '.join(unplotted)}: not a plotted key ({' '.join(plotted)}).\n"
        )
    plot_runs(args.runs, args.out, keys=args.keys, labels=args.labels, title=args.title, log_y=args.log_y)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
