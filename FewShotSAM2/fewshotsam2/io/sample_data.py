"""The demo data: the `abdomen-ct` pair, from public addresses, checked by SHA256, cached.

ct-a (support): a 122x101x30 CT at 3 mm and its labels; ct-b (query): a 20-file DICOM series (512x512, 2 mm
slices) and its labels on a y-flipped grid. All are TotalSegmentator's own test files (Apache-2.0; the labels are
TotalSegmentator v2 predictions, not manual), fetched file by file from the repository at a pinned commit (tag
v2.18.0), so the addresses never change content. The DICOM series is stored there as 20 separate files, not as an
archive.

Where the files are looked for, first hit wins:
1. an explicit folder (`--dest DIR`, or `$FEWSHOTSAM2_DATA`): files missing there are downloaded into it;
2. `../shared/data` beside the clone (the project's machines and CI): used as is, every file checked;
3. the cache, `~/.cache/fewshotsam2/sample-data`: files missing there are downloaded into it.
Every file is checked against its SHA256 wherever it comes from; a download is written to a temporary name and
renamed only once its checksum matches. `$FEWSHOTSAM2_SAMPLE_URL` replaces the download base address (a mirror).

This module imports no torch: `fewshotsam2 sample-data` answers at once.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

from fewshotsam2.environment import check_sample_url
from fewshotsam2.errors import InputError

SOURCE_REPO = "wasserth/TotalSegmentator"
SOURCE_COMMIT = "184fa4765456492b2ab81a981cc387465906b003"  # tag v2.18.0 (2026-08-12)
SOURCE_FOLDER = "tests/reference_files"
SOURCE_LICENSE = "Apache-2.0"
BASE_URL = f"https://raw.githubusercontent.com/{SOURCE_REPO}/{SOURCE_COMMIT}/{SOURCE_FOLDER}"

DATA_ENV = "FEWSHOTSAM2_DATA"
URL_ENV = "FEWSHOTSAM2_SAMPLE_URL"

# the demo: segment liver (5) and spleen (1) of ct-b from one labeled slice each of ct-a
DEMO_QUERY = "abdomen-ct/ct-b/dicom"
DEMO_SUPPORT_IMAGE = "abdomen-ct/ct-a/image.nii.gz"
DEMO_SUPPORT_LABELS = "abdomen-ct/ct-a/labels.nii.gz"
DEMO_QUERY_LABELS = "abdomen-ct/ct-b/labels.nii.gz"
DEMO_LABELS = "liver=5,spleen=1"


@dataclass(frozen=True)
class SampleFile:
    """One file of the sample data."""

    name: str  # what it is, for messages
    filename: str  # its path inside SOURCE_FOLDER of the source repository
    sha256: str
    size: int  # bytes
    path: str  # where it goes, relative to the data folder (same layout as ../shared/data)

    @property
    def url(self) -> str:
        return f"{os.environ.get(URL_ENV, BASE_URL).rstrip('/')}/{self.filename}"


_DICOM_PREFIX = "CT.1.3.12.2.1107.5.1.4.60064.30000022120808113428000016"
# (last two digits of the file name, sha256, size): TotalSegmentator's example_ct_dicom/, slices 1..20
_DICOM = (
    ("573", "4c5633409fa4d3edf6871e5684e9e1b10325b4d0949997582f43b23a684d0dc4", 156972),
    ("574", "9148f91127145497f4d6c6f0780f9452504cd7fe5088ec8f2bf2b21800c731ff", 157216),
    ("575", "3edaccec892e0821440cbefe3d5465923bb5146c316cbaf58f578d962f120484", 158102),
    ("576", "9b68685f0c5f9bfcfc2c397f4fadf431da288d7422ca72e7d9031d4e039418cd", 158670),
    ("577", "c8d2c0dc05e414d47d3652c658d8fecc20c3cf7ce106c10d84ad033d39700bcc", 158560),
    ("578", "0ee2c1d58e06cedd91483ca35c04da3c26fea0dbe88aaf1eaa950b57f38357d6", 157844),
    ("579", "c76cf0818d4215b92883d109b8a0b62ae0a4d81637eed98738f9c62b6f49bb72", 156996),
    ("580", "106e20514fd3ca66895e14dbfba96c01c1195e4ed890c035d4368dd71f3ee116", 156574),
    ("581", "5804e6c4a50f4d5b20040ac82a1c6d79cba5f7267d71f10b0a1b49eda1bc13ff", 156778),
    ("582", "bef219a16b22949224de4581a2d288863b2585d29556ac24021f03307378cb39", 157400),
    ("583", "9de5a49e880417d5330fe299115fdb95831a98234216a31c5c0e9a0be9a6dcd3", 158218),
    ("584", "fa00c8d81ec8aa0d0cfc4e05343782c3a75a4c60df8cccf9ff5db42ac454e61d", 158648),
    ("585", "ebba0900b0f728db0c94c769db3e5ca38a0cd916386a727541eb3e56350770e5", 158334),
    ("586", "f084ec95cfba25efb7cbe86e8b4966b051904037e8385f58fe398c5475693b89", 157586),
    ("587", "20a9b88a30ea8a824ac65cb19c1ebf80964b41ff476497706ff2a286e5f27a25", 157228),
    ("588", "2a515d3b60f3ff733aac1fc5414206c331e3ed2ccef8c2e0c30b844c538e3ed8", 156964),
    ("589", "5880669f1bc36b09cad4bdf487992ec415da0afa014e927efc282e612f467574", 157164),
    ("590", "7af4dd5b5766a87368939116b91f90d989820e7b2237fb9bcd10d47db0960875", 157804),
    ("591", "671306f4462ae881976c18c6a2d8a1567279fb0166ef0e9e8a41271fac9c1cbb", 158568),
    ("592", "fdb76ad5272f074e07cc81509604fd163f2f8a9903d34b16ba6f078250373c51", 158614),
)

DEMO_FILES: tuple[SampleFile, ...] = (
    SampleFile("ct-a image (support)", "example_ct_sm.nii.gz",
               "e50c00b2914e2cac0aaee8e7f3b5f57d44d9f21bfd5c0577271c54c0cb49e9fb", 483312,
               "abdomen-ct/ct-a/image.nii.gz"),
    SampleFile("ct-a labels (support)", "example_seg.nii.gz",
               "8be652475a4aaae83103a66bfb3345314b1fc06742807a06cf5005f7a7913a2d", 35487,
               "abdomen-ct/ct-a/labels.nii.gz"),
    SampleFile("ct-b labels (query reference)", "example_seg_dicom.nii.gz",
               "98af7f6536c316ff9084054f20956cd3e28af376b81d582d269fbea2744878fc", 89531,
               "abdomen-ct/ct-b/labels.nii.gz"),
) + tuple(
    SampleFile(f"ct-b DICOM slice {i + 1}/{len(_DICOM)} (query)", f"example_ct_dicom/{_DICOM_PREFIX}{tail}",
               digest, size, f"{DEMO_QUERY}/{_DICOM_PREFIX}{tail}")
    for i, (tail, digest, size) in enumerate(_DICOM)
)


class SampleDataUnavailable(InputError):
    """The sample data could not be found or downloaded; the message says what to download and where to put it."""


def repo_shared_data() -> Path:
    """`../shared/data` beside the checkout this module runs from (may not exist)."""
    return Path(__file__).resolve().parents[4] / "shared" / "data"  # io/, fewshotsam2/, FewShotSAM2/, the clone


def default_cache_dir() -> Path:
    return Path.home() / ".cache" / "fewshotsam2" / "sample-data"


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def check_file(root: Path, item: SampleFile) -> Optional[str]:
    """None when `root/item.path` holds the expected bytes, else what is wrong with it."""
    path = root / item.path
    if not path.is_file():
        return f"{path}: missing"
    if path.stat().st_size != item.size:
        return f"{path}: {path.stat().st_size} bytes, expected {item.size} (not the {item.name} file)"
    got = sha256_of(path)
    if got != item.sha256:
        return f"{path}: SHA256 {got}, expected {item.sha256} (not the {item.name} file)"
    return None


def check_folder(root: Path, files: Sequence[SampleFile] = DEMO_FILES) -> list[str]:
    """What is wrong in a data folder: an empty list means every file is there with the right checksum."""
    return [problem for problem in (check_file(root, f) for f in files) if problem]


def download_file(item: SampleFile, root: Path, timeout: float = 60) -> Path:
    """Download one file into `root/item.path` through a temporary name, renamed only once its checksum matches."""
    target = root / item.path
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)
    tmp = Path(tmp_name)
    try:
        digest = hashlib.sha256()
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(item.url, timeout=timeout) as response:
            for chunk in iter(lambda: response.read(1 << 20), b""):
                digest.update(chunk)
                out.write(chunk)
        if digest.hexdigest() != item.sha256:
            raise SampleDataUnavailable(
                f"{item.url} did not give the expected {item.name} file (SHA256 {digest.hexdigest()}, expected "
                f"{item.sha256}); nothing was kept. If you use a mirror (${URL_ENV}), check it")
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; a data file gets the mode of any other new file
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


def offline_message(root: Path, headline: str, files: Sequence[SampleFile] = DEMO_FILES) -> str:
    """`headline`, then every file to download (its address and where it goes, one pair per file) and the three
    ways out: a mirror, a folder that holds the files already, or copying them in by hand."""
    lines = [headline,
             "Ways to get it:",
             f"  - a mirror of the files (a web or file:// folder with the source's layout): set "
             f"{URL_ENV}=<address of {SOURCE_FOLDER}/> and run again;",
             f"  - a folder that already holds them (same layout as ../shared/data): give it with --dest DIR or "
             f"{DATA_ENV}=DIR;",
             f"  - by hand: download these {len(files)} files ({sum(f.size for f in files) / 1e6:.1f} MB; "
             f"https://github.com/{SOURCE_REPO} at commit {SOURCE_COMMIT[:12]}, folder {SOURCE_FOLDER}) to the "
             "paths shown:"]
    for f in files:
        lines.append(f"      {BASE_URL}/{f.filename}\n        -> {root / f.path}")
    lines.append(f"    then run `fewshotsam2 sample-data --dest {root}` to check them (SHA256).")
    return "\n".join(lines)


def fetch(root: Path, files: Sequence[SampleFile] = DEMO_FILES,
          report: Optional[Callable[[str], None]] = None) -> Path:
    """Make `root` hold every file, downloading only those missing or wrong; returns `root`."""
    todo = [f for f in files if check_file(root, f) is not None]
    if not todo:
        return root
    if report:
        size = sum(f.size for f in todo) / 1e6
        report(f"downloading {len(todo)} sample file(s), {size:.1f} MB, from {todo[0].url.rsplit('/', 1)[0]} "
               f"into {root}")
    folders = {root / Path(f.path).parent for f in todo}
    created = {p for folder in folders for p in (folder, *folder.parents) if not p.exists()}  # removed on failure
    try:
        for i, item in enumerate(todo):
            try:
                download_file(item, root)
            except (urllib.error.URLError, OSError, TimeoutError) as exc:
                reason = getattr(exc, "reason", None) or exc
                raise SampleDataUnavailable(offline_message(
                    root, f"cannot download the sample data ({item.url}: {reason}).", files)) from None
            if report and (i + 1 == len(todo) or (i + 1) % 5 == 0):
                report(f"  {i + 1}/{len(todo)} verified")
    except BaseException:
        # leave no empty folders behind: only those this call made, deepest first, and only when still empty
        for folder in sorted(created, key=lambda p: len(p.parts), reverse=True):
            try:
                folder.rmdir()
            except OSError:
                pass
        raise
    return root


def locate(dest: Optional[str | Path] = None, download: bool = True,
           report: Optional[Callable[[str], None]] = None, files: Sequence[SampleFile] = DEMO_FILES) -> Path:
    """The data folder holding every sample file with the right checksum (layout as ../shared/data).

    `dest` (or `$FEWSHOTSAM2_DATA`): that folder, filled where needed. Otherwise ../shared/data when it exists
    (checked, never written), else the cache (filled where needed). `download=False` only checks.
    Raises SampleDataUnavailable with what to download and where.
    """
    explicit = dest if dest is not None else os.environ.get(DATA_ENV) or None
    if explicit is None:
        shared = repo_shared_data()
        if shared.is_dir():
            problems = check_folder(shared, files)
            if problems:
                raise SampleDataUnavailable(f"{shared} does not hold the expected sample data: " + "; ".join(problems))
            return shared
    root = Path(explicit).expanduser() if explicit is not None else default_cache_dir()
    if root.exists() and not root.is_dir():
        what = "--dest" if dest is not None else f"${DATA_ENV}"
        raise InputError(f"{what} {root} is a file; give a folder to hold the sample data (it is created if "
                         "missing)")
    if not download:
        problems = check_folder(root, files)
        if problems:
            raise SampleDataUnavailable(offline_message(
                root, f"the sample data is not in {root}: {len(problems)} of {len(files)} files missing or wrong "
                      f"(first: {problems[0]}). `fewshotsam2 sample-data` downloads them; offline:", files))
        return root
    return fetch(root, files, report)


# torchvision's ImageNet AlexNet: the LPIPS backbone `--slice-range auto` needs (torchvision downloads it on first
# use; `sample-data --lpips` fetches it ahead, checked as torch.hub checks it: the file name's hash prefix)
ALEXNET_URL = "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth"
ALEXNET_SIZE_MB = 233


def torch_hub_checkpoints() -> Path:
    """Where torch.hub (and so torchvision) keeps downloaded weights, found without importing torch."""
    torch_home = os.environ.get("TORCH_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "torch")
    return Path(os.path.expanduser(torch_home)) / "hub" / "checkpoints"


def fetch_alexnet(url: str = ALEXNET_URL, folder: Optional[Path] = None,
                  report: Optional[Callable[[str], None]] = None, timeout: float = 60) -> Path:
    """The AlexNet weights in torch.hub's folder, downloaded once and checked: the SHA256 must start with the
    8 hex digits in the file name (torch.hub's own check). Raises SampleDataUnavailable saying how offline."""
    folder = torch_hub_checkpoints() if folder is None else Path(folder)
    name = url.rsplit("/", 1)[-1]
    prefix = name.rsplit("-", 1)[-1].split(".", 1)[0]
    target = folder / name
    if target.is_file() and sha256_of(target).startswith(prefix):
        return target
    if report:
        report(f"downloading the LPIPS AlexNet backbone ({ALEXNET_SIZE_MB} MB) from {url} into {folder}")
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{name}.", suffix=".part", dir=folder)
    tmp = Path(tmp_name)
    try:
        digest = hashlib.sha256()
        try:
            with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as response:
                for chunk in iter(lambda: response.read(1 << 20), b""):
                    digest.update(chunk)
                    out.write(chunk)
        except (urllib.error.URLError, OSError, TimeoutError) as exc:
            reason = getattr(exc, "reason", None) or exc
            raise SampleDataUnavailable(
                f"cannot download the LPIPS AlexNet backbone ({url}: {reason}). Offline: copy {name} "
                f"({ALEXNET_SIZE_MB} MB) into {folder}/, or give any torchvision-layout AlexNet state dict with "
                "--lpips-weights PATH or FEWSHOTSAM2_LPIPS_WEIGHTS; without it --slice-range auto is off (every "
                "slice is segmented)") from None
        if not digest.hexdigest().startswith(prefix):
            raise SampleDataUnavailable(f"{url} did not give the expected file (SHA256 {digest.hexdigest()[:16]}..., "
                                        f"expected {prefix}...); nothing was kept")
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


def demo_paths(root: Path) -> dict[str, Path]:
    """The demo's inputs inside a data folder."""
    return {"query": root / DEMO_QUERY, "support_image": root / DEMO_SUPPORT_IMAGE,
            "support_labels": root / DEMO_SUPPORT_LABELS, "query_labels": root / DEMO_QUERY_LABELS}


def total_size(files: Iterable[SampleFile] = DEMO_FILES) -> int:
    return sum(f.size for f in files)


# ------------------------------------------------------------------------------------------ `fewshotsam2 sample-data`

HELP = "fetch, verify and cache the demo data (abdomen-ct pair)"
EPILOG = """example:
  fewshotsam2 sample-data                  # ../shared/data if beside the clone, else ~/.cache/fewshotsam2/sample-data
  fewshotsam2 sample-data --dest ~/fs-data # download into (or check) a folder of your choice

Prints the data folder on its last line; the demo's inputs inside it:
  query   abdomen-ct/ct-b/dicom            (20-file DICOM series)
  support abdomen-ct/ct-a/image.nii.gz  abdomen-ct/ct-a/labels.nii.gz   (liver = 5, spleen = 1)"""


def add_arguments(parser) -> None:
    parser.description = (
        f"Fetch the demo pair (TotalSegmentator's example CTs, {SOURCE_LICENSE}, {total_size() / 1e6:.1f} MB in "
        f"{len(DEMO_FILES)} files) from {SOURCE_REPO} at commit {SOURCE_COMMIT[:12]}, check every file's SHA256, "
        "and keep them for the demo and the tests.")
    parser.epilog = EPILOG
    parser.add_argument("--dest", metavar="DIR",
                        help=f"data folder to fill or check (default: ${DATA_ENV}, else ../shared/data beside the "
                             "clone when present, else ~/.cache/fewshotsam2/sample-data)")
    parser.add_argument("--check", action="store_true", help="only check the files, download nothing")
    parser.add_argument("--lpips", action="store_true",
                        help=f"also fetch and check the LPIPS AlexNet backbone ({ALEXNET_SIZE_MB} MB, into torch's "
                             "cache) that --slice-range auto needs; once, so later runs need no network")


def run(args) -> int:
    report = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731
    try:
        root = locate(args.dest, download=not args.check, report=report)
    except SampleDataUnavailable as exc:
        print(f"fewshotsam2: {exc}", file=sys.stderr)
        return 1
    report(f"{len(DEMO_FILES)} sample files verified (SHA256) in {root}")
    if getattr(args, "lpips", False):
        try:
            weights = fetch_alexnet(report=report) if not args.check else torch_hub_checkpoints() / \
                ALEXNET_URL.rsplit("/", 1)[-1]
        except SampleDataUnavailable as exc:
            print(f"fewshotsam2: {exc}", file=sys.stderr)
            return 1
        if not weights.is_file():
            print(f"fewshotsam2: the LPIPS AlexNet backbone is not in {weights.parent} (sample-data --lpips "
                  "fetches it)", file=sys.stderr)
            return 1
        report(f"LPIPS AlexNet backbone verified: {weights}")
    print(root)  # the last line of stdout: what scripts read (`data="$(fewshotsam2 sample-data | tail -n 1)"`)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """`python -m fewshotsam2.io.sample_data`: the same command without torch, numpy or anything beyond the standard
    library (the demo checks the data this way before it builds the environment)."""
    parser = argparse.ArgumentParser(prog="fewshotsam2 sample-data", formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        if os.environ.get(URL_ENV, "").strip():
            check_sample_url(os.environ[URL_ENV].strip())
        return run(args)
    except InputError as exc:
        print(f"fewshotsam2: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
