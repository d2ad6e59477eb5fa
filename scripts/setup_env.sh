#!/usr/bin/env bash
# Create (or reuse) a virtual environment with the tested dependency set, and install FewShotSAM2's core into it.
# Usage: scripts/setup_env.sh [VENV_DIR]   (default: $FEWSHOTSAM2_VENV or ~/.cache/fewshotsam2/venv)
# Prints the venv's path on its last line.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${1:-${FEWSHOTSAM2_VENV:-$HOME/.cache/fewshotsam2/venv}}"
# the tested set; bump the stamp when it changes so cached environments are rebuilt
stamp="torch==2.14.1 torchvision==0.29.1 sam2==1.1.0 lpips==0.1.4 slicer-core==5.13.31053.0 ray==2.60.0 v1"

py="${PYTHON:-python3}"
if [ -f "$venv/.fewshotsam2-stamp" ] && [ "$(cat "$venv/.fewshotsam2-stamp")" = "$stamp" ] \
   && "$venv/bin/python" -c "import torch, sam2, lpips, SimpleITK, slicer" 2>/dev/null; then
  echo "reusing $venv" >&2
else
  rm -rf "$venv"
  "$py" -m venv "$venv"
  pip=("$venv/bin/python" -m pip install -q --disable-pip-version-check)
  "${pip[@]}" --upgrade pip setuptools wheel >&2
  # torch and torchvision must be a matched pair
  "${pip[@]}" torch==2.14.1 torchvision==0.29.1 >&2
  # sam2's setup would build its CUDA extension against GBs of CUDA packages: skip it, install its needs ourselves.
  # sam2 1.1.0 on PyPI is a third-party upload whose sam2/ is byte-identical to facebookresearch/sam2 at 2b90b9f:
  # pinned by the sdist's SHA256 (pip refuses any other file)
  SAM2_BUILD_CUDA=0 "${pip[@]}" --no-build-isolation --no-deps --require-hashes \
      -r <(echo "sam2==1.1.0 --hash=sha256:7e0ea252d43c10d853e3acfce0b5770ac683c30481bd6de311300e9d44f45b74") >&2
  "${pip[@]}" "hydra-core>=1.3.2" "iopath>=0.1.10" pillow tqdm lpips==0.1.4 SimpleITK slicerio \
      "slicer-core==5.13.31053.0" pytest matplotlib scipy >&2
  # optional extra [ray] (`batch --ray`), installed here so that its tests run
  "${pip[@]}" ray==2.60.0 >&2
  echo "$stamp" > "$venv/.fewshotsam2-stamp"
fi
# the core itself, editable, so the `fewshotsam2` command runs this checkout
"$venv/bin/python" -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e "$repo" >&2
echo "$venv"
