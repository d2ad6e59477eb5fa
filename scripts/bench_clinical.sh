#!/bin/sh
# Clinical-size benchmark (docs/benchmarks.md): a 512 x 512 x 300 CT built from ct-b (stretched along z, see
# fewshotsam2/research/clinical_ct.py), SAM2.1 tiny with random weights, CPU, every method, --slice-range off and
# auto, each method in its own process (--isolate) so the RSS peak is its own. Structure: label 7 (pancreas),
# a fifth of the volume; support: the same volume with its labels.
# Usage: scripts/bench_clinical.sh OUT_DIR [IMAGE_SIZES] [RANGES] [MAX_SLICES...]
set -e
OUT=${1:-bench-clinical}; SIZES=${2:-"512 1024"}; RANGES=${3:-"auto off"}; shift 3 2>/dev/null || true
SLICES=${*:-0}
PY=${PYTHON:-python}
WEIGHTS=${FEWSHOTSAM2_LPIPS_WEIGHTS:-../shared/weights/lpips/alexnet_features.pth}
mkdir -p "$OUT"
[ -f "$OUT/ct300/image.nii.gz" ] || $PY -m fewshotsam2.research.clinical_ct "$OUT/ct300" --slices 300
for size in $SIZES; do for range in $RANGES; do for n in $SLICES; do
  $PY -m fewshotsam2.cli bench --query "$OUT/ct300/image.nii.gz" --query-labels "$OUT/ct300/labels.nii.gz" \
      --support "$OUT/ct300/image.nii.gz" --support-labels "$OUT/ct300/labels.nii.gz" --structures 7 \
      --max-slices "$n" --isolate --no-tracemalloc --untrained --device cpu --image-size "$size" \
      --slice-range "$range" --methods "${METHODS:-propagate,reverse,lpips}" --lpips-weights "$WEIGHTS" \
      -o "$OUT/bench-$size-$range-$n.md"
done; done; done
