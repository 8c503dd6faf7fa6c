#!/usr/bin/env bash
# Copyright 2026 The hf_sam contributors. Licensed under the Apache License, Version 2.0 (see LICENSE).
#
# Every study of `python -m benchmarks.studies` on one GPU machine, within a time budget; then, with the time left,
# the GPU check. Run from the repo root, on a machine that may have no network:
#
#     bash benchmarks/studies/study_on_gpu.sh OUT_DIR BUDGET_S [WORKERS]
#
# Built first, where PyPI and the data are (see device_bundle.py), and carried with the checkout: .whl/gpu_check
# (`python -m benchmarks.gpu_check --prepare`) and .device/study (`python benchmarks/studies/device_bundle.py pack`).
# The runs share the GPU (WORKERS processes at once, 1 CPU thread each, TF32 matmuls: `--tf32 true`, recorded in each
# run's command). Results go to OUT_DIR/study.jsonl, one line per finished run, copied there every 10 s; it starts as
# a copy of benchmarks/studies/results/study_gpu.jsonl, so copy it back over that file and commit it. The state lives
# in runs/gpu_study: started again on the same machine, the script skips the finished runs and resumes the others from
# their last checkpoint; a fresh machine starts from the committed file, so each session continues where the last
# one stopped.
# OUT_DIR also gets study.log, gpu.txt, run_logs.tgz and, when the studies end early enough, the GPU check's report.
# A CPU smoke test of the plumbing: STUDY_EXTRA_FLAGS="--max_train_samples 16 ..." STUDY_ARGS="--only rte --seeds 0".
# STUDIES: which studies, in priority order (the finished ones are skipped). The default runs what CPUs cannot do (the
# scarce-data GLUE studies and the full-size calibration reruns: about 90 CPU-hours, minutes here), then the
# rho-robustness studies. Not by default: the label-noise and flatness studies, which the CPU runner works through
# (their paired seeds and the flatness grid's CPU seed 0 stay on one kind of device). A study run here and by a CPU
# runner at once would finish some runs in both places, in both records files, which the runner refuses to read.
set -u
out=${1:?usage: study_on_gpu.sh OUT_DIR BUDGET_S [WORKERS]}
budget_s=${2:?usage: study_on_gpu.sh OUT_DIR BUDGET_S [WORKERS]}
workers=${3:-14}
results=benchmarks/studies/results
start=$(date +%s)
left() { echo $((budget_s - ($(date +%s) - start))); }
export PYTHONUNBUFFERED=1
mkdir -p "$out"
python3 benchmarks/studies/device_bundle.py unpack --bundle .device/study --site /tmp/site || exit 1
export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >"$out/gpu.txt" 2>&1
state=runs/gpu_study
mkdir -p "$state"
# A fresh machine starts from the committed results: only what is missing runs.
[ -f "$state/study.jsonl" ] || cp "$results/study_gpu.jsonl" "$state/study.jsonl" 2>/dev/null
(while sleep 10; do cp "$state"/study.jsonl "$out"/ 2>/dev/null; done) &
copier=$!
[ "$(left)" -gt 30 ] || { echo "no time left for the studies ($(left) s)" >>"$out/study.log"; exit 1; }
timeout -k 5 "$(left)" python3 -m benchmarks.studies \
    --study ${STUDIES:-image-sweep glue-sweep image-full-batch image glue glue-cheap glue-peer glue-rte-lr glue-rte \
        low-data-sweep low-data glue-calibration low-data-fsam-sweep low-data-fsam glue-rho \
        image-rho} \
    --workers "$workers" --data_dir .device/study/data --code_dir . --work_dir "$state/work" \
    --results "$state/study.jsonl" "$results/study_cpu.jsonl" \
    --extra_flags "${STUDY_EXTRA_FLAGS---tf32 true}" ${STUDY_ARGS:-} >>"$out/study.log" 2>&1
echo "studies exit $? with $(left) s left" >>"$out/study.log"
kill "$copier"
cp "$state"/study.jsonl "$out"/ 2>/dev/null
find "$state/work" -maxdepth 1 -name '*.log' -printf '%f\n' | tar czf "$out/run_logs.tgz" -C "$state/work" -T -
if [ "$(left)" -gt 150 ]; then
    bash benchmarks/gpu_check.sh --out "$out/gpu_check" --budget_s "$(($(left) - 20))" --pytest_budget_s 60
fi
