#!/usr/bin/env bash
# Set up the environment (first run only) and segment the liver and spleen of the shared ct-b CT (DICOM series)
# from one labeled slice per structure of ct-a, with reverse propagation. Extra arguments go to
# `fewshotsam2 segment`, e.g. --untrained (random weights, offline plumbing check) or --model small.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
data="${FEWSHOTSAM2_DATA:-$repo/../shared/data}"
out="${FEWSHOTSAM2_OUT:-$repo/out}"
venv="$("$repo/scripts/setup_env.sh" | tail -n 1)"
mkdir -p "$out"
"$venv/bin/fewshotsam2" segment \
  --query "$data/abdomen-ct/ct-b/dicom" \
  --support "$data/abdomen-ct/ct-a/image.nii.gz" "$data/abdomen-ct/ct-a/labels.nii.gz" \
  --labels 5,1 --method reverse \
  --out "$out/ct-b_liver_spleen.seg.nrrd" --scores "$out/ct-b_scores.csv" "$@"
echo "open $out/ct-b_liver_spleen.seg.nrrd in 3D Slicer over the ct-b series; per-slice scores: $out/ct-b_scores.csv"
