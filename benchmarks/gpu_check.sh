#!/usr/bin/env bash
# Copyright 2026 The hf_sam contributors. Licensed under the Apache License, Version 2.0 (see LICENSE).
# The GPU check from the repo root (benchmarks/ is imported as a package): bash benchmarks/gpu_check.sh --out "$OUT"
cd "$(dirname "$0")/.." && exec "${PYTHON:-python3}" -m benchmarks.gpu_check "$@"
