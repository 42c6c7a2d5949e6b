#!/usr/bin/env bash
# The CUDA path's checks and study-throughput figures on the GPU this machine has, each stage's output kept in
# $OUT (default reports/cuda-check): the CUDA tests, then bench.devices --throughput (trials per hour at the full
# budget's top rung for K = 1, 2, 4 workers per GPU, the busy share, when CUDA graphs repay their compilation),
# then a whole 30-configuration study at the full budget, timed. Stages: tests, throughput, study (default: all).
#   CIFARLAB_DATA=/path/to/cifar10-jpeg bash bench/cuda_check.sh [stage ...]
set -uo pipefail
OUT=${OUT:-reports/cuda-check}
mkdir -p "$OUT"
stages=${*:-tests throughput study}
for stage in $stages; do
  start=$(date +%s)
  case $stage in
    tests) python -m pytest -q -m cuda -p no:cacheprovider tests ;;
    throughput) python -m bench.devices --throughput --device cuda --out "$OUT" ;;
    study) python -m studies.onecycle --trials 30 --budget full --workers-per-gpu auto --device cuda --out "$OUT" ;;
    *) echo "unknown stage $stage (tests, throughput, study)" >&2; exit 2 ;;
  esac 2>&1 | tee "$OUT/$stage.log"
  echo "$stage: exit ${PIPESTATUS[0]}, $(( $(date +%s) - start )) s" | tee -a "$OUT/stages.log"
done
