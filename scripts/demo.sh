#!/usr/bin/env bash
# The demo: segment the liver and spleen of the sample CT ct-b (a 20-slice DICOM series) from one labeled slice
# per structure of ct-a, with reverse propagation. Writes out/ct-b_liver_spleen.seg.nrrd (segments "liver" and
# "spleen"; open it in 3D Slicer over the series) and out/ct-b_scores.csv (per-slice reverse scores).
#
#   scripts/demo.sh              real masks: SAM2.1 tiny checkpoint (downloaded on first use, ~150 MB), 1024 px,
#                                the GPU if there is one. Expected: under a minute on a GPU (estimate); on a
#                                2-core CPU more than 10 minutes (measured; see the README's table).
#   scripts/demo.sh --untrained  offline plumbing check: RANDOM weights, 128 px, on the CPU. Expected: about a
#                                minute on a 2-core CPU (21 s measured, 101 s when it is busy with other jobs).
#                                The masks mean nothing.
#
# The first run fetches the sample data (3.8 MB, SHA256-checked; also for --untrained) unless ../shared/data is
# beside the clone, then builds the Python environment (scripts/setup_env.sh says what, how big and how long). Extra arguments go
# to `fewshotsam2 segment` (e.g. --model small, --image-size 512, --method lpips).
# Environment: FEWSHOTSAM2_OUT (output folder, default <repo>/out), FEWSHOTSAM2_DATA (data folder),
# FEWSHOTSAM2_PYTHON (a Python that already has the dependencies: skips the set-up).
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out="${FEWSHOTSAM2_OUT:-$repo/out}"

untrained=0
sized=0
for arg in "$@"; do
  case "$arg" in
    --untrained) untrained=1;;
    --image-size|--image-size=*|--device|--device=*) sized=1;;
  esac
done
extra=()
if [ "$untrained" = 1 ] && [ "$sized" = 0 ]; then
  extra=(--image-size 128 --device cpu)  # random weights: the smallest honest run of the whole chain
fi
if [ "$untrained" = 1 ] && [ "$sized" = 0 ]; then
  echo "demo: offline form, RANDOM weights at 128 px on the CPU: checks the whole chain in about a minute on a" \
       "2-core CPU (longer when the machine is busy); the masks mean nothing" >&2
elif [ "$untrained" = 1 ]; then
  echo "demo: offline form, RANDOM weights at the image size / device you gave; the masks mean nothing" >&2
else
  echo "demo: SAM2.1 tiny checkpoint at 1024 px: under a minute on a GPU, more than 10 minutes on a 2-core CPU" \
       "(first use downloads ~150 MB; offline check: scripts/demo.sh --untrained)" >&2
fi

export PYTHONPATH="$repo/FewShotSAM2${PYTHONPATH:+:$PYTHONPATH}"  # this checkout's code, whatever the venv holds

# the sample data first: it needs no torch (the standard library only), so a missing download stops the demo in
# seconds, before minutes of set-up; the message names every file, a mirror ($FEWSHOTSAM2_SAMPLE_URL) and
# $FEWSHOTSAM2_DATA / --dest
first_python="${FEWSHOTSAM2_PYTHON:-$(command -v python3 || true)}"
if [ -n "$first_python" ] && "$first_python" -c 'import sys; sys.exit(sys.version_info < (3, 9))' 2>/dev/null; then
  data="$("$first_python" -m fewshotsam2.io.sample_data | tail -n 1)"
fi

if [ -n "${FEWSHOTSAM2_PYTHON:-}" ]; then
  python="$FEWSHOTSAM2_PYTHON"
else
  venv="$("$repo/scripts/setup_env.sh" | tail -n 1)"  # pipefail: a failed set-up stops here, with its own message
  python="$venv/bin/python"
fi
fs() { "$python" -m fewshotsam2.cli "$@"; }

if [ -z "${data:-}" ]; then
  data="$(fs sample-data | tail -n 1)"
fi

# a failed run leaves no empty output folder behind
made_out=0
if [ ! -d "$out" ]; then mkdir -p "$out"; made_out=1; fi
trap 'rc=$?; if [ $rc -ne 0 ] && [ $made_out = 1 ]; then rmdir "$out" 2>/dev/null || true; fi' EXIT

start=$SECONDS
fs segment \
  --query "$data/abdomen-ct/ct-b/dicom" \
  --support "$data/abdomen-ct/ct-a/image.nii.gz" "$data/abdomen-ct/ct-a/labels.nii.gz" \
  --labels liver=5,spleen=1 --method reverse \
  --out "$out/ct-b_liver_spleen.seg.nrrd" --scores "$out/ct-b_scores.csv" ${extra[@]+"${extra[@]}"} "$@"
echo "demo: done in $((SECONDS - start)) s. Open $out/ct-b_liver_spleen.seg.nrrd in 3D Slicer over the series" \
     "$data/abdomen-ct/ct-b/dicom; per-slice scores: $out/ct-b_scores.csv" >&2
