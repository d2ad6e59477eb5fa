#!/usr/bin/env bash
# Cases per minute for 6 shared cases: 6 x `segment` vs `batch` (local) vs `batch --ray local --workers 2`.
# Usage: scripts/bench_batch.sh [OUT_DIR] [extra segment/batch options, e.g. --image-size 512 --device cuda]
# Default model options: random weights (the timings do not depend on them), 128 px, CPU. Needs Ray for the
# last run (pip install 'fewshotsam2[ray]'). Data: $FEWSHOTSAM2_DATA or ../shared/data beside the clone.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
data="${FEWSHOTSAM2_DATA:-$repo/../shared/data}"
out="$(realpath -m "${1:-bench-batch}")"
shift || true
model=(--untrained --image-size 128 --device cpu --quiet "$@")
py="${PYTHON:-python}"
export PYTHONPATH="$repo/FewShotSAM2${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$out"

ct="$data/abdomen-ct/ct-a"
sp="$data/spleen-ct"
# the spleen (label 1 in both) from two supports: ct-a for three queries, spleen-ct for three others
cat > "$out/cohort.csv" <<EOF
query,support_image,support_labels,labels,output
$data/abdomen-ct/ct-b/dicom,$ct/image.nii.gz,$ct/labels.nii.gz,1,ct-b.nii.gz
$data/abdomen-mr/image.nii.gz,$ct/image.nii.gz,$ct/labels.nii.gz,1,abdomen-mr.nii.gz
$data/spleen-ct/image.nii.gz,$ct/image.nii.gz,$ct/labels.nii.gz,1,spleen-ct.nii.gz
$ct/image.nii.gz,$sp/image.nii.gz,$sp/labels.nii.gz,1,ct-a_from_spleen-ct.nii.gz
$data/abdomen-ct/ct-b/dicom,$sp/image.nii.gz,$sp/labels.nii.gz,1,ct-b_from_spleen-ct.nii.gz
$data/abdomen-mr/image.nii.gz,$sp/image.nii.gz,$sp/labels.nii.gz,1,abdomen-mr_from_spleen-ct.nii.gz
EOF

# cases per minute from the start time $1 (bash's $EPOCHREALTIME) to now
rate() { "$py" -c "import sys; s = float(sys.argv[2]) - float(sys.argv[1]); print(f'{6 * 60 / s:.2f} cases/min ({s:.1f} s)')" "$1" "$EPOCHREALTIME"; }

mkdir -p "$out/segment"
t0=$EPOCHREALTIME
tail -n +2 "$out/cohort.csv" | while IFS=, read -r q si sl lab o; do
  "$py" -m fewshotsam2.cli segment --query "$q" --support "$si" "$sl" --labels "$lab" --out "$out/segment/$o" \
      "${model[@]}" 2>/dev/null </dev/null
done > "$out/segment.log"
echo "6 x segment:                   $(rate "$t0")"
"$py" -c "import re, sys; n = sum(int(m) for m in re.findall(r'(\d+) slices encoded', open(sys.argv[1]).read())); print(f'  {n} slices encoded')" "$out/segment.log"

t0=$EPOCHREALTIME
"$py" -m fewshotsam2.cli batch --manifest "$out/cohort.csv" --out-dir "$out/local" --force "${model[@]}" 2>/dev/null | sed "s/^/  /"
echo "batch (local):                 $(rate "$t0")"

t0=$EPOCHREALTIME
"$py" -m fewshotsam2.cli batch --manifest "$out/cohort.csv" --out-dir "$out/ray" --force --ray local --workers 2 \
    "${model[@]}" 2>/dev/null | sed "s/^/  /"
echo "batch --ray local --workers 2: $(rate "$t0")"
