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
One command that checks hf_sam on one GPU and writes one report (`report.md` and `report.json` in `--out`, default
`$OUT` if set, else `runs/gpu_check`; also `pytest.log`). No network; about 8 minutes at most on one H100.

    python -m benchmarks.gpu_check --prepare      # on a machine with PyPI: the wheels the GPU machine lacks
    bash benchmarks/gpu_check.sh --out $OUT       # on the GPU machine, with .whl/gpu_check next to the repo
    python -m benchmarks.gpu_check --smoke        # the plumbing on the CPU: tiny models, fp32, 2 repeats

What it does, in order, within `--budget_s` (partial report when over it):

1. installs what is missing from the wheels of `.whl/gpu_check` (`pip install --no-index --no-deps --target` a
   temporary folder) and reports what it installed and what was already there;
2. runs the repo's GPU tests in a pytest subprocess: every test marked `gpu` (fp16 with the Trainer's GradScaler,
   bf16 autocast, bf16 weights, `torch.compile` with inductor on the GPU), then the `slow` inductor compile test
   (`tests/test_integrations.py::test_torch_compile_inductor`, which compiles for the CPU);
3. for BERT-base (`BertConfig()`, batch 32x128) and ViT-B/16 (`ViTConfig()`, batch 32 of 224x224), built from their
   configs, in bf16 autocast, fp32 and fp16 with a GradScaler: the optimizer-step time of every runner over the plain
   `Trainer.training_step` + optimizer step (medians of interleaved repeats, `torch.cuda.synchronize()` around each
   timed step only), the peak GPU memory over the plain step in trainable-parameter bytes, and the host
   synchronizations per step (`torch.cuda.set_sync_debug_mode("warn")`, warnings counted after warm-up);
4. checks the targets (PASS/MISS): SAM <= 2.05x and F-SAM <= 2.08x the plain step in bf16 for BERT-base; hf_sam no
   slower than the `pytorch_optimizer` optimizer running the same algorithm; no host syncs in SAM/F-SAM beyond the
   plain step's and those of the model's own extra forward/backward pass.

Runners (AdamW, fused, lr 1e-5, on the same batch): `Trainer`, `hf_sam SAM`, `hf_sam F-SAM`, `hf_sam SAM k=5`
(`interval=5`), `hf_sam LookSAM k=5` (timed over whole periods of 5 steps), driven like `sam_step_cost.py` drives
them but on the GPU, with the Trainer's own `bf16=True`/`fp16=True` (accelerate's autocast and GradScaler); and
`pytorch_optimizer SAM`/`FriendlySAM` in the two-pass loop of their documentation (`first_step`/`second_step`), under
`torch.autocast`, with a `torch.amp.GradScaler` in fp16 (both passes unscaled with `unscale_`; `second_step` then
steps unconditionally: no skip of non-finite steps).
"""

import argparse
import contextlib
import copy
import functools
import gc
import importlib
import importlib.metadata
import json
import os
import platform
import shutil
import signal
import site
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
import xml.etree.ElementTree as ElementTree
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

import torch


if TYPE_CHECKING:
    from hf_sam import SAMConfig


START = time.monotonic()  # the budget counts from here (after `import torch`)
REPO = Path(__file__).resolve().parents[1]
WHEEL_DIR = REPO / ".whl" / "gpu_check"
DEVICE_PYTHON = "3.12"  # the GPU machine's python3
# Shipped as wheels, installed on the GPU machine when missing there: hf_sam, datasets (hf_sam's dependency) with its
# two dependencies absent from the GPU image, pytorch_optimizer (the peers), pytest and its dependencies. All pure
# Python; everything else hf_sam needs (torch, transformers, accelerate, peft, numpy, ...) is in that image.
SHIPPED = (
    "hf_sam",
    "datasets",
    "dill",
    "multiprocess",
    "pytorch_optimizer",
    "pytest",
    "pluggy",
    "iniconfig",
    "pygments",
)
REPORTED = ("torch", "transformers", "accelerate", "peft", "hf_sam", "pytorch_optimizer", "datasets", "pytest")
PRECISIONS = ("bf16", "fp32", "fp16")  # bf16 first: the step-time targets are set in bf16
MODELS = ("bert", "vit")
MODEL_NAMES = {"bert": "BERT-base", "vit": "ViT-B/16"}
PLAIN = "Trainer"
TRAINER_RUNNERS = ("Trainer", "hf_sam SAM", "hf_sam F-SAM", "hf_sam SAM k=5", "hf_sam LookSAM k=5")
PEER_RUNNERS = ("pytorch_optimizer SAM", "pytorch_optimizer FriendlySAM")
RUNNERS = TRAINER_RUNNERS + PEER_RUNNERS
SYNC_STEPS = 3  # optimizer steps over which host syncs are counted, after warm-up
STEP_TARGETS = {"hf_sam SAM": 2.05, "hf_sam F-SAM": 2.08}  # ratio to the plain step, BERT-base, bf16
SAME_ALGORITHM = {"hf_sam SAM": "pytorch_optimizer SAM", "hf_sam F-SAM": "pytorch_optimizer FriendlySAM"}
# The compile test that carries `slow`, not `gpu`: run in pytest's second run.
SLOW_COMPILE_TEST = "tests/test_integrations.py::test_torch_compile_inductor"
TINY_LAYERS = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
TINY_BERT = dict(vocab_size=1000, **TINY_LAYERS)
TINY_VIT = dict(image_size=32, patch_size=8, **TINY_LAYERS)


def log(message: str) -> None:
    """Progress on stdout, with the seconds since start (the device tool returns the output's tail)."""
    print(f"[gpu_check {time.monotonic() - START:6.1f}s] {message}", flush=True)


# ------------------------------------------------------------------------------------------------- wheels


def _version(name: str) -> str | None:
    """The installed version of the distribution `name`, or `None`."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _wheel_name_and_version(wheel: Path) -> tuple[str, str]:
    """`(name, version)` from a wheel's file name."""
    name, version = wheel.name.split("-")[:2]
    return name.lower().replace("-", "_"), version


def _listed_files() -> list[str]:
    """The checkout's tracked and untracked-but-not-ignored files (what travels to the GPU machine, carry aside)."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return [path for path in listed.split("\0") if path and (REPO / path).is_file()]


def tree_bytes() -> int:
    """Bytes of what travels to the GPU machine besides carried folders."""
    return sum((REPO / path).stat().st_size for path in _listed_files())


def prepare_wheels(wheel_dir: Path, python_versions: list[str]) -> None:
    """
    Fill `wheel_dir` with the wheels of `SHIPPED`: hf_sam built from this checkout (`pip wheel --no-deps`), the others
    downloaded (`pip download --no-deps --only-binary=:all:`) at the versions installed here, for each Python version
    (some pure-Python wheels, like multiprocess's, are tagged per version). Refuses anything but `*-none-any` wheels.
    """
    wheel_dir.mkdir(parents=True, exist_ok=True)
    for old in wheel_dir.glob("*.whl"):
        old.unlink()
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    log(f"building the hf_sam wheel into {wheel_dir}")
    with tempfile.TemporaryDirectory() as source:  # a clean copy: no build/ or *.egg-info left in the checkout
        for path in _listed_files():
            if path.startswith("hf_sam/") or path in ("pyproject.toml", "README.md", "LICENSE"):
                (Path(source) / path).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(REPO / path, Path(source) / path)
        build = ["wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheel_dir), source]
        subprocess.run([*pip, *build], check=True)
    pins = {}
    for name in SHIPPED[1:]:
        version = _version(name)
        if version is None:
            raise SystemExit(f"{name} is not installed here: `pip install -e .[dev]` first (its version is pinned).")
        pins[name] = version
    for python_version in dict.fromkeys(python_versions):
        log(f"downloading for Python {python_version}: " + ", ".join(f"{n}=={v}" for n, v in pins.items()))
        subprocess.run(
            [*pip, "download", "--no-deps", "--only-binary=:all:", "--python-version", python_version, "-q"]
            + ["-d", str(wheel_dir), *(f"{name}=={version}" for name, version in pins.items())],
            check=True,
        )
    wheels = sorted(wheel_dir.glob("*.whl"))
    impure = [wheel.name for wheel in wheels if not wheel.name.endswith("-none-any.whl")]
    if impure:
        raise SystemExit(f"not pure-Python wheels (they would not install on another machine): {impure}")
    manifest = {"pins": dict(_wheel_name_and_version(wheel) for wheel in wheels), "python_versions": python_versions}
    (wheel_dir / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    size = sum(wheel.stat().st_size for wheel in wheels)
    for wheel in wheels:
        print(f"  {wheel.stat().st_size / 2**10:8.0f} KiB  {wheel.name}")
    tree = tree_bytes()
    print(
        f"{len(wheels)} wheels, {size / 2**20:.2f} MiB in {wheel_dir.relative_to(REPO)}; with the rest of the "
        f"working tree ({tree / 2**20:.2f} MiB) {(size + tree) / 2**20:.2f} MiB travel, of the 64 MiB limit."
    )


def ensure_packages(wheel_dir: Path) -> dict:
    """
    Install what `SHIPPED` names and this Python lacks, from `wheel_dir` (no index, no dependency resolution), into
    a fresh temporary folder added to this process's path and to `PYTHONPATH` (for the pytest subprocess).
    """
    manifest_path = wheel_dir / "manifest.json"
    pins = json.loads(manifest_path.read_text())["pins"] if manifest_path.is_file() else dict.fromkeys(SHIPPED)
    present = {name: _version(name) for name in pins if _version(name)}
    missing = {name: version for name, version in pins.items() if name not in present}
    result = {"wheel_dir": str(wheel_dir), "present": present, "installed": {}, "missing": {}, "target": None}
    if missing and not manifest_path.is_file():
        result["missing"] = missing
        result["error"] = f"no {manifest_path}: run `python -m benchmarks.gpu_check --prepare` where PyPI is reachable"
        return result
    if missing:
        target = tempfile.mkdtemp(prefix="hf_sam_gpu_check_site_")
        pip = [sys.executable, "-m", "pip", "install", "--disable-pip-version-check", "-q", "--no-index", "--no-deps"]
        pip += ["--no-compile", "--find-links", str(wheel_dir), "--target", target]
        requirements = [f"{name}=={version}" for name, version in missing.items()]
        completed = subprocess.run([*pip, *requirements], capture_output=True, text=True)
        if completed.returncode != 0:  # one wheel that does not fit this Python must not block the others
            errors = [subprocess.run([*pip, r], capture_output=True, text=True) for r in requirements]
            result["error"] = "\n".join(e.stderr.strip()[-500:] for e in errors if e.returncode != 0)
        site.addsitedir(target)
        importlib.invalidate_caches()
        os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [target, os.environ.get("PYTHONPATH")]))
        result["target"] = target
        for name in missing:
            version = _version(name)
            result["installed" if version else "missing"][name] = version or missing[name]
    return result


# ------------------------------------------------------------------------------------------------- pytest


def gpu_test_files() -> list[str]:
    """The test files that use the `gpu` marker."""
    return sorted(
        str(path.relative_to(REPO))
        for path in (REPO / "tests").glob("test_*.py")
        if "pytest.mark.gpu" in path.read_text(encoding="utf-8")
    )


def run_pytest(marker: str, targets: list[str], timeout: float, log_file: TextIO) -> dict:
    """One pytest subprocess (its own process group, killed whole at `timeout`); outcomes from its JUnit XML."""
    with tempfile.TemporaryDirectory() as tmp:
        junit = Path(tmp) / "junit.xml"
        command = [sys.executable, "-m", "pytest", "-m", marker, "-p", "no:cacheprovider", "-rfE"]
        command += [f"--junitxml={junit}", *targets]
        result = {"command": " ".join(["pytest", "-m", repr(marker), *targets]), "timed_out": False}
        start = time.monotonic()
        process = subprocess.Popen(
            command,
            cwd=REPO,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        try:
            output, _ = process.communicate(timeout=max(timeout, 1.0))
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            output, _ = process.communicate()
            result["timed_out"] = True
        result["seconds"] = round(time.monotonic() - start, 1)
        result["returncode"] = process.returncode
        log_file.write(f"$ {' '.join(command)}\n{output}\n")
        lines = [line.strip("= ") for line in output.splitlines() if line.startswith("=") and " in " in line]
        result["summary"] = lines[-1] if lines else ("timed out" if result["timed_out"] else output.strip()[-300:])
        result["tests"] = _junit_outcomes(junit) if junit.is_file() else {}
    counts = {}
    for outcome in result["tests"].values():
        counts[outcome["outcome"]] = counts.get(outcome["outcome"], 0) + 1
    result["counts"] = counts
    result["ok"] = not result["timed_out"] and result["returncode"] == 0 and not counts.get("failed")
    return result


def _junit_outcomes(path: Path) -> dict:
    """`{test id: {outcome, seconds, message}}` from pytest's JUnit XML (errors count as failures)."""
    outcomes = {}
    for case in ElementTree.parse(path).iter("testcase"):
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        outcome, message = "passed", ""
        for kind in ("failure", "error", "skipped"):
            element = case.find(kind)
            if element is not None:
                outcome = {"failure": "failed", "error": "failed"}.get(kind, kind)
                message = (element.get("message") or element.text or "")[:400]
                break
        outcomes[name] = {"outcome": outcome, "seconds": float(case.get("time", 0)), "message": message}
    return outcomes


# ------------------------------------------------------------------------------------------------- runners


@dataclass
class Runner:
    """One optimizer step (or one period of `steps_per_call` steps) per call of `step`."""

    step: Callable[[], None]
    steps_per_call: int = 1
    one_pass: Callable[[], None] | None = None  # the plain runner's bare forward + backward, for the sync count


@functools.lru_cache
def build_model(kind: str, smoke: bool, batch_size: int) -> tuple[torch.nn.Module, dict[str, torch.Tensor], str]:
    """
    BERT-base or ViT-B/16 from their default configs (tiny ones with `smoke`), in train mode, and one batch, on the
    CPU. Cached: built once per model for all precisions; the runners train deep copies.
    """
    from transformers import BertConfig, BertForSequenceClassification, ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    if kind == "bert":
        model = BertForSequenceClassification(BertConfig(**(TINY_BERT if smoke else {})))
        seq_len = 32 if smoke else 128
        batch = {
            "input_ids": torch.randint(0, model.config.vocab_size, (batch_size, seq_len), generator=generator),
            "attention_mask": torch.ones(batch_size, seq_len, dtype=torch.long),
        }
        shape = f"{batch_size}x{seq_len}"
    elif kind == "vit":
        model = ViTForImageClassification(ViTConfig(**(TINY_VIT if smoke else {})))
        size = model.config.image_size
        batch = {"pixel_values": torch.randn(batch_size, 3, size, size, generator=generator)}
        shape = f"{batch_size}x3x{size}x{size}"
    else:
        raise ValueError(f"`--models` takes 'bert' and 'vit', got {kind!r}.")
    batch["labels"] = torch.randint(0, model.config.num_labels, (batch_size,), generator=generator)
    return model.train(), batch, shape


def trainer_runner(
    model: torch.nn.Module,
    batch: dict[str, torch.Tensor],
    sam_config: "SAMConfig | None",
    precision: str,
    device: torch.device,
    output_dir: str,
) -> Runner:
    """
    `(SAM)Trainer.training_step` + the optimizer step, as `sam_step_cost.trainer_runner` drives them, but with the
    Trainer's own mixed precision: the model and optimizer go through `accelerator.prepare` as in the Trainer's loop
    (that is where accelerate adds autocast to `forward` and the GradScaler to the optimizer's step).
    """
    from transformers import Trainer, TrainingArguments

    from hf_sam import SAMTrainer

    args = TrainingArguments(
        output_dir=output_dir,
        use_cpu=device.type == "cpu",
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        optim="adamw_torch_fused",
        learning_rate=1e-5,
        max_steps=1,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
    )
    if sam_config is None:
        trainer = Trainer(model=model, args=args)
    else:
        trainer = SAMTrainer(model=model, args=args, sam_config=sam_config)
    trainer.create_optimizer()
    wrapped, trainer.optimizer = trainer.accelerator.prepare(trainer.model, trainer.optimizer)
    trainer.model_wrapped = wrapped
    trainer.current_gradient_accumulation_steps = 1
    steps_per_call = 1 if sam_config is None else sam_config.interval

    def step() -> None:
        for _ in range(steps_per_call):
            trainer.training_step(wrapped, batch)
            trainer.optimizer.step()
            trainer.optimizer.zero_grad(set_to_none=True)
            trainer.state.global_step += 1  # drives `interval`

    def one_pass() -> None:
        wrapped(**batch).loss.backward()
        trainer.optimizer.zero_grad(set_to_none=True)

    return Runner(step, steps_per_call, one_pass)


def peer_runner(
    model: torch.nn.Module,
    batch: dict[str, torch.Tensor],
    optimizer_class: type,
    precision: str,
    device: torch.device,
    rho: float,
) -> Runner:
    """A `pytorch_optimizer` SAM-family optimizer (fused AdamW inside) in its documented two-pass loop."""
    model.to(device)
    optimizer = optimizer_class(
        model.parameters(), base_optimizer=torch.optim.AdamW, rho=rho, lr=1e-5, weight_decay=0.0, fused=True
    )
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None

    def loss() -> torch.Tensor:
        with torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext():
            return model(**batch).loss

    def step() -> None:
        if scaler is None:
            loss().backward()
            optimizer.first_step(zero_grad=True)
            loss().backward()
            optimizer.second_step(zero_grad=True)
            return
        scaler.scale(loss()).backward()
        scaler.unscale_(optimizer)  # pass 1's gradient, unscaled before the perturbation
        optimizer.first_step(zero_grad=True)
        scaler.scale(loss()).backward()
        scaler.unscale_(optimizer.base_optimizer)  # GradScaler unscales once per optimizer between updates
        optimizer.second_step(zero_grad=True)
        scaler.update()

    return Runner(step)


def make_runner(
    name: str, model: torch.nn.Module, batch: dict, precision: str, device: torch.device, output_dir: str
) -> Runner:
    """The runner called `name` (one of `RUNNERS`), training `model` on `batch`."""
    from benchmarks.sam_step_cost import RHO
    from hf_sam import SAMConfig

    configs = {
        "Trainer": None,
        "hf_sam SAM": SAMConfig(rho=RHO),
        "hf_sam F-SAM": SAMConfig(method="fsam", rho=RHO),
        "hf_sam SAM k=5": SAMConfig(rho=RHO, interval=5),
        "hf_sam LookSAM k=5": SAMConfig(method="looksam", rho=RHO, looksam_k=5),
    }
    if name in configs:
        return trainer_runner(model, batch, configs[name], precision, device, output_dir)
    import pytorch_optimizer

    optimizer_class = {PEER_RUNNERS[0]: pytorch_optimizer.SAM, PEER_RUNNERS[1]: pytorch_optimizer.FriendlySAM}[name]
    return peer_runner(model, batch, optimizer_class, precision, device, RHO)


# ------------------------------------------------------------------------------------------------- measuring


def _sync(device: torch.device) -> None:
    """Wait for the GPU's queue (nothing on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_bytes(runner: Runner, allocated_before: int, device: torch.device) -> int | None:
    """Peak GPU memory of one call, over what was allocated before the runner was built (its whole footprint)."""
    if device.type != "cuda":
        return None
    _sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    runner.step()
    _sync(device)
    return torch.cuda.max_memory_allocated(device) - allocated_before


def host_syncs(fn: Callable[[], None], device: torch.device, calls: int) -> float | None:
    """
    Synchronizing CUDA operations per call of `fn`, over `calls` calls: the warnings of
    `torch.cuda.set_sync_debug_mode("warn")` (`.item()`, `bool()` of a tensor, blocking copies to the host...).
    """
    if device.type != "cuda":
        return None
    _sync(device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for _ in range(calls):
                fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    _sync(device)
    return sum("synchroniz" in str(warning.message) for warning in caught) / calls


@dataclass
class ConfigResult:
    """One model and precision: its size, repeats, the bare pass's host syncs and each runner's figures."""

    model: str
    precision: str
    shape: str = ""
    params: int = 0
    param_bytes: int = 0
    repeats: int = 0
    pass_syncs: float | None = None
    runners: dict = field(default_factory=dict)
    notes: list = field(default_factory=list)


def measure_config(
    kind: str, precision: str, args: argparse.Namespace, device: torch.device, deadline: float, hard_end: float
) -> dict:
    """
    Build every runner on a copy of one model (each after the previous ones: the allocation growth is its own
    footprint), warm it up, measure its peak memory and host syncs, then time all of them in interleaved repeats
    (rotating order) until `args.repeats` or `deadline`. Nothing new starts after `hard_end`.
    """
    base, batch_cpu, shape = build_model(kind, args.smoke, args.batch_size)
    trainable = [p for p in base.parameters() if p.requires_grad]
    result = ConfigResult(kind, precision, shape, sum(p.numel() for p in base.parameters()))
    result.param_bytes = sum(p.numel() * p.element_size() for p in trainable)
    batch = {key: value.to(device) for key, value in batch_cpu.items()}
    runners, footprints = {}, {}
    with tempfile.TemporaryDirectory() as output_dir:
        for name in RUNNERS:
            if time.monotonic() > hard_end:
                result.notes.append(f"budget: stopped before building {name}")
                break
            if name in PEER_RUNNERS and _version("pytorch_optimizer") is None:
                result.notes.append(f"{name}: pytorch_optimizer is not installed")
                continue
            _sync(device)
            allocated_before = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
            runner = make_runner(name, copy.deepcopy(base), batch, precision, device, output_dir)
            for _ in range(args.warmup):
                runner.step()
            footprints[name] = peak_bytes(runner, allocated_before, device)
            calls = -(-SYNC_STEPS // runner.steps_per_call)  # whole periods of the interval runners
            syncs = host_syncs(runner.step, device, calls)
            result.runners[name] = {"syncs_per_step": None if syncs is None else syncs / runner.steps_per_call}
            if runner.one_pass is not None:
                result.pass_syncs = host_syncs(runner.one_pass, device, SYNC_STEPS)
            runners[name] = runner
        times = {name: [] for name in runners}
        names = list(runners)
        while PLAIN in runners and result.repeats < args.repeats:
            now = time.monotonic()
            if now > hard_end and result.repeats < args.min_repeats:
                result.notes.append(f"budget: {result.repeats} repeats, fewer than {args.min_repeats}")
                break
            if now > deadline and result.repeats >= args.min_repeats:
                break  # this config's share of the budget is spent: `repeats` says how many ran
            shift = result.repeats % len(names)
            for name in names[shift:] + names[:shift]:
                _sync(device)
                start = time.perf_counter()
                runners[name].step()
                _sync(device)
                times[name].append((time.perf_counter() - start) / runners[name].steps_per_call)
            result.repeats += 1
    if result.repeats:
        plain, plain_peak = statistics.median(times[PLAIN]), footprints.get(PLAIN)
        for name in runners:
            median = statistics.median(times[name])
            peak = footprints[name]
            result.runners[name].update(
                ms_per_step=round(median * 1e3, 3),
                ratio=round(median / plain, 4),
                peak_mib=None if peak is None else round(peak / 2**20, 1),
                peak_over_plain=None if peak is None else round((peak - plain_peak) / result.param_bytes, 3),
            )
    return result.__dict__


# ------------------------------------------------------------------------------------------------- report


def machine_info(device: torch.device) -> dict:
    """The GPU (or CPU), CUDA, driver and package versions, and where hf_sam is imported from."""
    info = {"device": str(device), "python": platform.python_version(), "cuda": torch.version.cuda}
    info["versions"] = {name: _version(name) for name in REPORTED}
    info["versions"]["torch"] = torch.__version__
    import hf_sam

    info["hf_sam_imported_from"] = str(Path(hf_sam.__file__).parent)
    if device.type == "cuda":
        properties = torch.cuda.get_device_properties(device)
        info["gpu"] = properties.name
        info["gpu_memory_gib"] = round(properties.total_memory / 2**30, 1)
        info["capability"] = f"sm_{properties.major}{properties.minor}"
        info["cudnn"] = torch.backends.cudnn.version()
        info["tf32_matmul"] = torch.backends.cuda.matmul.allow_tf32
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            query = ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]
            info["driver"] = subprocess.run(query, capture_output=True, text=True, timeout=10).stdout.strip() or None
    else:
        info["gpu"] = None
        info["cpu_threads"] = torch.get_num_threads()
    return info


def check_targets(report: dict) -> list[dict]:
    """PASS/MISS for each target the measured configs allow; `n/a` where its data is missing."""
    targets = []
    for run in report["pytest"] if isinstance(report.get("pytest"), list) else []:
        result = "PASS" if run["ok"] else "MISS"
        targets.append({"target": f"`{run['command']}`", "value": run["summary"], "limit": None, "result": result})
    configs = {(c["model"], c["precision"]): c for c in report["benchmarks"]}
    bert_bf16 = configs.get(("bert", "bf16"), {}).get("runners", {})
    for name, limit in STEP_TARGETS.items():
        value = bert_bf16.get(name, {}).get("ratio")
        targets.append(_target(f"{name} / Trainer step, BERT-base bf16", value, limit))
    for config in report["benchmarks"]:
        label = f"{MODEL_NAMES[config['model']]} {config['precision']}"
        runners = config["runners"]
        for ours, peer in SAME_ALGORITHM.items():
            ms, peer_ms = runners.get(ours, {}).get("ms_per_step"), runners.get(peer, {}).get("ms_per_step")
            value = None if ms is None or peer_ms is None else round(ms / peer_ms, 4)
            targets.append(_target(f"{ours} / {peer}, {label}", value, 1.0))
        plain = runners.get(PLAIN, {}).get("syncs_per_step")
        for ours in SAME_ALGORITHM:
            syncs = runners.get(ours, {}).get("syncs_per_step")
            if syncs is None or plain is None or config["pass_syncs"] is None:
                targets.append(_target(f"{ours} host syncs/step, {label}", None, None))
                continue
            # The second pass's model forward/backward may sync by itself (it would in any two-pass loop).
            limit = plain + config["pass_syncs"]
            targets.append(_target(f"{ours} host syncs/step <= Trainer + one pass's, {label}", syncs, limit))
    return targets


def _target(name: str, value: float | None, limit: float | None) -> dict:
    result = "n/a" if value is None or limit is None else ("PASS" if value <= limit else "MISS")
    return {"target": name, "value": value, "limit": limit, "result": result}


def _fmt(value: object, digits: int = 3) -> str:
    return "-" if value is None else (f"{value:.{digits}f}" if isinstance(value, float) else str(value))


def markdown(report: dict) -> str:
    """The report as markdown: machine, packages, pytest, one table per model and precision, the targets."""
    machine = report.get("machine", {})
    lines = ["# hf_sam GPU check", ""]
    lines.append(f"Status: **{report['status']}**" + (f" ({'; '.join(report['notes'])})" if report["notes"] else ""))
    lines.append(f"Elapsed: {report['elapsed_s']:.0f} s of a {report['budget_s']:.0f} s budget.")
    lines += ["", "## Machine", "", "| | |", "|---|---|"]
    gpu = machine.get("gpu") or f"none (CPU, {machine.get('cpu_threads')} threads)"
    if machine.get("gpu"):
        gpu += f" ({machine['capability']}, {machine['gpu_memory_gib']} GiB, driver {machine.get('driver')})"
    lines.append(f"| GPU | {gpu} |")
    cuda = f"{machine.get('cuda')} (cuDNN {machine.get('cudnn')}, TF32 matmul {machine.get('tf32_matmul')})"
    lines.append(f"| CUDA | {cuda} |")
    lines.append(f"| Python | {machine.get('python')} |")
    for name, version in machine.get("versions", {}).items():
        lines.append(f"| {name} | {version} |")
    packages = report.get("packages", {})
    installed = ", ".join(f"{n} {v}" for n, v in packages.get("installed", {}).items()) or "nothing"
    present = ", ".join(f"{n} {v}" for n, v in packages.get("present", {}).items()) or "nothing"
    lines += ["", f"- installed from `{packages.get('wheel_dir')}`: {installed}", f"- already present: {present}"]
    if packages.get("missing"):
        lines.append(f"- **missing**: {', '.join(packages['missing'])} ({packages.get('error', '')})")
    lines.append(f"- hf_sam imported from `{machine.get('hf_sam_imported_from')}`")
    lines += ["", "## pytest", ""]
    if isinstance(report["pytest"], str):
        lines.append(report["pytest"])
    else:
        lines += ["| run | result | seconds |", "|---|---|---|"]
        for run in report["pytest"]:
            lines.append(f"| `{run['command']}` | {run['summary']} | {run['seconds']} |")
        for run in report["pytest"]:
            for name, test in run["tests"].items():
                if test["outcome"] == "failed":
                    lines.append(f"- FAILED `{name}`: {test['message'][:200]}")
    lines += ["", "## Step time, peak memory and host syncs", ""]
    for config in report["benchmarks"]:
        runners = config["runners"]
        plain = runners.get(PLAIN, {})
        lines.append(
            f"### {MODEL_NAMES[config['model']]} {config['precision']}: {config['params'] / 1e6:.1f}M parameters "
            f"({config['param_bytes'] / 2**20:.0f} MiB trainable), batch {config['shape']}, "
            f"{config['repeats']} repeats"
        )
        lines.append("")
        if config.get("error"):
            lines += [f"Error: `{config['error']}`", ""]
        lines.append(
            f"Trainer: {_fmt(plain.get('ms_per_step'), 1)} ms/step, peak {_fmt(plain.get('peak_mib'), 0)} MiB; one "
            f"bare forward/backward pass of the model: {_fmt(config['pass_syncs'])} host syncs."
        )
        lines += [
            "",
            "| runner | ms/step | ratio to Trainer | peak memory over Trainer (x params) | host syncs/step |",
        ]
        lines.append("|---|---|---|---|---|")
        for name, values in runners.items():
            lines.append(
                f"| {name} | {_fmt(values.get('ms_per_step'), 1)} | {_fmt(values.get('ratio'))} | "
                f"{_fmt(values.get('peak_over_plain'), 2)} | {_fmt(values.get('syncs_per_step'), 2)} |"
            )
        lines += [f"- {note}" for note in config["notes"]] + [""]
    lines += ["## Targets", "", "| target | value | limit | result |", "|---|---|---|---|"]
    for target in report["targets"]:
        lines.append(
            f"| {target['target']} | {_fmt(target['value'])} | {_fmt(target['limit'])} | {target['result']} |"
        )
    return "\n".join(lines) + "\n"


def write_report(report: dict, out: Path) -> None:
    """(Re)write `report.json` and `report.md`: after every phase, so a run cut short still leaves a report."""
    report["elapsed_s"] = round(time.monotonic() - START, 1)
    report["targets"] = check_targets(report)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "report.md").write_text(markdown(report))


# ------------------------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The flags, with the defaults of a GPU run or, with `--smoke`, of the CPU smoke run."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or REPO / "runs" / "gpu_check"))
    parser.add_argument("--smoke", action="store_true", help="tiny models on the CPU, fp32 only, no pytest")
    parser.add_argument("--prepare", action="store_true", help="build/download the wheels into --wheel_dir and stop")
    parser.add_argument("--wheel_dir", type=Path, default=WHEEL_DIR)
    parser.add_argument("--python_versions", nargs="+", default=[DEVICE_PYTHON], help="--prepare: wheels for these")
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--precisions", nargs="+", choices=PRECISIONS, default=None)
    parser.add_argument("--batch_size", type=int, default=None, help="default 32 (4 with --smoke)")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats per model and precision (max)")
    parser.add_argument("--min_repeats", type=int, default=3, help="repeats run past a model's share of the budget")
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--budget_s", type=float, default=None, help="the whole run; default 450 (120 with --smoke)")
    parser.add_argument("--pytest_budget_s", type=float, default=180.0, help="both pytest runs together")
    parser.add_argument("--no_pytest", action="store_true")
    args = parser.parse_args(argv)
    smoke = args.smoke
    args.precisions = args.precisions or (["fp32"] if smoke else list(PRECISIONS))
    args.batch_size = args.batch_size or (4 if smoke else 32)
    args.repeats = args.repeats or (2 if smoke else 20)
    args.min_repeats = min(args.min_repeats, args.repeats)
    args.warmup = args.warmup if args.warmup is not None else (1 if smoke else 2)
    args.budget_s = args.budget_s or (120.0 if smoke else 450.0)
    if smoke and args.precisions != ["fp32"]:
        parser.error("--smoke runs fp32 only (the CPU has no fp16 GradScaler path worth timing)")
    return args


def main(argv: list[str] | None = None) -> int:
    """`--prepare`, or the check: packages, pytest, benchmarks, targets; 0 once the report is written."""
    args = parse_args(argv)
    if args.prepare:
        prepare_wheels(args.wheel_dir, [*args.python_versions, f"{sys.version_info.major}.{sys.version_info.minor}"])
        return 0
    device = torch.device("cpu" if args.smoke else "cuda")
    if args.smoke:
        torch.set_num_threads(1)  # tiny models: threads only add contention (and seconds) on a loaded machine
    if not args.smoke and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; `--smoke` checks the plumbing on the CPU.", file=sys.stderr)
        return 2
    end = START + args.budget_s
    report = {"status": "running", "smoke": args.smoke, "budget_s": args.budget_s, "notes": [], "benchmarks": []}
    report["pytest"] = "not run"
    report["packages"] = ensure_packages(args.wheel_dir)
    log(f"installed: {report['packages']['installed'] or 'nothing'}; present: {report['packages']['present']}")
    if report["packages"]["missing"]:
        log(f"MISSING: {report['packages']['missing']} ({report['packages'].get('error')})")
    report["machine"] = machine_info(device)
    log(f"device: {report['machine']['gpu'] or 'cpu'}, torch {torch.__version__}, CUDA {torch.version.cuda}")
    write_report(report, args.out)

    if args.smoke or args.no_pytest:
        report["pytest"] = "skipped (--smoke)" if args.smoke else "skipped (--no_pytest)"
    elif _version("pytest") is None:
        report["pytest"] = "skipped: pytest is not installed"
    else:
        runs = [("gpu", gpu_test_files()), ("slow", [SLOW_COMPILE_TEST])]
        pytest_end = min(time.monotonic() + args.pytest_budget_s, end)
        report["pytest"] = []
        with open(args.out / "pytest.log", "w") as log_file:
            for marker, targets in runs:
                if not targets:
                    continue
                if time.monotonic() > pytest_end - 5:
                    report["notes"].append(f"budget: pytest -m {marker} not run")
                    continue
                log(f"pytest -m {marker} {' '.join(targets)}")
                run = run_pytest(marker, targets, pytest_end - time.monotonic(), log_file)
                log(f"pytest -m {marker}: {run['summary']}")
                report["pytest"].append(run)
        write_report(report, args.out)

    configs = [(model, precision) for precision in args.precisions for model in args.models]
    for index, (model, precision) in enumerate(configs):
        left = end - time.monotonic()
        if left < (5 if args.smoke else 20):
            report["notes"].append(f"budget: {model} {precision} not run")
            continue
        deadline = time.monotonic() + left / (len(configs) - index)
        log(f"{MODEL_NAMES[model]} {precision}: {left / (len(configs) - index):.0f} s")
        try:
            result = measure_config(model, precision, args, device, deadline, end)
        except Exception as error:  # an out-of-memory error in one config leaves the others to run
            result = {**ConfigResult(model, precision).__dict__, "error": f"{type(error).__name__}: {error}"[:1000]}
        gc.collect()  # here, once the traceback (and the runners its frames hold) is gone
        if device.type == "cuda":
            torch.cuda.empty_cache()
        report["benchmarks"].append(result)
        plain = result["runners"].get(PLAIN, {}).get("ms_per_step")
        ratios = ", ".join(f"{name} {_fmt(values.get('ratio'))}" for name, values in result["runners"].items())
        log(f"{MODEL_NAMES[model]} {precision}: Trainer {_fmt(plain, 1)} ms; {ratios}")
        write_report(report, args.out)

    partial = report["notes"] or any(c["notes"] or c.get("error") for c in report["benchmarks"])
    report["status"] = "partial" if partial else "complete"
    write_report(report, args.out)
    print(markdown(report), flush=True)
    log(f"report: {args.out / 'report.md'} and report.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
