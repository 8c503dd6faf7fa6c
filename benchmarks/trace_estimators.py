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
Hutchinson against Hutch++ at the same number of Hessian-vector products, on a saved image classifier.

    python benchmarks/trace_estimators.py runs/study/image-cifar10-AdamW-rho0-seed1/checkpoint-2291 \\
        --data ../shared/data/cifar10-small/train.parquet --num_images 256 --batch_size 256 --configs 0:30 10:10 5:20

Each config is `deflation_rank:samples` (`0:N` is Hutchinson with N probes; `k:N` Hutch++, 2k + N products); each is
run with every seed, and the estimate, its standard error and the time are printed, so which estimator is tighter for
this model (outlier-dominated or bulk-dominated Hessian) is read off the standard errors. The images are
`--num_images` rows of `--data` after a seed-0 shuffle (files such as the CIFAR-10 subset are sorted by class),
prepared by the checkpoint's image processor, in batches of `--batch_size`.
"""

import argparse
import time

import torch
from datasets import load_dataset
from transformers import AutoImageProcessor, AutoModelForImageClassification

from hf_sam.sharpness import hessian_trace, top_hessian_eigenvalue


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="A folder `from_pretrained` loads, with its image processor.")
    parser.add_argument("--data", required=True, help="A parquet file with an image column and a label column.")
    parser.add_argument("--num_images", type=int, default=500)
    parser.add_argument("--batch_size", type=int, default=250)
    parser.add_argument("--configs", nargs="+", default=["0:30", "10:10", "5:20"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    model = AutoModelForImageClassification.from_pretrained(args.checkpoint).float()
    processor = AutoImageProcessor.from_pretrained(args.checkpoint)
    rows = load_dataset("parquet", data_files=args.data, split="train").shuffle(seed=0).select(range(args.num_images))
    image_column = next(c for c in rows.column_names if c in ("img", "image"))
    label_column = next(c for c in rows.column_names if "label" in c)
    pixels = torch.as_tensor(processor(list(rows[image_column]), return_tensors="np")["pixel_values"])
    labels = torch.tensor(rows[label_column])
    batches = [
        {"pixel_values": pixels[i : i + args.batch_size], "labels": labels[i : i + args.batch_size]}
        for i in range(0, args.num_images, args.batch_size)
    ]
    start = time.perf_counter()
    top = top_hessian_eigenvalue(model, batches, max_iterations=20, tol=1e-3)
    print(f"top eigenvalue {top.value:.4g} (residual {top.residual:.3g}, {time.perf_counter() - start:.0f} s)")
    for config in args.configs:
        rank, samples = (int(part) for part in config.split(":"))
        for seed in args.seeds:
            start = time.perf_counter()
            result = hessian_trace(model, batches, samples=samples, deflation_rank=rank, seed=seed)
            print(
                f"deflation_rank={rank} samples={samples} seed={seed}: trace {result.value:.2f} +- "
                f"{result.stderr if result.stderr is None else round(result.stderr, 2)} "
                f"({result.iterations} products, {time.perf_counter() - start:.0f} s)",
                flush=True,
            )


if __name__ == "__main__":
    main()
